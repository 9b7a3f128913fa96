"""The original's LoRA adapter files (`save_lora`: `<module path>.lora.A.weight` / `.lora.B.weight`, e.g.
`lora_identity_512.pth`), read into and written from PEFT adapters. The original adds `B(A(x))` unscaled, so
alpha = rank on the way in, and PEFT's scaling is folded into B on the way out.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from ..checkpointing import atomic_write
from ..errors import LoraFileError
from .precision import narrow
from .pth import read_state_dict

PTH_A, PTH_B = ".lora.A.weight", ".lora.B.weight"
# PEFT's saved keys: `base_model.model.<module path>.lora_A.weight` (no adapter name).
PEFT_PREFIX = "base_model.model."
PEFT_A, PEFT_B = ".lora_A.weight", ".lora_B.weight"

__all__ = ["LoraFileError", "load_lora_pth", "lora_pth_state", "read_lora_pth", "save_lora_pth", "set_base_model"]


def read_lora_pth(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module path: (A, B)}` of an original adapter file, checked for pairs and shapes (rank = A's rows)."""
    path = Path(path)
    raw = read_state_dict(path, "LoRA .pth", error=LoraFileError)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        for suffix, half in ((PTH_A, "A"), (PTH_B, "B")):
            if key.endswith(suffix):
                halves.setdefault(key[: -len(suffix)], {})[half] = tensor
                break
        else:
            raise LoraFileError(f"{path}: {key} is not a LoRA tensor (<module>{PTH_A} or <module>{PTH_B})")
    pairs = {}
    for module, half in sorted(halves.items()):
        if set(half) != {"A", "B"}:
            raise LoraFileError(f"{path}: {module} has lora.{''.join(half)} without its other half")
        a, b = half["A"], half["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise LoraFileError(f"{path}: {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not chain")
        pairs[module] = (a, b)
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise LoraFileError(f"{path}: the adapters have different ranks {sorted(ranks)}")
    return pairs


def load_lora_pth(model: nn.Module, path: str | os.PathLike) -> PeftModel:
    """`model` with an original adapter file applied: a `PeftModel` whose logits equal the original's
    `apply_lora(model)` + `load_lora(model, path)` (alpha = rank, so B·A·x is added unscaled)."""
    pairs = read_lora_pth(path)
    modules = dict(model.named_modules())
    for name, (a, b) in pairs.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise LoraFileError(f"{path}: the model has no nn.Linear {name}")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise LoraFileError(
                f"{path}: {name} is {module.out_features}x{module.in_features} in the model, but its adapter maps "
                f"{a.shape[1]} -> {b.shape[0]}; check the model sizes"
            )
    rank = next(iter(pairs.values()))[0].shape[0]
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=sorted(pairs), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    dtype = next(model.parameters()).dtype
    state = {}
    for name, (a, b) in pairs.items():
        state[f"{PEFT_PREFIX}{name}{PEFT_A}"] = a
        state[f"{PEFT_PREFIX}{name}{PEFT_B}"] = b
    # The model's dtype may be narrower than the file's: an overflow is refused, naming the tensor.
    state = narrow(state, dtype, str(path))
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise LoraFileError(f"{path}: tensors PEFT did not place: {result.unexpected_keys[:4]}")
    return peft_model


def lora_pth_state(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter in the original's `save_lora` naming. The original adds B·A·x unscaled, so PEFT's scaling
    (alpha / r) is folded into B; an adapter the original cannot represent (bias, DoRA, ...) is refused."""
    config = model.peft_config[adapter_name]
    if not isinstance(config, LoraConfig):
        raise ValueError(f"adapter {adapter_name!r} is {type(config).__name__}, not LoRA")
    refused = {
        "bias": config.bias != "none",
        "use_dora": bool(config.use_dora),
        "modules_to_save": bool(config.modules_to_save),
        "rank_pattern / alpha_pattern": bool(config.rank_pattern or config.alpha_pattern),
    }
    for what, bad in refused.items():
        if bad:
            raise ValueError(f"the original LoRA format has no {what}: this adapter cannot be written as a .pth")
    scale = (config.lora_alpha / config.r**0.5) if config.use_rslora else config.lora_alpha / config.r
    state = {}
    for key, tensor in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((PEFT_A, PEFT_B)):
            raise ValueError(f"{key}: not a LoRA A/B weight of a Linear; the original format cannot hold it")
        module = key[len(PEFT_PREFIX) : -len(PEFT_A)]
        if key.endswith(PEFT_A):
            state[module + PTH_A] = tensor.detach().to("cpu", torch.float32).clone()
        else:
            state[module + PTH_B] = (tensor.detach().to("cpu", torch.float32) * scale).clone()
    return state


def save_lora_pth(model: PeftModel, path: str | os.PathLike) -> Path:
    """Write the adapter as the original's `save_lora` file (float32 tensors, written atomically)."""
    state = lora_pth_state(model)
    path = Path(path)
    atomic_write(path, lambda handle: torch.save(state, handle))
    return path


def set_base_model(model: PeftModel, base: str | os.PathLike) -> None:
    """Record where the base model is (absolute), so that the adapter directory loads from anywhere."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = str(Path(base).resolve())
