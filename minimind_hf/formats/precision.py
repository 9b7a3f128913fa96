"""Casts that can lose data: every conversion that narrows a weight's dtype goes through `narrow`.

A value beyond the target's range becomes inf (fp16's largest is 65504): the converted model would output NaN, yet
the conversion would report success. That is refused, naming the tensor. A value too small for the target becomes
0 (underflow): harmless for weights of that size, so it is only counted in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ..errors import MiniMindError

logger = logging.getLogger("minimind_hf")
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype, str(dtype).removeprefix("torch."))


class PrecisionError(MiniMindError, ValueError):
    """A conversion would turn a finite weight into inf or NaN; the message names the tensor."""


def narrow(state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str = "") -> dict[str, torch.Tensor]:
    """`state` cast to `dtype` (floating tensors only), refusing any finite value that the cast makes non-finite.

    `what` names the output in messages. Returns new tensors; the inputs are left as they are.
    """
    out: dict[str, torch.Tensor] = {}
    flushed = 0
    for key, tensor in state.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[key] = tensor
            continue
        cast = tensor.to(dtype)
        overflow = torch.isfinite(tensor) & ~torch.isfinite(cast)
        if overflow.any():
            largest = tensor[overflow].abs().max().item()
            limit = torch.finfo(dtype).max
            where = f" for {what}" if what else ""
            raise PrecisionError(
                f"{key} holds {largest:.4g}, beyond {dtype_name(dtype)}'s range (+-{limit:.4g}): "
                f"it would be written as inf{where} ({int(overflow.sum())} values); keep float32"
            )
        flushed += int(((cast == 0) & (tensor != 0)).sum())
        out[key] = cast
    if flushed:
        logger.warning(
            "%d nonzero weights are below %s's smallest value and become 0%s",
            flushed,
            dtype_name(dtype),
            f" in {what}" if what else "",
        )
    return out


def narrow_model(model: torch.nn.Module, dtype: torch.dtype, what: str = "") -> torch.nn.Module:
    """`model` cast to `dtype` in place, after `narrow` has checked that no weight overflows."""
    if any(p.is_floating_point() and p.dtype != dtype for p in model.state_dict().values()):
        narrow(model.state_dict(), dtype, what)
    return model.to(dtype)
