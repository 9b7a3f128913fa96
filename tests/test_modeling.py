"""The model against the original's reference outputs, and its behaviour as a transformers model."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from minimind_hf import MiniMindConfig, MiniMindForCausalLM
from minimind_hf.formats.pth import load_pth

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


def reference(shared_fixtures, name: str, attn: str = "sdpa"):
    root = shared_fixtures / "minimind_reference"
    config = MiniMindConfig(**json.loads((root / "configs.json").read_text())[name])
    model = load_pth(root / f"{name}_fp16.pth", config)
    model.set_attn_implementation(attn)
    expected = torch.load(root / f"{name}_expected.pt", weights_only=True)
    return model.eval(), expected


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_logits_match_original(shared_fixtures, name, attn):
    model, expected = reference(shared_fixtures, name, attn)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    diff = (logits - expected["logits"]).abs().max().item()
    print(f"{name}/{attn}: max |logits - original| = {diff:.2e}")
    assert diff <= 2e-6  # README, "The model"


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_incremental_decoding_matches_original(shared_fixtures, name):
    model, expected = reference(shared_fixtures, name)
    ids = expected["input_ids"]
    cache = DynamicCache(config=model.config)
    last = []
    with torch.no_grad():
        out = model(ids[:, :30], cache=cache, use_cache=True)
        last.append(out.logits[:, -1])
        for pos in range(30, ids.shape[1]):
            out = model(ids[:, pos : pos + 1], cache=out.cache, use_cache=True)
            last.append(out.logits[:, -1])
    diff = (torch.stack(last, dim=1) - expected["decode_last_logits"]).abs().max().item()
    print(f"{name}: max |cached decode logits - original| = {diff:.2e}")
    assert diff <= 2e-6  # README, "The model"


def test_moe_aux_loss_matches_original(shared_fixtures):
    model, expected = reference(shared_fixtures, "moe")
    out = model.train()(expected["input_ids"])
    rel = abs(out.aux_loss.item() - expected["train_aux_loss"]) / expected["train_aux_loss"]
    print(f"moe aux loss {out.aux_loss.item():.6f} vs original {expected['train_aux_loss']:.6f} (rel {rel:.1e})")
    assert rel <= 1e-6  # README, "The model"
    assert model.eval()(expected["input_ids"]).aux_loss is None


def test_moe_training_loss_is_lm_plus_aux():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, use_moe=True)).train()
    ids = torch.randint(3, 128, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, lm + out.aux_loss)
    out.loss.backward()
    # Every expert's parameters get a gradient tensor, even an expert no token was routed to.
    assert all(p.grad is not None for p in model.parameters())


def test_loss_is_masked_mean_and_honours_num_items_in_batch():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY))
    ids = torch.randint(3, 128, (2, 10))
    labels = ids.clone()
    labels[0, :6] = -100
    out = model(ids, labels=labels)
    targets = labels[:, 1:]
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), targets.reshape(-1), reduction="sum", ignore_index=-100)
    torch.testing.assert_close(out.loss, ce / (targets != -100).sum())
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss, ce / 40)


def test_dense_equals_llama_with_same_weights():
    from transformers import LlamaForCausalLM

    from minimind_hf.formats.llama import llama_config

    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, rope_theta=5e5)).eval()
    llama = LlamaForCausalLM(llama_config(model.config)).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        diff = (model(ids).logits - llama(ids).logits).abs().max().item()
    print(f"MiniMind vs Llama, same weights: max diff {diff:.2e}")
    assert diff == 0.0


def test_packed_rows_equal_separate_sequences():
    torch.manual_seed(0)
    # Training mode (dropout is 0): the forward the trainer runs on packed rows, with no cache.
    model = MiniMindForCausalLM(MiniMindConfig(**TINY)).train()
    a, b = torch.randint(3, 128, (1, 7)), torch.randint(3, 128, (1, 5))
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        together = model(packed, position_ids=position_ids).logits
        apart = torch.cat([model(a).logits, model(b).logits], dim=1)
        assert torch.equal(model.eval()(packed, position_ids=position_ids, use_cache=False).logits, together)
    diff = (together - apart).abs().max().item()
    print(f"packed vs separate: max diff {diff:.2e}")
    assert diff <= 1e-5


def test_greedy_generate_equals_argmax_loop():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY)).eval()
    prompt = torch.randint(3, 128, (1, 6))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_left_padded_batch_generates_like_single_prompts():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY)).eval()
    prompts = [torch.randint(3, 128, (n,)) for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)[:, width:]
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)[0, len(p) :]
        assert torch.equal(together[row], alone), f"prompt {row} differs when left-padded in a batch"


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    config = MiniMindConfig(**TINY, use_moe=True)
    ids = torch.randint(3, 128, (2, 10))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = MiniMindForCausalLM(config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_tied_embeddings_and_init():
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, use_moe=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    std = model.model.layers[0].mlp.gate.weight.std().item()
    assert 0.01 < std < 0.03, "router weight should get the standard normal(0, initializer_range) init"
    assert torch.equal(model.model.norm.weight, torch.ones(64))


def test_config_defaults_and_validation():
    config = MiniMindConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (512, 8, 1408)
    assert MiniMindConfig(hidden_size=768).intermediate_size == 2048
    assert config.rope_parameters["rope_theta"] == 1e6
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    n_params = sum(p.numel() for p in MiniMindForCausalLM(config).parameters())
    assert 25e6 < n_params < 27e6, n_params
    with pytest.raises(Exception, match="divisible by num_attention_heads"):
        MiniMindConfig(hidden_size=100)
    with pytest.raises(Exception, match="must be positive"):
        MiniMindConfig(num_hidden_layers=0)


@pytest.mark.parametrize("use_moe", [False, True])
def test_save_and_reload_with_auto_classes(tmp_path, use_moe):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, use_moe=use_moe)).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is MiniMindForCausalLM
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        # Equal weights; float32 kernels may round differently on freshly mapped memory, hence not bit-equal.
        torch.testing.assert_close(model(ids).logits, reloaded(ids).logits)


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, use_moe=True)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["minimind_hf"] = None  # the package must not be importable here
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
assert "minimind_hf" not in type(model).__module__, type(model).__module__
expected = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"])
print("remote-code ok", type(model).__module__)
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-code ok" in result.stdout
