"""MiniMind-3's original `.pth`: an fp16 `state_dict` with Qwen3's key names, read and written.

The file carries no config, but every size is in the tensor shapes: `hidden_size` and `vocab_size` from the
embedding, `head_dim` from `q_norm`, the head counts from the q/k projections over `head_dim`, the layer count from
the layer indices, the (MoE) intermediate sizes and expert count from the MLP, and tying from whether `lm_head`
equals the embedding (the original writes both names even when tied). What no shape shows (`num_experts_per_tok`,
`norm_topk_prob`, `router_aux_loss_coef`, `rms_norm_eps`, `rope_theta`, YaRN) takes MiniMind-3's defaults, as the
original's own command lines do; options given by the user win over both, and a tensor that then disagrees is
named. Experts are stored one by one (`mlp.experts.{e}.{gate,up,down}_proj.weight`)
and fused here into transformers' `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj` [E, H, I].
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..configuration_minimind3 import MiniMind3Config
from ..modeling_minimind3 import MiniMind3ForCausalLM
from .precision import narrow

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def is_minimind3_state(keys: Any) -> bool:
    """MiniMind-3 has QK-norm; MiniMind2 has none."""
    return any(key.endswith("self_attn.q_norm.weight") for key in keys)


def _shape(state: dict[str, torch.Tensor], key: str, path: Path) -> torch.Size:
    if key not in state:
        raise ValueError(f"{path}: no {key} (not a MiniMind-3 .pth)")
    return state[key].shape


def config_from_state(
    state: dict[str, torch.Tensor], path: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> MiniMind3Config:
    """The `MiniMind3Config` the tensor shapes describe, with `overrides` (the user's options) on top."""
    path = Path(path)
    vocab_size, hidden_size = _shape(state, EMBED, path)
    layers = {int(m.group(1)) for k in state if (m := re.match(r"^model\.layers\.(\d+)\.", k))}
    head_dim = _shape(state, "model.layers.0.self_attn.q_norm.weight", path)[0]
    use_moe = "model.layers.0.mlp.gate.weight" in state
    sizes: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": max(layers) + 1 if layers else 0,
        "head_dim": head_dim,
        "num_attention_heads": _shape(state, "model.layers.0.self_attn.q_proj.weight", path)[0] // head_dim,
        "num_key_value_heads": _shape(state, "model.layers.0.self_attn.k_proj.weight", path)[0] // head_dim,
        "use_moe": use_moe,
        # A head that is the embedding is tied, whether or not the file repeats it under both names.
        "tie_word_embeddings": HEAD not in state or torch.equal(state[HEAD], state[EMBED]),
    }
    if use_moe:
        sizes["num_experts"] = _shape(state, "model.layers.0.mlp.gate.weight", path)[0]
        sizes["moe_intermediate_size"] = _shape(state, "model.layers.0.mlp.experts.0.gate_proj.weight", path)[0]
    else:
        sizes["intermediate_size"] = _shape(state, "model.layers.0.mlp.gate_proj.weight", path)[0]
    sizes.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return MiniMind3Config(**sizes)


def fuse_experts(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert `{gate,up,down}_proj` tensors as transformers' fused `gate_up_proj` / `down_proj`."""
    fused, parts = {}, {}
    for key, tensor in state.items():
        match = _EXPERT.match(key)
        if match:
            parts[(match.group(1), int(match.group(2)), match.group(3))] = tensor
        else:
            fused[key] = tensor
    for prefix in sorted({p for p, _, _ in parts}):
        wanted = [(e, w) for e in range(num_experts) for w in ("gate", "up", "down")]
        missing = [f"{prefix}.{e}.{w}_proj.weight" for e, w in wanted if (prefix, e, w) not in parts]
        if missing:
            raise ValueError(f"missing expert tensors: {missing[:4]}")
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(prefix, e, "gate")], parts[(prefix, e, "up")]]) for e in range(num_experts)]
        )
        fused[f"{prefix}.down_proj"] = torch.stack([parts[(prefix, e, "down")] for e in range(num_experts)])
    return fused


def unfuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors as the original's one `{gate,up,down}_proj.weight` per expert."""
    out = {}
    for key, tensor in state.items():
        match = _FUSED.match(key)
        if not match:
            out[key] = tensor
        elif match.group(2) == "gate_up_proj":
            for e, gate_up in enumerate(tensor):
                gate, up = gate_up.chunk(2, dim=0)
                out[f"{match.group(1)}.{e}.gate_proj.weight"] = gate
                out[f"{match.group(1)}.{e}.up_proj.weight"] = up
        else:
            for e, down in enumerate(tensor):
                out[f"{match.group(1)}.{e}.down_proj.weight"] = down
    return out


def load_minimind3_pth(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> MiniMind3ForCausalLM:
    """A MiniMind-3 model from the original's `.pth` state dict (already read from `path`), sized by its shapes.

    Strict: a missing, unexpected or wrongly shaped tensor is an error naming it.
    """
    path = Path(path)
    config = config_from_state(state, path, overrides)
    state = fuse_experts(state, config.num_experts) if config.use_moe else dict(state)
    if config.tie_word_embeddings:
        if HEAD in state and not torch.equal(state[HEAD], state[EMBED]):
            raise ValueError(f"{path}: {HEAD} differs from {EMBED}, but tie_word_embeddings is set")
        state[HEAD] = state[EMBED]
    model = MiniMind3ForCausalLM(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: keys do not match a MiniMind-3 model with hidden_size={config.hidden_size}, "
            f"num_hidden_layers={config.num_hidden_layers}, use_moe={config.use_moe}; "
            f"missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but the config expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def minimind3_pth_state(model: MiniMind3ForCausalLM) -> dict[str, torch.Tensor]:
    """The original's `.pth` content: fp16, Qwen3 key names, experts one by one, `lm_head` even when tied.

    A weight beyond fp16's range would be written as inf: refused, naming it.
    """
    state = unfuse_experts({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
    if model.config.tie_word_embeddings:
        state[HEAD] = state[EMBED]
    # The same check as MiniMind2's save_pth (`precision.narrow`), so both refuse with one message.
    return {k: v.clone() for k, v in narrow(state, torch.float16, "the .pth").items()}
