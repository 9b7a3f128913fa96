"""MiniMind's original `.pth` weight files: a flat state dict (fp16 when the original saves it), tied names both
present, possibly prefixed by the DDP or `torch.compile` wrapper it was saved from. A `.pth` carries no config:
its sizes come from the recipe or the command line, as in MiniMind.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpointing import atomic_write
from ..configuration_minimind import MiniMindConfig
from ..modeling_minimind import MiniMindForCausalLM
from .precision import narrow

# DDP and torch.compile wrap the model and MiniMind saved whatever the wrapper's state_dict gave.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# MiniMind ties its LM head to the embedding and saves the tensor under both names.
TIED = ("lm_head.weight", "model.embed_tokens.weight")


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def read_state_dict(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> dict[str, torch.Tensor]:
    """The flat state dict of tensors in an original `.pth` (`what` names its kind in errors), with DDP and
    compile prefixes stripped. Never unpickles code (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's unpickling errors run over several lines of advice; the first says what is wrong.
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise error(f"{path}: not a readable {what} state dict ({reason})") from err
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise error(f"{path}: expected a non-empty flat state dict of tensors")
    return {_strip_prefix(k): v for k, v in raw.items()}


def load_pth(
    path: str | os.PathLike, config: MiniMindConfig, dtype: torch.dtype = torch.float32
) -> MiniMindForCausalLM:
    """Load an original MiniMind `.pth` (fp16 or fp32, optionally DDP/compile-prefixed) into an HF model.

    Strict: a missing, unexpected or wrongly shaped tensor is an error naming it, since a size mismatch
    between the file and `config` is the usual mistake. Loading never unpickles code (`weights_only=True`).
    """
    path = Path(path)
    state = read_state_dict(path, "MiniMind .pth")

    model = MiniMindForCausalLM(config)
    expected = model.state_dict()
    if config.tie_word_embeddings and TIED[0] not in state:
        state[TIED[0]] = state.get(TIED[1])
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: keys do not match a MiniMind model with hidden_size={config.hidden_size}, "
            f"num_hidden_layers={config.num_hidden_layers}, use_moe={config.use_moe}; "
            f"missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but the config expects "
                f"{tuple(expected[key].shape)}; check hidden_size / num_hidden_layers / use_moe / head counts"
            )
    if config.tie_word_embeddings and not torch.equal(state[TIED[0]], state[TIED[1]]):
        raise ValueError(f"{path}: lm_head.weight differs from model.embed_tokens.weight, but the config ties them")
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def save_pth(model: MiniMindForCausalLM, path: str | os.PathLike) -> Path:
    """Save in MiniMind's format: flat fp16 state dict with both tied names, written atomically.

    A weight beyond fp16's range is refused, naming it (`precision.narrow`), before anything is written.
    """
    state = narrow({k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}, torch.float16, str(path))
    if model.config.tie_word_embeddings:
        state[TIED[0]] = state[TIED[1]]
    path = Path(path)
    atomic_write(path, lambda handle: torch.save(state, handle))
    return path


def pth_name(weight: str, config: MiniMindConfig) -> str:
    """MiniMind's file-name rule: `{weight}_{hidden_size}[_moe].pth`."""
    return f"{weight}_{config.hidden_size}{'_moe' if config.use_moe else ''}.pth"
