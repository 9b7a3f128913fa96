"""What the DPO, GRPO and distillation stages share about the model's generation and MiniMind-3's MoE loss.

TRL's trainers score log-probs through their fused LM head (`trl.trainer.utils.add_fused_lm_head`), which runs the
model's backbone directly and computes Mixtral's balance loss, and only for configs with `output_router_logits`.
MiniMind-3's original adds its own balance loss (`minimind3_aux_loss`) to every RL and preference loss, so these
stages ask the backbone for its router logits with a forward hook and score them themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..configuration_minimind3 import MiniMind3Config


def leave_balance_loss_to_the_stage(training_args) -> None:
    """Turn off TRL's own Mixtral balance loss (`router_aux_loss_coef` 0 where the recipe left it unset): these
    stages add MiniMind-3's (`capture_router_logits`). TRL enables its loss for any config that carries
    `output_router_logits`, which its SFTTrainer writes into every config it saves, dense ones included; on a dense
    model the router logits are empty and TRL's loss fails (IndexError in `load_balancing_loss_func`)."""
    if getattr(training_args, "router_aux_loss_coef", 0.0) is None:
        training_args.router_aux_loss_coef = 0.0


def model_generation(model: torch.nn.Module) -> int:
    """2 for a MiniMind2 model, 3 for MiniMind-3 (its config class says which)."""
    return 3 if isinstance(model.config, MiniMind3Config) else 2


def has_minimind3_moe(model: torch.nn.Module) -> bool:
    """Whether `model` is a MiniMind-3 MoE, whose original trainers add its balance loss."""
    return model_generation(model) == 3 and bool(getattr(model.config, "use_moe", False))


@contextmanager
def capture_router_logits(model: torch.nn.Module, enabled: bool = True) -> Iterator[list]:
    """Within the block, every forward of `model`'s backbone (`model.base_model`, what TRL's fused LM head runs)
    is asked for its router logits, and they are appended to the yielded list, one tuple per forward. Nothing is
    hooked when not `enabled` (the list stays empty). Hooks are on this model's backbone only, so a reference or
    teacher model's forward is untouched."""
    captured: list[tuple[torch.Tensor, ...]] = []
    if not enabled:
        yield captured
        return
    backbone = model.base_model

    def ask(module, args, kwargs):
        return args, {**kwargs, "output_router_logits": True}

    def keep(module, args, kwargs, output):
        captured.append(output.router_logits)

    handles = [
        backbone.register_forward_pre_hook(ask, with_kwargs=True),
        backbone.register_forward_hook(keep, with_kwargs=True),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
