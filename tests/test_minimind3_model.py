"""MiniMind-3 against the original's reference outputs, its config, its router loss and its place beside MiniMind2."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minimind_hf import MiniMind3Config, MiniMind3ForCausalLM, MiniMindConfig, MiniMindForCausalLM
from minimind_hf.configuration_minimind3 import minimind_generation
from minimind_hf.formats.minimind3_pth import load_minimind3_pth

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)


def reference(shared_fixtures, attn: str = "sdpa"):
    root = shared_fixtures / "minimind3_reference"
    path = root / "m3_dense_fp16.pth"
    model = load_minimind3_pth(path, torch.load(path, weights_only=True)).eval()
    model.set_attn_implementation(attn)
    return model, torch.load(root / "m3_dense_expected.pt", weights_only=True)


def test_defaults_are_minimind3s():
    config = MiniMind3Config()
    assert (config.hidden_size, config.num_hidden_layers) == (768, 8)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 4, 96)
    assert config.intermediate_size == math.ceil(768 * math.pi / 64) * 64 == 2432
    assert config.moe_intermediate_size == 2432
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (4, 1, True)
    assert config.router_aux_loss_coef == 5e-4 and config.rms_norm_eps == 1e-6
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert config.max_position_embeddings == 32768 and config.vocab_size == 6400
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert config.tie_word_embeddings and not config.use_moe
    yarn = MiniMind3Config(inference_rope_scaling=True).rope_parameters
    assert yarn == {
        "rope_type": "yarn",
        "factor": 16.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 2048,
        "attention_factor": 1.0,
        "rope_theta": 1e6,
    }
    # MiniMind2 keeps its own defaults.
    assert MiniMindConfig().rms_norm_eps == 1e-5 and MiniMindConfig().num_key_value_heads == 2


def test_fixture_config_is_read_from_tensor_shapes(shared_fixtures):
    model, _ = reference(shared_fixtures)
    wanted = json.loads((shared_fixtures / "minimind3_reference" / "configs.json").read_text())["m3_dense"]
    assert model.config.rope_parameters["rope_theta"] == wanted.pop("rope_theta")
    for key, value in wanted.items():
        assert getattr(model.config, key) == value, key


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_and_loss_match_original(shared_fixtures, attn):
    model, expected = reference(shared_fixtures, attn)
    with torch.no_grad():
        out = model(expected["input_ids"], labels=expected["input_ids"])
    diff = (out.logits - expected["logits"]).abs().max().item()
    print(f"m3_dense/{attn}: max |logits - original| = {diff:.2e}")
    assert diff <= 1e-4
    assert abs(out.loss.item() - expected["loss"].item()) <= 1e-5


def test_greedy_generation_matches_original(shared_fixtures):
    model, expected = reference(shared_fixtures)
    out = model.generate(expected["greedy_prompt"], max_new_tokens=12, do_sample=False, use_cache=True)
    assert out.tolist() == expected["greedy"].tolist()


def original_config_dict(**fields) -> dict:
    """A config.json as the original's MiniMind-3 writes it: model_type "minimind", remote-code auto_map."""
    config = {k: v for k, v in MiniMind3Config(**fields).to_dict().items() if k != "rope_parameters"}
    config.update(
        model_type="minimind",
        rope_theta=1e6,
        rope_scaling=None,
        flash_attn=True,
        auto_map={
            "AutoConfig": "model_minimind.MiniMindConfig",
            "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM",
        },
    )
    return config


def test_generation_recognised_by_fields(tmp_path):
    original3 = original_config_dict(**TINY, head_dim=24)
    assert minimind_generation(original3) == 3
    assert minimind_generation(MiniMindConfig().to_dict()) == 2
    assert minimind_generation({"model_type": "minimind", "hidden_size": 512}) == 2
    with pytest.raises(ValueError, match="both"):
        minimind_generation({"model_type": "minimind", "num_experts": 4, "n_routed_experts": 4})
    (tmp_path / "config.json").write_text(json.dumps(original3))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MiniMind3Config and config.head_dim == 24 and not hasattr(config, "auto_map")
    assert type(AutoModelForCausalLM.from_config(config)) is MiniMind3ForCausalLM


@pytest.mark.parametrize("generation", [2, 3])
def test_saved_model_reloads_as_its_generation(tmp_path, generation):
    torch.manual_seed(0)
    cls, config = (MiniMindForCausalLM, MiniMindConfig) if generation == 2 else (MiniMind3ForCausalLM, MiniMind3Config)
    model = cls(config(**TINY, use_moe=True)).eval()
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is cls
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def reference_aux_loss(router_logits, n_experts: int, top_k: int, coef: float) -> float:
    """The original's formula written out slot by slot and expert by expert."""
    total = 0.0
    for logits in router_logits:
        probs = logits.double().softmax(-1)
        chosen = probs.topk(top_k, dim=-1).indices
        for i in range(n_experts):
            f_i = sum((chosen[:, slot] == i).double().mean() for slot in range(top_k))
            total += coef * n_experts * f_i * probs[:, i].mean()
    return float(total.detach())


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_aux_loss_is_the_originals(top_k):
    torch.manual_seed(1)
    config = MiniMind3Config(**{**TINY, "num_hidden_layers": 3}, use_moe=True, num_experts_per_tok=top_k)
    model = MiniMind3ForCausalLM(config).train()
    ids = torch.randint(0, 300, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # padding counts all the same
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 3
    wanted = reference_aux_loss(out.router_logits, 4, top_k, 5e-4)
    assert out.aux_loss.item() == pytest.approx(wanted, rel=1e-5)
    lm = model.loss_function(logits=out.logits, labels=ids, vocab_size=300)
    assert out.loss.item() == pytest.approx(lm.item() + wanted, rel=1e-6)
    # Eval mode: no router loss, as for MiniMind2.
    assert model.eval()(ids).aux_loss is None


def test_topk_weights_renormalised_for_any_k():
    torch.manual_seed(2)
    model = MiniMind3ForCausalLM(MiniMind3Config(**TINY, use_moe=True, num_experts_per_tok=1))
    _, weights, _ = model.model.layers[0].mlp.gate(torch.randn(5, 64))
    assert torch.allclose(weights, torch.ones_like(weights))


def test_unused_experts_get_a_zero_gradient():
    torch.manual_seed(3)
    model = MiniMind3ForCausalLM(MiniMind3Config(**TINY, use_moe=True)).train()
    ids = torch.randint(0, 300, (1, 2))  # 2 tokens, top-1: at most 2 of the 4 experts per layer
    out = model(ids, output_router_logits=True)
    (out.logits.pow(2).mean() + out.aux_loss).backward()  # every token's output counts
    assert all(p.grad is not None for p in model.parameters())
    for layer, logits in zip(model.model.layers, out.router_logits, strict=True):
        used = set(logits.argmax(-1).tolist())
        grad = layer.mlp.experts.gate_up_proj.grad
        for e in range(4):
            assert (grad[e].abs().sum() > 0) == (e in used), (e, used)
        assert len(used) < 4
