"""The recipes' data path end to end: a long prompt no longer stops a run, a lone surrogate is a named bad line,
and the trainer packs exactly the conversations tokenized once by `load_sft_tokenized` (several processes too)."""

import json
import logging
from pathlib import Path

import pytest

import minimind_hf.data as data_module
from minimind_hf.data import DataError, encode_conversation, load_pretrain_tokenized
from minimind_hf.stages import pretrain, sft
from minimind_hf.testing import write_tiny_recipe
from minimind_hf.tokenizer import load_tokenizer
from minimind_hf.training import run_cli

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("datasets_cache")

LONG_PROMPT = {"conversations": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
LONE_SURROGATE = '{"conversations": [{"role": "user", "content": "hi \\ud83d"}, {"role": "assistant", "content": "x"}]}'


def conversations(n: int) -> list[dict]:
    return [
        {"conversations": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(n)
    ]


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_a_long_prompt_is_dropped_and_named_and_the_run_trains(tmp_path, project_tokenizer_dir, caplog, monkeypatch):
    """One conversation in 300 with no supervised token within max_length: the run trains on the other 299, in two
    tokenizing processes, and the log names the dropped one; `error_on_unsupervised: true` refuses it."""
    rows = conversations(300)
    rows[28] = LONG_PROMPT
    data = write_lines(tmp_path / "sft.jsonl", rows)
    monkeypatch.setattr(data_module, "BYTES_PER_PROCESS", data.stat().st_size // 2)
    recipe = write_tiny_recipe(tmp_path, max_length=128, dataset_num_proc=2)
    with caplog.at_level(logging.WARNING, logger="minimind_hf.data"):
        trainer = sft.main(["--config", str(recipe)])
    assert "dropped 1 of 300 conversations with no supervised token within max_length=128" in caplog.text
    assert f"{data}:29" in caplog.text
    assert trainer.state.global_step == 2 and (tmp_path / "out" / "model.safetensors").is_file()
    tokenizer = load_tokenizer(project_tokenizer_dir)
    kept = [row["conversations"] for i, row in enumerate(rows) if i != 28]
    packed = trainer.train_dataset
    assert str(packed.features["input_ids"].feature.dtype) == "uint16"
    lengths = sorted(n for row in packed["seq_lengths"] for n in row)
    assert lengths == sorted(len(encode_conversation(c, tokenizer, 128)["input_ids"]) for c in kept)

    strict = write_tiny_recipe(tmp_path, max_length=128, error_on_unsupervised=True, output_dir=str(tmp_path / "o2"))
    with pytest.raises(DataError, match=rf"^{data}:29: no supervised token within max_length=128$"):
        sft.main(["--config", str(strict)])
    assert not (tmp_path / "o2" / "model.safetensors").exists()


def test_a_lone_surrogate_is_one_error_line_and_skip_invalid_skips_it(tmp_path):
    data = write_lines(tmp_path / "sft.jsonl", [*conversations(8), LONE_SURROGATE])
    recipe = write_tiny_recipe(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: sft.main(["--config", str(recipe)]))
    assert exit_.value.code == (
        f"error: {data}:9: lone surrogate \\ud83d in message 0 content at character 3 (half of a UTF-16 pair, not text)"
    )
    assert not (tmp_path / "out").exists()
    trainer = sft.main(["--config", str(write_tiny_recipe(tmp_path, skip_invalid=True))])
    assert trainer.state.global_step == 2 and trainer.train_dataset.num_rows > 0


def test_pretraining_trains_on_texts_tokenized_once(tmp_path, project_tokenizer_dir):
    texts = [{"text": f"The number {i} comes after {i - 1}."} for i in range(40)]
    data = write_lines(tmp_path / "pretrain.jsonl", [*texts, '{"text": "\\udc00"}'])
    recipe = write_tiny_recipe(tmp_path, data_path=str(data), skip_invalid=True, max_length=16)
    trainer = pretrain.main(["--config", str(recipe)])
    tokenized = load_pretrain_tokenized(data, load_tokenizer(project_tokenizer_dir), 16, skip_invalid=True)
    assert tokenized.load_report.skipped == {"lone_surrogate": 1}
    packed = trainer.train_dataset
    assert sorted(n for row in packed["seq_lengths"] for n in row) == sorted(map(len, tokenized["input_ids"]))
    assert packed["labels"] == packed["input_ids"], "every token is a target"
