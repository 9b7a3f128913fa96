"""Plain `LlamaForCausalLM` checkpoints, both ways: how the dense MiniMind2 is published, and what vLLM,
llama.cpp and the rest take as is. A dense MiniMind computes exactly what its Llama twin computes."""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..configuration_minimind import MiniMindConfig
from ..modeling_minimind import MiniMindForCausalLM
from .pth import TIED


def llama_config(config: MiniMindConfig) -> LlamaConfig:
    """The `LlamaConfig` whose model computes exactly what a dense MiniMind computes."""
    if config.use_moe:
        raise ValueError(
            "an MoE MiniMind has no Llama equivalent (Llama has no routed or shared experts); "
            "export a dense model, or keep the MiniMind checkpoint (it loads with trust_remote_code=True)"
        )
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        attention_dropout=config.dropout,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def to_llama(model: MiniMindForCausalLM, out_dir: str | os.PathLike) -> LlamaForCausalLM:
    """Export a dense model as a `LlamaForCausalLM` checkpoint (for vLLM, llama.cpp, ...)."""
    llama = LlamaForCausalLM(llama_config(model.config)).to(model.dtype)
    llama.load_state_dict(model.state_dict(), strict=True)
    llama.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    return llama


def minimind_config_from_llama(llama: LlamaConfig, source: str = "the Llama checkpoint") -> MiniMindConfig:
    """The dense `MiniMindConfig` that computes exactly what `llama` computes; a `ValueError` naming the field
    when MiniMind cannot represent it (biases, another activation, rope scaling, another head size)."""
    rope = dict(llama.rope_parameters or {})
    refusals = {
        "attention_bias": (bool(getattr(llama, "attention_bias", False)), "MiniMind's attention has no biases"),
        "mlp_bias": (bool(getattr(llama, "mlp_bias", False)), "MiniMind's MLP has no biases"),
        "hidden_act": (llama.hidden_act != "silu", f"MiniMind uses silu, not {llama.hidden_act!r}"),
        "rope_parameters.rope_type": (
            rope.get("rope_type", "default") != "default",
            f"MiniMind trains with plain RoPE, not {rope.get('rope_type')!r} scaling",
        ),
        "head_dim": (
            getattr(llama, "head_dim", None) not in (None, llama.hidden_size // llama.num_attention_heads),
            "MiniMind's head size is hidden_size / num_attention_heads",
        ),
    }
    for name, (refused, why) in refusals.items():
        if refused:
            raise ValueError(f"{source}: {name} cannot be represented by MiniMind ({why})")
    return MiniMindConfig(
        vocab_size=llama.vocab_size,
        hidden_size=llama.hidden_size,
        intermediate_size=llama.intermediate_size,
        num_hidden_layers=llama.num_hidden_layers,
        num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads or llama.num_attention_heads,
        max_position_embeddings=llama.max_position_embeddings,
        rms_norm_eps=llama.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope.get("rope_theta", 10000.0)},
        dropout=float(getattr(llama, "attention_dropout", 0.0) or 0.0),
        pad_token_id=llama.pad_token_id,
        bos_token_id=llama.bos_token_id,
        eos_token_id=llama.eos_token_id,
        tie_word_embeddings=True,
    )


def from_llama(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MiniMindForCausalLM:
    """A `LlamaForCausalLM` directory (MiniMind's own Llama export, or ours) as a dense MiniMind model.

    MiniMind ties its LM head to the embedding: an untied head is accepted only when it equals the embedding.
    """
    llama = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = minimind_config_from_llama(llama.config, str(model_dir))
    state = llama.state_dict()
    if not torch.equal(state[TIED[0]], state[TIED[1]]):
        raise ValueError(
            f"{model_dir}: tie_word_embeddings is false and lm_head.weight differs from the embedding; MiniMind "
            "ties them, so this head cannot be represented"
        )
    model = MiniMindForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.generation_config = llama.generation_config
    return model.to(dtype)
