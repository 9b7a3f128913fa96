"""Every form a MiniMind-3 checkpoint circulates in, through the one loader, and the exports to Qwen3 and `.pth`."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen3MoeConfig

from minimind_hf import MiniMind3Config, MiniMind3ForCausalLM
from minimind_hf.convert import main
from minimind_hf.formats.minimind3_pth import minimind3_pth_state
from minimind_hf.formats.qwen3 import from_qwen3, minimind3_config_from_qwen3, to_qwen3
from minimind_hf.loading import load_model, source_kind
from minimind_hf.testing import TOKENIZER_DIR

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
VARIANTS = {
    "dense": dict(),
    "dense_untied_head24": dict(tie_word_embeddings=False, head_dim=24, intermediate_size=96),
    "moe_top1": dict(use_moe=True),
    "moe_top2_untied": dict(use_moe=True, num_experts_per_tok=2, tie_word_embeddings=False, moe_intermediate_size=48),
}
IDS = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))


def tiny_m3(seed: int = 0, **fields) -> MiniMind3ForCausalLM:
    """A random MiniMind-3 in eval mode whose weights are all float16 values (so a .pth round trip is exact), with
    norm weights away from 1 so that QK-norm and the final norm matter."""
    torch.manual_seed(seed)
    model = MiniMind3ForCausalLM(MiniMind3Config(**TINY, **fields))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            param.copy_(param.half().float())
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def write_pth(model: MiniMind3ForCausalLM, path):
    torch.save(minimind3_pth_state(model), path)
    return path


def write_original_hf(model: MiniMind3ForCausalLM, directory):
    """The original's `convert_torch2transformers_minimind`: model_type "minimind", its fields, remote-code
    auto_map (to a file that is not there: it must never be run), per-expert weights with Qwen3's names."""
    directory.mkdir()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("rope_parameters", "model_type")}
    config.update(
        model_type="minimind",
        rope_theta=model.config.rope_parameters["rope_theta"],
        rope_scaling=None,
        flash_attn=True,
        architectures=["MiniMindForCausalLM"],
        auto_map={
            "AutoConfig": "model_minimind.MiniMindConfig",
            "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM",
        },
    )
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.float().contiguous() for k, v in minimind3_pth_state(model).items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def write_qwen3(model: MiniMind3ForCausalLM, directory):
    to_qwen3(model, directory)
    return directory


def write_ours(model: MiniMind3ForCausalLM, directory):
    model.save_pretrained(directory)
    return directory


FORMS = {"pth": write_pth, "original_hf": write_original_hf, "qwen3": write_qwen3, "ours": write_ours}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_form_loads_and_saves_with_equal_logits(tmp_path, variant, form):
    model = tiny_m3(**VARIANTS[variant])
    source = FORMS[form](model, tmp_path / "src")
    # A .pth shows no top-k (the original's command line gives it): top-1 unless told.
    top_k = model.config.num_experts_per_tok
    loaded = load_model(source, config_overrides=f"num_experts_per_tok={top_k}" if form == "pth" else "")
    assert type(loaded) is MiniMind3ForCausalLM
    for key in ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads", "use_moe"):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    expected = logits(model)
    diff = (logits(loaded) - expected).abs().max().item()
    print(f"{variant}/{form}: max |loaded - source| = {diff:.1e}")
    assert diff == 0.0
    loaded.save_pretrained(tmp_path / "saved")
    assert (logits(load_model(tmp_path / "saved")) - expected).abs().max().item() == 0.0


def test_pth_kind_and_minimind2_pth_still_detected(tmp_path):
    from minimind_hf.testing import tiny_model

    torch.save(minimind3_pth_state(tiny_m3()), tmp_path / "m3.pth")
    torch.save({k: v.half() for k, v in tiny_model().state_dict().items()}, tmp_path / "m2.pth")
    assert source_kind(tmp_path / "m3.pth") == "pth"
    assert type(load_model(tmp_path / "m3.pth")) is MiniMind3ForCausalLM
    m2 = load_model(
        tmp_path / "m2.pth",
        hidden_size=32,
        num_hidden_layers=2,
        config_overrides="num_attention_heads=4,num_key_value_heads=2",
    )
    assert type(m2).__name__ == "MiniMindForCausalLM"


def test_pth_options_override_and_a_mismatch_names_the_tensor(tmp_path):
    path = write_pth(tiny_m3(), tmp_path / "m3.pth")
    assert load_model(path, num_hidden_layers=2, hidden_size=64).config.num_hidden_layers == 2
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight has shape \(300, 64\)"):
        load_model(path, hidden_size=128, config_overrides="head_dim=16")
    with pytest.raises(ValueError, match=r"missing: \['model\.layers\.2\."):
        load_model(path, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"unexpected: \['model\.layers\.0\.mlp\.down_proj"):
        load_model(path, use_moe=True)


def test_qwen3_moe_router_coefficient(tmp_path):
    model = tiny_m3(use_moe=True, router_aux_loss_coef=0.01)
    to_qwen3(model, tmp_path / "q")
    assert from_qwen3(tmp_path / "q").config.router_aux_loss_coef == 0.01  # written: kept
    # The original's export sets no router_aux_loss_coef: Qwen3-MoE's 0.001 (transformers 5) or nothing (4.x).
    qwen = Qwen3MoeConfig(**TINY, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=64, head_dim=16)
    raw = qwen.to_diff_dict()
    assert raw["router_aux_loss_coef"] == 0.001
    assert minimind3_config_from_qwen3(qwen, raw).router_aux_loss_coef == 5e-4
    del raw["router_aux_loss_coef"]
    assert minimind3_config_from_qwen3(qwen, raw).router_aux_loss_coef == 5e-4
    assert minimind3_config_from_qwen3(qwen, raw).bos_token_id == 1


def test_qwen3_features_minimind3_lacks_are_refused():
    qwen = Qwen3MoeConfig(**TINY, num_experts=4, mlp_only_layers=[1])
    with pytest.raises(ValueError, match="mlp_only_layers cannot be represented"):
        minimind3_config_from_qwen3(qwen, {})
    with pytest.raises(ValueError, match="attention_bias cannot be represented"):
        minimind3_config_from_qwen3(Qwen3MoeConfig(**TINY, attention_bias=True), {})


PLAIN_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(name.startswith("minimind_hf") for name in sys.modules)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
print(type(model).__name__, AutoTokenizer.from_pretrained(sys.argv[1]).chat_template is not None)
"""


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dense", "moe_top2_untied"])
def test_hf2qwen3_loads_in_plain_transformers(tmp_path, variant):
    model = tiny_m3(**VARIANTS[variant], inference_rope_scaling=True)
    model.save_pretrained(tmp_path / "src")
    AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(str(tmp_path / "src"))
    main(["hf2qwen3", str(tmp_path / "src"), str(tmp_path / "qwen")])
    config = json.loads((tmp_path / "qwen" / "config.json").read_text())
    assert config["model_type"] == ("qwen3_moe" if model.config.use_moe else "qwen3")
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 16.0
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert config["head_dim"] == model.config.head_dim
    if model.config.use_moe:
        assert config["router_aux_loss_coef"] == 5e-4 and config["num_experts_per_tok"] == 2
    source_template = AutoTokenizer.from_pretrained(str(tmp_path / "src")).chat_template
    assert AutoTokenizer.from_pretrained(str(tmp_path / "qwen")).chat_template == source_template
    torch.save(IDS, tmp_path / "ids.pt")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_TRANSFORMERS,
            str(tmp_path / "qwen"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "l.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == [("Qwen3MoeForCausalLM" if model.config.use_moe else "Qwen3ForCausalLM"), "True"]
    diff = (torch.load(tmp_path / "l.pt") - logits(model)).abs().max().item()
    print(f"{variant}: max |plain Qwen3 - MiniMind-3| = {diff:.1e}")
    assert diff <= 1e-6


def test_hf2qwen3_refuses_minimind2(tmp_path, capsys):
    from minimind_hf.testing import tiny_model

    tiny_model().save_pretrained(tmp_path / "m2")
    with pytest.raises(SystemExit):
        main(["hf2qwen3", str(tmp_path / "m2"), str(tmp_path / "out"), "--no_tokenizer"])
    assert "no Qwen3 equivalent" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", ["dense", "moe_top2_untied"])
def test_hf2pth_writes_the_originals_pth(tmp_path, variant):
    model = tiny_m3(**VARIANTS[variant])
    model.save_pretrained(tmp_path / "src")
    main(["hf2pth", str(tmp_path / "src"), str(tmp_path / "m3.pth")])
    state = torch.load(tmp_path / "m3.pth", weights_only=True)
    assert all(t.dtype == torch.float16 for t in state.values())
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.1.self_attn.k_norm.weight"} <= set(state)
    if model.config.use_moe:
        assert state["model.layers.0.mlp.experts.3.up_proj.weight"].shape == (48, 64)
        assert state["model.layers.0.mlp.experts.3.down_proj.weight"].shape == (64, 48)
        assert not any("gate_up_proj" in k for k in state)
        # gate rows come first in the fused tensor, then up rows
        fused = model.model.layers[0].mlp.experts.gate_up_proj[3]
        assert torch.equal(state["model.layers.0.mlp.experts.3.gate_proj.weight"].float(), fused[:48])
    else:
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    top_k = f"num_experts_per_tok={model.config.num_experts_per_tok}"
    assert (logits(load_model(tmp_path / "m3.pth", config_overrides=top_k)) - logits(model)).abs().max().item() == 0.0
    if model.config.use_moe:
        assert load_model(tmp_path / "m3.pth").config.num_experts_per_tok == 1


def test_hf2pth_refuses_a_weight_beyond_fp16(tmp_path, capsys):
    model = tiny_m3()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = 1e6
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(SystemExit):
        main(["hf2pth", str(tmp_path / "src"), str(tmp_path / "m3.pth")])
    assert "model.layers.1.self_attn.o_proj.weight holds 1e+06, beyond fp16" in capsys.readouterr().err
    assert not (tmp_path / "m3.pth").exists()
