"""Broken or hostile input stops the SFT recipe before training, with a message naming the problem, and leaves the
output directory (an earlier run's model and checkpoint) byte for byte as it was. The recipes say
`overwrite_output_dir: true`, so that the output directory is at risk: only the input's own error may stop them.
The chat command's interactive session survives hostile input too."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimind_hf import MiniMindConfig, MiniMindForCausalLM
from minimind_hf import chat as chat_module
from minimind_hf.checkpointing import MANIFEST
from minimind_hf.formats.pth import save_pth
from minimind_hf.stages import sft
from minimind_hf.testing import write_tiny_recipe
from minimind_hf.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("datasets_cache")

# The shipped tokenizer's size (data/make_data.py trains it; its size follows the sample data).
VOCAB = len(load_tokenizer(REPO / "data" / "tokenizer"))
GOOD = [
    {"conversations": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
    for i in range(8)
]
GOOD_LINES = "".join(json.dumps(row) + "\n" for row in GOOD)


def jsonl(*extra: str | dict) -> bytes:
    """Eight good lines, then `extra` (a dict is one JSON line; a string is written as is)."""
    tail = "".join(json.dumps(e) + "\n" if isinstance(e, dict) else e for e in extra)
    return (GOOD_LINES + tail).encode()


def write_recipe(directory: Path, **overrides) -> Path:
    return write_tiny_recipe(directory, **{"overwrite_output_dir": True, **overrides})


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """An output directory holding a finished run: final model and a sealed checkpoint-2."""
    directory = tmp_path_factory.mktemp("earlier")
    (directory / "sft.jsonl").write_bytes(jsonl())
    sft.main(["--config", str(write_recipe(directory))])
    return directory / "out"


def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(directory.rglob("*"))
    }


@pytest.fixture
def case_dir(tmp_path, earlier_run) -> Path:
    shutil.copytree(earlier_run, tmp_path / "out")
    (tmp_path / "sft.jsonl").write_bytes(jsonl())
    return tmp_path


def corrupt_model_dir(tmp_path: Path, earlier_run: Path) -> dict:
    model = tmp_path / "model"
    shutil.copytree(earlier_run, model, ignore=shutil.ignore_patterns("checkpoint-*"))
    (model / "model.safetensors").write_bytes(b"\0" * 100)
    return {"model_name_or_path": str(model)}


def mismatched_pth(tmp_path: Path, earlier_run: Path) -> dict:
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return {"model_name_or_path": str(save_pth(MiniMindForCausalLM(config), tmp_path / "full_sft_64.pth"))}


def damaged_checkpoint(tmp_path: Path, earlier_run: Path) -> dict:
    weights = tmp_path / "out" / "checkpoint-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    return {"resume_from_checkpoint": str(weights.parent)}


def truncated_checkpoint(tmp_path: Path, earlier_run: Path) -> dict:
    weights = tmp_path / "out" / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    return {"resume_from_checkpoint": "true"}


def checkpoint_of_other_sizes(tmp_path: Path, earlier_run: Path) -> dict:
    return {"hidden_size": 64, "resume_from_checkpoint": str(tmp_path / "out" / "checkpoint-2")}


def deleted_data(tmp_path: Path, earlier_run: Path) -> dict:
    (tmp_path / "sft.jsonl").unlink()
    return {"resume_from_checkpoint": "true"}


def data_dir(tmp_path: Path, earlier_run: Path) -> dict:
    (tmp_path / "data_dir").mkdir()
    return {"data_path": str(tmp_path / "data_dir")}


def final_model_as_resume_point(tmp_path: Path, earlier_run: Path) -> dict:
    return {"resume_from_checkpoint": str(tmp_path / "out")}


def tokenizer_of_another_vocabulary(tmp_path: Path, earlier_run: Path) -> dict:
    tokenizer = load_tokenizer(REPO / "data" / "tokenizer")
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "other_tokenizer")
    return {
        "model_name_or_path": str(tmp_path / "out"),
        "tokenizer_name_or_path": str(tmp_path / "other_tokenizer"),
        # Not `out` itself: a run may not write over the model it starts from (tests/test_stage_guards.py).
        "output_dir": str(tmp_path / "next"),
    }


def not_a_tokenizer(tmp_path: Path, earlier_run: Path) -> dict:
    (tmp_path / "empty").mkdir()
    return {"tokenizer_name_or_path": str(tmp_path / "empty")}


TEN_MB_TURN = {
    "conversations": [{"role": "user", "content": "word " * 2_000_000}, {"role": "assistant", "content": "ok"}]
}
# (data bytes or None, recipe overrides or a function (tmp_path, earlier_run) -> overrides, message pattern)
CASES = {
    "malformed JSON": (jsonl('{"conversations": [\n'), {}, r"sft.jsonl:9: not JSON"),
    "truncated last line": (jsonl('{"conversations": [{"role": "us'), {}, r"sft.jsonl:9: truncated last line"),
    "invalid UTF-8": (GOOD_LINES.encode() + b'{"conversations": "\xff\xfe"}\n', {}, r"sft.jsonl:9: invalid UTF-8"),
    "empty file": (b"", {}, r"sft.jsonl: empty file"),
    "no assistant turn": (jsonl({"conversations": [{"role": "user", "content": "hi"}]}), {}, r":9: no assistant turn"),
    "roles out of order": (
        jsonl({"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
        {},
        r":9: message 0 is 'assistant' where 'user' was expected",
    ),
    "non-string content": (
        jsonl({"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),
        {},
        r":9: message 0 content is of type int, not a string",
    ),
    "10 MB line": (
        jsonl(TEN_MB_TURN),
        {"error_on_unsupervised": True},
        r"sft.jsonl:9: no supervised token within max_length=64",
    ),
    "data path is a directory": (None, data_dir, r"data_dir: is a directory"),
    "data file deleted before resume": (None, deleted_data, r"sft.jsonl: no such file"),
    "learning_rate: fast": (None, {"learning_rate": "fast"}, r"--learning_rate.*invalid float value: 'fast'"),
    "hidden_size: -8": (None, {"hidden_size": -8}, r"hidden_size must be positive, got -8"),
    "num_hidden_layers: 0": (None, {"num_hidden_layers": 0}, r"num_hidden_layers must be positive, got 0"),
    "hidden_size not divisible by heads": (
        None,
        {"hidden_size": 30},
        r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)",
    ),
    ".pth of other sizes": (None, mismatched_pth, r"embed_tokens.weight has shape \(6400, 64\) but the config expects"),
    "corrupt safetensors model dir": (None, corrupt_model_dir, r"model_name_or_path .*model: cannot load the model"),
    "damaged checkpoint to resume": (None, damaged_checkpoint, r"model.safetensors does not match its SHA-256"),
    "checkpoint of other sizes": (
        None,
        checkpoint_of_other_sizes,
        r"hidden_size=32 but the recipe builds hidden_size=64",
    ),
    "truncated checkpoint, resume true": (
        None,
        truncated_checkpoint,
        r"no intact checkpoint in .*model.safetensors has",
    ),
    "output_dir holds a finished run": (
        None,
        {"overwrite_output_dir": False},
        r"output_dir .*out holds another run \(checkpoint-2, model_complete.json, .*\): set resume_from_checkpoint: "
        r"true to continue it, overwrite_output_dir: true to replace it",
    ),
    "vocab_size below the tokenizer's": (
        None,
        {"config_overrides": "num_attention_heads=4,num_key_value_heads=2,vocab_size=1000"},
        rf"the model has 1000 embedding rows \(vocab_size=1000\) but tokenizer .* emits ids up to {VOCAB - 1} "
        rf"\({VOCAB} tokens\); a new model needs config_overrides: vocab_size={VOCAB}",
    ),
    "max_length above max_position_embeddings": (
        None,
        {"config_overrides": "num_attention_heads=4,num_key_value_heads=2,max_position_embeddings=32"},
        r"max_length 64 is above the model's max_position_embeddings 32",
    ),
    "tokenizer of another vocabulary": (
        None,
        tokenizer_of_another_vocabulary,
        rf"tokenizer .*other_tokenizer is not the tokenizer .*out was trained with \({VOCAB + 1} vs {VOCAB} tokens, "
        r"1 with another id\).*allow_tokenizer_change: true",
    ),
    "resume from a final model directory": (
        None,
        final_model_as_resume_point,
        r"resume_from_checkpoint: .*out is a final model directory, not a Trainer checkpoint .*set "
        r"model_name_or_path: .*out and resume_from_checkpoint: false",
    ),
    "skip_invalid, every line invalid": (b"not json\n[1]\n", {"skip_invalid": True}, r"sft.jsonl: no usable records"),
    "batch size 0": (None, {"per_device_train_batch_size": 0}, r"per_device_train_batch_size: must be at least 1"),
    "empty data_path list": (None, {"data_path": []}, r"data_path: is empty"),
    "attention not installed": (None, {"attn_implementation": "flash_attention_2"}, r"'flash_attention_2' cannot be"),
    "config_overrides typo": (
        None,
        {"config_overrides": "num_attention_head=4"},
        r"config_overrides: unknown MiniMindConfig field 'num_attention_head' \(did you mean 'num_attention_heads'\?\)",
    ),
    "config_overrides of the wrong type": (
        None,
        {"config_overrides": "num_attention_heads=4,num_key_value_heads=2,dropout=2"},
        r"Validation error for field 'dropout': TypeError: Field 'dropout' expected float, got int \(value: 2\)",
    ),
    "missing tokenizer directory": (None, {"tokenizer_name_or_path": "no/such/dir"}, r"tokenizer no/such/dir: cannot"),
    "tokenizer directory without tokenizer.json": (None, not_a_tokenizer, r"empty: cannot load it \(not a tokenizer"),
    "num_train_epochs: 0": (
        None,
        {"num_train_epochs": 0, "max_steps": -1},
        r"num_train_epochs: is 0 and max_steps is not set: the run would save an untrained model",
    ),
    "learning_rate: true": (None, {"learning_rate": True}, r"learning_rate: expected a number, got true"),
}


# The 10 MB line takes 10 s to write and scan: with the slow tests.
@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [pytest.param(*case, marks=[pytest.mark.slow] if name == "10 MB line" else []) for name, case in CASES.items()],
    ids=CASES.keys(),
)
def test_bad_input_fails_before_training_and_leaves_output_dir_alone(
    case_dir, earlier_run, capsys, data, overrides, message
):
    if data is not None:
        (case_dir / "sft.jsonl").write_bytes(data)
    if callable(overrides):
        overrides = overrides(case_dir, earlier_run)
    before = snapshot(case_dir / "out")
    with pytest.raises((Exception, SystemExit)) as raised:
        sft.main(["--config", str(write_recipe(case_dir, **overrides))])
    text = f"{raised.value}\n{capsys.readouterr().err}"  # argparse prints its message and exits
    assert re.search(message, text), text[-2000:]
    assert snapshot(case_dir / "out") == before, "output_dir changed"


@pytest.mark.slow
def test_the_command_line_exits_non_zero_with_the_message(case_dir):
    (case_dir / "sft.jsonl").write_bytes(jsonl("not json\n"))
    before = snapshot(case_dir / "out")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SWANLAB_MODE": "disabled"}
    cmd = [sys.executable, "recipes/sft.py", "--config", str(write_recipe(case_dir))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode != 0
    assert "sft.jsonl:9: not JSON" in done.stderr.strip().splitlines()[-1]
    assert snapshot(case_dir / "out") == before
    assert (case_dir / "out" / "checkpoint-2" / MANIFEST).is_file()


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    directory = tmp_path_factory.mktemp("chat") / "model"
    MiniMindForCausalLM(config).save_pretrained(directory)
    load_tokenizer(REPO / "data" / "tokenizer").save_pretrained(directory)
    return directory


def test_chat_survives_a_line_that_is_not_utf8(tiny_chat_model, monkeypatch, capsys):
    """Strict decoding raised on the bad line and ended the session, losing its history."""
    seen = []
    real = chat_module.generate_reply

    def recording_reply(model, tokenizer, messages, **sampling):
        seen.append([m["content"] for m in messages])
        return real(model, tokenizer, messages, **sampling)

    monkeypatch.setattr(chat_module, "generate_reply", recording_reply)
    typed = b"first question\n" + b"caf\xe9 latin-1\n" + b"second question\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8"))
    chat_module.main(["--model", str(tiny_chat_model), "--greedy", "--max_new_tokens", "3", "--system", "S"])
    assert "error: that line is not valid UTF-8" in capsys.readouterr().err
    assert len(seen) == 2 and seen[1][:2] == ["S", "first question"] and seen[1][-1] == "second question"


def test_chat_temperature_0_decodes_greedily(tiny_chat_model, capsys):
    argv = ["--model", str(tiny_chat_model), "--prompt", "hello", "--max_new_tokens", "8"]
    chat_module.main([*argv, "--greedy"])
    greedy = capsys.readouterr().out
    chat_module.main([*argv, "--temperature", "0"])
    assert capsys.readouterr().out == greedy
