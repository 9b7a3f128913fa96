"""LoRA for MiniMind on PEFT, set up as the original's `model/model_lora.py`, and its adapter files both ways.

The original adds `B(A(x))`, unscaled, to every `nn.Linear` whose weight is square (`q_proj` and `o_proj`; also
`k_proj` and `v_proj` when there are as many KV heads as heads), with `A ~ N(0, 0.02)` and `B = 0`, rank 8. In PEFT
terms that is `LoraConfig(r=8, lora_alpha=8, lora_dropout=0, target_modules=<those>)` plus the init of A, which no
PEFT `init_lora_weights` option gives (`"gaussian"` draws with std 1/r), so `init_lora_like_minimind` sets it.

Original adapter files (`save_lora`: `<module path>.lora.A.weight` / `.lora.B.weight`, e.g. `lora_identity_512.pth`)
load with `load_lora_pth` and are written with `save_lora_pth`. `python -m minimind_hf.convert` has the command
lines: `merge-lora`, `lorapth2peft`, `peft2lorapth`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from .checkpointing import atomic_write, begin_final, commit_final

PTH_A, PTH_B = ".lora.A.weight", ".lora.B.weight"
# PEFT's saved keys: `base_model.model.<module path>.lora_A.weight` (no adapter name).
PEFT_PREFIX = "base_model.model."
PEFT_A, PEFT_B = ".lora_A.weight", ".lora_B.weight"
MINIMIND_INIT_STD = 0.02


class LoraFileError(ValueError):
    """An adapter file that does not fit the model; the message names the file and the tensor."""


def square_linear_modules(model: nn.Module) -> list[str]:
    """Where the original puts LoRA: every `nn.Linear` whose weight is square, as PEFT `target_modules`.

    Leaf names (`q_proj`, `o_proj`) when every Linear of that name is square, which keeps `adapter_config.json`
    readable; the full module paths otherwise (a leaf name would also catch the non-square ones).
    """
    square: dict[str, list[str]] = {}
    other: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if module.weight.shape[0] == module.weight.shape[1]:
                square.setdefault(leaf, []).append(name)
            else:
                other.add(leaf)
    if not square:
        raise ValueError("the model has no square nn.Linear: name lora_target_modules explicitly")
    if other & set(square):
        return sorted(name for names in square.values() for name in names)
    return sorted(square)


def lora_config(
    model: nn.Module,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
) -> LoraConfig:
    """The original's adapter as a `LoraConfig`: `alpha` defaults to `r` (B·A·x added unscaled), the targets to
    `square_linear_modules`. `target_modules` may be a list of names or PEFT's `"all-linear"`."""
    return LoraConfig(
        r=r,
        lora_alpha=r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_modules or square_linear_modules(model),
        bias="none",
        task_type="CAUSAL_LM",
    )


def init_lora_like_minimind(model: PeftModel, std: float = MINIMIND_INIT_STD, seed: int = 0) -> None:
    """A ~ N(0, std) and B = 0 in every LoRA layer, as the original's `LoRA.__init__` (PEFT's default draws A
    Kaiming-uniform). A generator of its own keeps the draw the same on every rank and whatever ran before."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    weight = module.lora_A[name].weight
                    weight.copy_(torch.randn(weight.shape, generator=generator) * std)
                    module.lora_B[name].weight.zero_()


def read_lora_pth(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module path: (A, B)}` of an original adapter file, checked for pairs and shapes (rank = A's rows)."""
    from .convert import read_state_dict

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
        state[f"{PEFT_PREFIX}{name}{PEFT_A}"] = a.to(dtype)
        state[f"{PEFT_PREFIX}{name}{PEFT_B}"] = b.to(dtype)
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


def _tokenizer_into(directory: Path, tokenizer_dir: str | os.PathLike | None) -> None:
    if tokenizer_dir:
        from .tokenizer import load_tokenizer

        load_tokenizer(tokenizer_dir).save_pretrained(directory)


def lora_pth_to_peft(
    pth: str | os.PathLike,
    base: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    **sizes: Any,
) -> Path:
    """An original adapter file as a PEFT adapter directory on `base` (any model source; `sizes` for a `.pth`)."""
    from .loading import load_model, tokenizer_source

    model = load_lora_pth(load_model(base, **sizes), pth)
    set_base_model(model, base)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    _tokenizer_into(out_dir, tokenizer or tokenizer_source(base))
    return out_dir


def peft_to_lora_pth(adapter_dir: str | os.PathLike, pth: str | os.PathLike, **sizes: Any) -> Path:
    """A PEFT adapter directory as the original's adapter file (its base is loaded to place the adapter)."""
    from .loading import adapter_base, load_model

    base = load_model(adapter_base(adapter_dir), **sizes)
    return save_lora_pth(PeftModel.from_pretrained(base, str(adapter_dir)), pth)


def merge_lora(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, **sizes: Any) -> Path:
    """The base with the adapter merged in, written like a recipe's final model: weights (the LM head stays tied
    to the embedding), tokenizer, a generation config that stops at `<|im_end|>`, through the same atomic save."""
    from .loading import load_model, tokenizer_source
    from .tokenizer import load_tokenizer
    from .training import generation_config

    model = load_model(adapter_dir, **sizes)
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise ValueError(f"{adapter_dir}: merging untied the LM head from the embedding")
    source = tokenizer_source(adapter_dir)
    tokenizer = load_tokenizer(source) if source else None
    if tokenizer is not None:
        model.generation_config = generation_config(tokenizer)
    out_dir = Path(out_dir)
    staging = begin_final(out_dir)
    model.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    commit_final(out_dir)
    return out_dir


def add_lora_commands(sub) -> None:
    """`merge-lora`, `lorapth2peft`, `peft2lorapth` for `python -m minimind_hf.convert`."""
    from .loading import add_size_arguments

    merge = sub.add_parser("merge-lora", help="PEFT adapter directory -> its base with the adapter merged (HF dir)")
    merge.add_argument("adapter_dir")
    merge.add_argument("out_dir")
    add_size_arguments(merge)
    to_peft = sub.add_parser("lorapth2peft", help="original LoRA .pth (save_lora) -> PEFT adapter directory")
    to_peft.add_argument("pth")
    to_peft.add_argument("out_dir")
    to_peft.add_argument("--base", required=True, help="the model the adapter was trained on (any model source)")
    to_peft.add_argument("--tokenizer", help="tokenizer to copy into the adapter (default: the base's)")
    add_size_arguments(to_peft)
    to_pth = sub.add_parser("peft2lorapth", help="PEFT adapter directory -> original LoRA .pth (save_lora format)")
    to_pth.add_argument("adapter_dir")
    to_pth.add_argument("pth")
    add_size_arguments(to_pth)


def run_lora_command(args) -> str | None:
    """Run a LoRA subcommand (None when `args.command` is another one); returns what was written."""
    from .loading import sizes_from_args

    if args.command == "merge-lora":
        return str(merge_lora(args.adapter_dir, args.out_dir, **sizes_from_args(args)))
    if args.command == "lorapth2peft":
        return str(lora_pth_to_peft(args.pth, args.base, args.out_dir, args.tokenizer, **sizes_from_args(args)))
    if args.command == "peft2lorapth":
        return str(peft_to_lora_pth(args.adapter_dir, args.pth, **sizes_from_args(args)))
    return None
