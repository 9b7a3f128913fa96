"""MiniMind-3 as transformers' Qwen3 / Qwen3-MoE, both ways.

`minimind-3` is published as `Qwen3ForCausalLM` and `minimind-3-moe` as `Qwen3MoeForCausalLM` (the original's
`convert_torch2transformers`). Their state dicts have exactly MiniMind-3's keys (transformers 5 fuses the experts
the same way), so only the configs are translated. What the original's export leaves out:

- `router_aux_loss_coef`: never set by it, so its config.json has Qwen3-MoE's default 0.001 (transformers 5 writes
  it) or nothing (transformers 4 writes only non-defaults). Either is read as MiniMind-3's 5e-4, the value those
  models were trained with; any other value (ours writes MiniMind-3's own) is kept.
- YaRN and bos/eos/pad ids: carried when present, MiniMind-3's ids (1/2/0) otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from ..configuration_minimind3 import MiniMind3Config
from ..modeling_minimind3 import MiniMind3ForCausalLM

QWEN3_MODEL_TYPES = ("qwen3", "qwen3_moe")
QWEN3_MOE_DEFAULT_AUX_COEF = Qwen3MoeConfig.router_aux_loss_coef


def qwen3_config(config: MiniMind3Config) -> Qwen3Config | Qwen3MoeConfig:
    """The `Qwen3Config` (dense) or `Qwen3MoeConfig` (MoE) whose model computes what MiniMind-3 computes."""
    common: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        # Written explicitly: Qwen3 would otherwise assume hidden / heads.
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": dict(config.rope_parameters),
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": config.dropout,
        "use_sliding_window": False,
        "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }
    if not config.use_moe:
        return Qwen3Config(**common)
    return Qwen3MoeConfig(
        **common,
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size,
        norm_topk_prob=config.norm_topk_prob,
        router_aux_loss_coef=config.router_aux_loss_coef,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def to_qwen3(model: MiniMind3ForCausalLM, out_dir: str | os.PathLike) -> Qwen3ForCausalLM | Qwen3MoeForCausalLM:
    """Write a MiniMind-3 model as a `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` directory (no tokenizer)."""
    if not isinstance(model.config, MiniMind3Config):
        raise ValueError("only a MiniMind-3 model exports as Qwen3 (MiniMind2 has no QK-norm; use hf2llama)")
    config = qwen3_config(model.config)
    cls = Qwen3MoeForCausalLM if model.config.use_moe else Qwen3ForCausalLM
    qwen = cls(config).to(model.dtype)
    qwen.load_state_dict(model.state_dict(), strict=True)
    qwen.generation_config = model.generation_config
    qwen.save_pretrained(out_dir)
    return qwen


def minimind3_config_from_qwen3(
    qwen: Qwen3Config | Qwen3MoeConfig, raw: dict[str, Any], source: str = "the Qwen3 checkpoint"
) -> MiniMind3Config:
    """The `MiniMind3Config` of a Qwen3(-MoE) config (`raw`: its config.json); a `ValueError` naming the field
    when MiniMind-3 cannot represent it."""
    moe = isinstance(qwen, Qwen3MoeConfig)
    rope = dict(qwen.rope_parameters or {})
    refusals = {
        "attention_bias": (bool(qwen.attention_bias), "MiniMind-3's attention has no biases"),
        "use_sliding_window": (bool(getattr(qwen, "use_sliding_window", False)), "MiniMind-3 attends to all tokens"),
        "rope_parameters.rope_type": (
            rope.get("rope_type", "default") not in ("default", "yarn"),
            f"MiniMind-3 has plain RoPE or YaRN, not {rope.get('rope_type')!r}",
        ),
        "mlp_only_layers": (moe and bool(qwen.mlp_only_layers), "every MiniMind-3 MoE layer has experts"),
        "decoder_sparse_step": (moe and qwen.decoder_sparse_step != 1, "every MiniMind-3 MoE layer has experts"),
    }
    for name, (refused, why) in refusals.items():
        if refused:
            raise ValueError(f"{source}: {name} cannot be represented by MiniMind-3 ({why})")
    fields: dict[str, Any] = {
        "vocab_size": qwen.vocab_size,
        "hidden_size": qwen.hidden_size,
        "intermediate_size": qwen.intermediate_size,
        "num_hidden_layers": qwen.num_hidden_layers,
        "num_attention_heads": qwen.num_attention_heads,
        "num_key_value_heads": qwen.num_key_value_heads or qwen.num_attention_heads,
        "head_dim": getattr(qwen, "head_dim", None) or qwen.hidden_size // qwen.num_attention_heads,
        "hidden_act": qwen.hidden_act,
        "max_position_embeddings": qwen.max_position_embeddings,
        "rms_norm_eps": qwen.rms_norm_eps,
        "rope_parameters": rope,
        "inference_rope_scaling": rope.get("rope_type") == "yarn",
        "tie_word_embeddings": bool(qwen.tie_word_embeddings),
        "dropout": float(qwen.attention_dropout or 0.0),
        "initializer_range": qwen.initializer_range,
        "use_moe": moe,
    }
    # MiniMind-3's own ids where the export left them out.
    for name, default in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        value = getattr(qwen, name, None)
        fields[name] = default if value is None else value
    if moe:
        fields.update(
            num_experts=qwen.num_experts,
            num_experts_per_tok=qwen.num_experts_per_tok,
            moe_intermediate_size=qwen.moe_intermediate_size,
            norm_topk_prob=qwen.norm_topk_prob,
        )
        # Qwen3-MoE's default (or no value) is what the original's export leaves: it dropped MiniMind-3's 5e-4.
        if raw.get("router_aux_loss_coef", QWEN3_MOE_DEFAULT_AUX_COEF) != QWEN3_MOE_DEFAULT_AUX_COEF:
            fields["router_aux_loss_coef"] = qwen.router_aux_loss_coef
    return MiniMind3Config(**fields)


def from_qwen3(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MiniMind3ForCausalLM:
    """A `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` directory (how `minimind-3` is published) as MiniMind-3."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    cls = Qwen3MoeForCausalLM if raw.get("model_type") == "qwen3_moe" else Qwen3ForCausalLM
    qwen = cls.from_pretrained(model_dir, dtype=torch.float32)
    config = minimind3_config_from_qwen3(qwen.config, raw, str(model_dir))
    model = MiniMind3ForCausalLM(config)
    model.load_state_dict(qwen.state_dict(), strict=True)
    model.generation_config = qwen.generation_config
    return model.to(dtype)
