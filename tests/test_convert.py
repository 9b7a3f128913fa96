"""Conversion between the original `.pth`, HF checkpoints and Llama checkpoints, and the `convert` command line."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LlamaForCausalLM
from trl.chat_template_utils import has_generation_markers

from minimind_hf import MiniMindConfig, MiniMindForCausalLM
from minimind_hf.configuration_minimind import build_config, parse_overrides
from minimind_hf.convert import main
from minimind_hf.formats.llama import to_llama
from minimind_hf.formats.pth import load_pth, save_pth
from minimind_hf.loading import load_model
from minimind_hf.testing import (
    REPO_ROOT,
    TOKENIZER_DIR,
    logits,
    save_hf_dir,
    save_in_every_form,
    tiny_model,
)

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_pth2hf_then_hf2pth_reproduces_original_tensors(shared_fixtures, tmp_path, name):
    root = shared_fixtures / "minimind_reference"
    sizes = json.loads((root / "configs.json").read_text())[name]
    overrides = f"num_attention_heads={sizes['num_attention_heads']},num_key_value_heads={sizes['num_key_value_heads']}"
    argv = ["--hidden_size", "64", "--num_hidden_layers", "2", "--use_moe", str(int(name == "moe"))]
    main(["pth2hf", str(root / f"{name}_fp16.pth"), str(tmp_path / "hf"), *argv, "--config_overrides", overrides])
    main(["hf2pth", str(tmp_path / "hf"), str(tmp_path / "back.pth")])
    original = torch.load(root / f"{name}_fp16.pth", weights_only=True)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert original.keys() == back.keys()
    for key, tensor in original.items():
        assert back[key].dtype == torch.float16
        assert torch.equal(tensor, back[key]), key
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file of the atomic write was left behind"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_load_pth_accepts_wrapper_prefixes_and_fp32(tmp_path, prefix):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY))
    torch.save({prefix + k: v.float() for k, v in model.state_dict().items()}, tmp_path / "x.pth")
    loaded = load_pth(tmp_path / "x.pth", MiniMindConfig(**TINY))
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key


def test_load_pth_names_missing_unexpected_and_misshapen_keys(tmp_path):
    torch.manual_seed(0)
    state = MiniMindForCausalLM(MiniMindConfig(**TINY)).state_dict()
    extra = dict(state, **{"model.layers.9.extra.weight": torch.zeros(1)})
    del extra["model.norm.weight"]
    torch.save(extra, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing: \['model.norm.weight'\].*unexpected: \['model.layers.9.extra"):
        load_pth(tmp_path / "bad.pth", MiniMindConfig(**TINY))
    torch.save(state, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="model.embed_tokens.weight has shape .* check hidden_size"):
        load_pth(tmp_path / "ok.pth", MiniMindConfig(**{**TINY, "vocab_size": 256}))
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_pth(tmp_path / "nothere.pth", MiniMindConfig(**TINY))


def test_load_pth_refuses_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickle executed",))

    torch.save({"model.norm.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a readable MiniMind .pth"):
        load_pth(tmp_path / "evil.pth", MiniMindConfig(**TINY))


def test_to_llama_reloads_in_plain_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY)).eval()
    to_llama(model, tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert type(llama) is LlamaForCausalLM
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        diff = (model(ids).logits - llama(ids).logits).abs().max().item()
    print(f"to_llama reload: max diff {diff:.2e}")
    assert diff == 0.0


def test_to_llama_refuses_moe(tmp_path):
    with pytest.raises(ValueError, match="MoE MiniMind has no Llama equivalent"):
        to_llama(MiniMindForCausalLM(MiniMindConfig(**TINY, use_moe=True)), tmp_path / "llama")
    assert not (tmp_path / "llama").exists()


def test_save_pth_writes_both_tied_names_in_fp16(tmp_path):
    model = MiniMindForCausalLM(MiniMindConfig(**TINY))
    state = torch.load(save_pth(model, tmp_path / "m.pth"), weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.float16}
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])


def test_overrides_and_build_config():
    assert parse_overrides("num_attention_heads=4, rms_norm_eps=1e-6,hidden_act=gelu") == {
        "num_attention_heads": 4,
        "rms_norm_eps": 1e-6,
        "hidden_act": "gelu",
    }
    config = build_config(768, 16, False, {"rope_theta": 1e4})
    assert (config.hidden_size, config.intermediate_size, config.rope_parameters["rope_theta"]) == (768, 2048, 1e4)
    with pytest.raises(ValueError, match="unknown MiniMindConfig field"):
        build_config(overrides={"num_heads": 4})
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides("num_attention_heads")


PTH_SIZES = ["--hidden_size", "32", "--num_hidden_layers", "2", "--config_overrides", "num_attention_heads=4"]


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict:
    """One tiny model (float16-exact weights) in every form: HF dir, the original's export, Llama export, .pth."""
    root = tmp_path_factory.mktemp("forms")
    model = tiny_model()
    return {
        "model": model,
        **save_in_every_form(model, root),
        "bare": save_hf_dir(model, root / "bare", tokenizer=False),
    }


def test_hf2llama_carries_the_source_tokenizer_and_chat_template(forms, tmp_path):
    main(["hf2llama", str(forms["hf"]), str(tmp_path / "llama")])
    # `transformers serve` loads the processing class with AutoProcessor: without a tokenizer it refuses the export.
    processor = AutoProcessor.from_pretrained(tmp_path / "llama")
    source = AutoTokenizer.from_pretrained(forms["hf"])
    assert processor.chat_template == source.chat_template and has_generation_markers(processor.chat_template)
    messages = [{"role": "user", "content": "Is 7 odd or even?"}]
    kwargs = {"add_generation_prompt": True, "return_dict": True}
    rendered = processor.apply_chat_template(messages, **kwargs)["input_ids"]
    assert rendered == source.apply_chat_template(messages, **kwargs)["input_ids"]
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert type(llama) is LlamaForCausalLM
    ids = torch.tensor([rendered])
    assert torch.equal(logits(llama, ids), logits(forms["model"], ids))


@pytest.mark.parametrize("form", ["hf", "original", "llama", "pth"])
def test_every_form_converts_to_the_original_pth_and_to_hf(forms, tmp_path, form):
    sizes = PTH_SIZES if form == "pth" else []
    main(["hf2pth", str(forms[form]), str(tmp_path / "back.pth"), *sizes])
    expected = {k: v.half() for k, v in forms["model"].state_dict().items()}
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == expected.keys() and all(torch.equal(back[k], expected[k]) for k in expected)

    main(["pth2hf", str(forms[form]), str(tmp_path / "hf"), *sizes, "--tokenizer", str(TOKENIZER_DIR)])
    model = load_model(tmp_path / "hf")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in forms["model"].state_dict().items())
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "model_complete.json").is_file()


def _clashes(forms, tmp_path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    return {
        "sizes differ from the .pth": (
            ["pth2hf", str(forms["pth"]), str(tmp_path / "out"), "--hidden_size", "64", "--num_hidden_layers", "2"],
            "tiny.pth: model.embed_tokens.weight has shape (6400, 32) but the config expects (6400, 64)",
        ),
        "output dir is a file": (
            ["pth2hf", str(forms["pth"]), str(tmp_path / "a_file"), *PTH_SIZES],
            "a_file: exists and is not a directory",
        ),
        "output .pth is a directory": (
            ["hf2pth", str(forms["hf"]), str(tmp_path / "a_dir")],
            "a_dir: is a directory; give the path of the .pth file",
        ),
        "output under a file": (
            ["hf2llama", str(forms["hf"]), str(tmp_path / "a_file" / "llama")],
            "a_file is a file, not a directory",
        ),
        "missing input": (["hf2pth", str(tmp_path / "nothere"), str(tmp_path / "x.pth")], "nothere: no such model"),
        "no tokenizer for the export": (
            ["hf2llama", str(forms["bare"]), str(tmp_path / "out")],
            "holds no tokenizer, and an export without one cannot be served; pass --tokenizer",
        ),
        "MoE to Llama": (["hf2llama", "{moe}", str(tmp_path / "out")], "an MoE MiniMind has no Llama equivalent"),
    }


CLASHES = [
    "sizes differ from the .pth",
    "output dir is a file",
    "output .pth is a directory",
    "output under a file",
    "missing input",
    "no tokenizer for the export",
    "MoE to Llama",
]


@pytest.mark.parametrize("case", CLASHES)
def test_bad_input_is_one_error_line_and_writes_nothing(forms, tmp_path, capsys, case):
    argv, message = _clashes(forms, tmp_path)[case]
    if "{moe}" in argv:
        argv[argv.index("{moe}")] = str(save_hf_dir(tiny_model(use_moe=True), tmp_path / "moe"))
    capsys.readouterr()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    # One line of error (transformers may draw a progress bar while loading); no traceback.
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], err
    assert "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing may be written"


@pytest.mark.slow
def test_the_command_line_prints_no_traceback(forms, tmp_path):
    argv = ["pth2hf", str(forms["pth"]), str(tmp_path / "out"), "--hidden_size", "64", "--num_hidden_layers", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "minimind_hf.convert", *argv], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "embed_tokens.weight has shape" in lines[-1]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
