"""LoRA: the original's adapter and file format, the recipe end to end (base untouched, resume, merge), bad input."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from minimind_hf.configuration_minimind import build_config
from minimind_hf.convert import main as convert_main
from minimind_hf.errors import RecipeError
from minimind_hf.formats.lora_pth import LoraFileError, load_lora_pth, lora_pth_state
from minimind_hf.formats.pth import load_pth
from minimind_hf.loading import load_model, load_model_and_tokenizer
from minimind_hf.stages import lora, sft
from minimind_hf.stages.lora import init_lora_like_minimind, lora_config, square_linear_modules
from minimind_hf.testing import REPO_ROOT, max_abs_diff, save_hf_dir, tiny_model, write_sft_data, write_tiny_recipe

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 12, 100, 7, 3]])


def fixture_model(fixtures: Path):
    sizes = json.loads((fixtures / "minimind_reference" / "configs.json").read_text())["dense"]
    heads = {k: sizes[k] for k in ("num_attention_heads", "num_key_value_heads")}
    config = build_config(sizes["hidden_size"], sizes["num_hidden_layers"], False, heads)
    return load_pth(fixtures / "minimind_reference" / "dense_fp16.pth", config).eval(), sizes


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def peft_logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_original_adapter_file_gives_the_original_logits_and_round_trips(shared_fixtures, tmp_path):
    model, sizes = fixture_model(shared_fixtures)
    pth = shared_fixtures / "minimind_reference" / "lora" / "dense_lora_r4.pth"
    expected = torch.load(shared_fixtures / "minimind_reference" / "lora" / "expected.pt", weights_only=True)
    peft_model = load_lora_pth(model, pth)
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].lora_alpha == 4
    diff = (peft_logits(peft_model, expected["input_ids"]) - expected["dense"]["logits"]).abs().max().item()
    print(f"LoRA .pth vs the original's apply_lora + load_lora: max |logit diff| = {diff:.2e}")
    assert diff < 1e-5

    original = torch.load(pth, weights_only=True)
    assert max_abs_diff(lora_pth_state(peft_model), original) == 0.0, "written back in save_lora's naming, unchanged"

    # The command lines: .pth -> PEFT directory on an HF base -> .pth, and the directory loads (merged) anywhere.
    base = save_hf_dir(fixture_model(shared_fixtures)[0], tmp_path / "base")
    convert_main(["lorapth2peft", str(pth), str(tmp_path / "adapter"), "--base", str(base)])
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base.resolve()
    )
    merged, tokenizer = load_model_and_tokenizer(tmp_path / "adapter")
    assert (peft_logits(merged, expected["input_ids"]) - expected["dense"]["logits"]).abs().max() < 1e-5
    convert_main(["peft2lorapth", str(tmp_path / "adapter"), str(tmp_path / "back.pth")])
    assert max_abs_diff(torch.load(tmp_path / "back.pth", weights_only=True), original) == 0.0


def test_defaults_are_the_originals_adapter():
    gqa = tiny_model()  # 4 heads, 2 KV heads: k_proj and v_proj are not square
    assert square_linear_modules(gqa) == ["o_proj", "q_proj"]
    assert square_linear_modules(tiny_model(num_key_value_heads=4)) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    config = lora_config(gqa)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 8, 0.0)
    peft_model = get_peft_model(gqa, config)
    init_lora_like_minimind(peft_model, seed=0)
    a = torch.cat([p.flatten() for n, p in peft_model.named_parameters() if "lora_A" in n])
    b = torch.cat([p.flatten() for n, p in peft_model.named_parameters() if "lora_B" in n])
    assert a.std().item() == pytest.approx(0.02, rel=0.1) and a.mean().abs() < 0.005 and torch.all(b == 0)
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and ("q_proj" in n or "o_proj" in n) for n in trained)

    # B·A·x is added unscaled: with B set, the output moves by exactly B·A·x.
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 32)
    delta = layer(x) - layer.base_layer(x)
    by_hand = x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    assert torch.allclose(delta, by_hand, atol=1e-6)


def write_lora_recipe(tmp_path: Path, base: Path, name: str = "recipe.yaml", **overrides) -> Path:
    write_sft_data(tmp_path / "sft.jsonl")
    keys = {"model_name_or_path": str(base), "max_steps": 4, "save_steps": 2, "logging_steps": 1, **overrides}
    return write_tiny_recipe(tmp_path, name, **keys)


@pytest.fixture
def base_dir(tmp_path) -> Path:
    return save_hf_dir(tiny_model(), tmp_path / "base")


def test_recipe_trains_only_the_adapter_and_leaves_the_base_untouched(tmp_path, base_dir):
    before = file_hashes(base_dir)
    lora.main(["--config", str(write_lora_recipe(tmp_path, base_dir, save_pth=True))])
    out = tmp_path / "out"
    assert file_hashes(base_dir) == before, "the base model's files changed"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "model_complete.json"} <= set(
        p.name for p in out.iterdir()
    )
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 8, ["o_proj", "q_proj"])
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert all(adapter[k].abs().max() > 0 for k in adapter if ".lora_B." in k), "B learned from zero"

    # Merged, only the adapted weights differ from the base; the LM head is still the embedding.
    base = load_model(base_dir).state_dict()
    merged = load_model(out).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "o_proj.weight")) for k in changed)

    # The original's adapter file is written too, and equals the PEFT adapter.
    pth = out / "lora_identity_32.pth"
    from_pth = load_lora_pth(load_model(base_dir), pth).merge_and_unload().state_dict()
    assert max_abs_diff(from_pth, merged) < 1e-6


@pytest.mark.slow
def test_adapter_directory_is_a_model_source_and_merges_into_a_full_model(tmp_path, base_dir):
    lora.main(["--config", str(write_lora_recipe(tmp_path, base_dir, max_steps=2))])
    out = tmp_path / "out"
    merged, tokenizer = load_model_and_tokenizer(out)
    peft_model = PeftModel.from_pretrained(load_model(base_dir), str(out))
    assert torch.allclose(peft_logits(peft_model), peft_logits(merged), atol=1e-5)

    result = subprocess.run(
        [sys.executable, "-m", "minimind_hf.convert", "merge-lora", str(out), str(tmp_path / "merged")],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    full = load_model(tmp_path / "merged")
    assert full.lm_head.weight is full.model.embed_tokens.weight, "the tied LM head survived the merge"
    assert max_abs_diff(full.state_dict(), merged.state_dict()) == 0.0
    assert (tmp_path / "merged" / "model_complete.json").is_file()
    assert json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"] == 2

    # The SFT recipe starts from the adapter directory (merged) like from any model.
    sft.main(["--config", str(write_tiny_recipe(tmp_path, "sft.yaml", model_name_or_path=str(out),
                                                output_dir=str(tmp_path / "sft_out")))])  # fmt: skip
    assert (tmp_path / "sft_out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_resume_is_exact_and_a_run_killed_in_its_final_save_publishes_its_adapter(tmp_path, base_dir):
    lora.main(["--config", str(write_lora_recipe(tmp_path, base_dir, "straight.yaml", output_dir=str(tmp_path / "a")))])
    interrupted = write_lora_recipe(tmp_path, base_dir, "interrupted.yaml", output_dir=str(tmp_path / "b"))
    lora.main(["--config", str(interrupted)])
    out = tmp_path / "b"
    shutil.rmtree(out / "checkpoint-4")
    for lost in ["adapter_model.safetensors", "adapter_config.json", "model_complete.json"]:
        (out / lost).unlink()
    lora.main(["--config", str(interrupted), "--resume_from_checkpoint", "true"])
    straight = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert max_abs_diff(straight, load_file(out / "adapter_model.safetensors")) == 0.0

    # Killed after checkpoint-4 was sealed, during the final save: the recipe publishes that adapter.
    for lost in ["adapter_model.safetensors", "adapter_config.json", "model_complete.json"]:
        (out / lost).unlink()
    trainer = lora.main(["--config", str(interrupted), "--resume_from_checkpoint", "true"])
    assert trainer.state.global_step == 4
    assert max_abs_diff(straight, load_file(out / "adapter_model.safetensors")) == 0.0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir.resolve())


@pytest.mark.slow
def test_bad_adapters_and_recipes_name_the_problem(shared_fixtures, tmp_path):
    model, _ = fixture_model(shared_fixtures)
    pth = shared_fixtures / "minimind_reference" / "lora" / "dense_lora_r4.pth"
    state = torch.load(pth, weights_only=True)

    torch.save({k: v for k, v in state.items() if not k.endswith("q_proj.lora.B.weight")}, tmp_path / "half.pth")
    with pytest.raises(LoraFileError, match="q_proj has lora.A without its other half"):
        load_lora_pth(model, tmp_path / "half.pth")
    torch.save({k.replace("q_proj", "gate"): v for k, v in state.items()}, tmp_path / "names.pth")
    with pytest.raises(LoraFileError, match="no nn.Linear model.layers.0.self_attn.gate"):
        load_lora_pth(model, tmp_path / "names.pth")
    small = tiny_model()  # 32 wide: the fixture's 64-wide adapter does not fit
    with pytest.raises(LoraFileError, match="check the model sizes"):
        load_lora_pth(small, pth)

    with pytest.raises(RecipeError, match="model_name_or_path: LoRA adapts an existing model"):
        lora.main(["--config", str(write_lora_recipe(tmp_path, tmp_path, model_name_or_path=None))])
    result = subprocess.run(
        [sys.executable, "-m", "minimind_hf.convert", "peft2lorapth", str(tmp_path / "nothing"), str(tmp_path / "x")],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_minimind3_rank16_on_square_linears_merges_and_exports_to_qwen3(shared_fixtures, tmp_path):
    """MiniMind-3's default adapter (rank 16 on the square Linears), merged with `convert merge-lora` into a
    MiniMind-3 model that `convert hf2qwen3` exports; the Qwen3 export gives the merged model's logits."""
    from transformers import Qwen3ForCausalLM

    from minimind_hf import MiniMind3ForCausalLM
    from minimind_hf.convert import main as convert
    from minimind_hf.testing import save_minimind3_dir, tiny_minimind3_model

    tokenizer_dir = shared_fixtures / "minimind3_reference" / "tokenizer"
    base = save_minimind3_dir(tiny_minimind3_model(), tmp_path / "base", tokenizer_dir)
    recipe = write_lora_recipe(
        tmp_path, base, tokenizer_name_or_path=str(tokenizer_dir), config_overrides="", max_length=128
    )
    lora.main(["--config", str(recipe)])
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (16, 16, ["o_proj", "q_proj"])

    convert(["merge-lora", str(tmp_path / "out"), str(tmp_path / "merged")])
    merged = load_model(tmp_path / "merged")
    assert isinstance(merged, MiniMind3ForCausalLM)
    before = load_model(base).state_dict()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.endswith(("q_proj.weight", "o_proj.weight")) for k in changed)

    convert(["hf2qwen3", str(tmp_path / "merged"), str(tmp_path / "qwen3")])
    qwen3 = Qwen3ForCausalLM.from_pretrained(tmp_path / "qwen3").eval()
    ids = torch.tensor([[1, 300, 301, 302, 2]])
    with torch.no_grad():
        assert torch.allclose(qwen3(ids).logits, merged.eval()(ids).logits, atol=1e-5)
