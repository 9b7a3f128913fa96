"""Conversion between the original `.pth`, HF checkpoints and Llama checkpoints."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from minimind_hf import MiniMindConfig, MiniMindForCausalLM
from minimind_hf.convert import build_config, load_pth, main, parse_overrides, save_pth, to_llama

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
    assert diff <= 1e-5


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
