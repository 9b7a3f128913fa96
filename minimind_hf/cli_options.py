"""What the command-line tools share: argparse value types that name what they want, the `--device` check, and
the options that say where a model comes from (chat, evaluate, serve, rewards; the sizes also for convert).

A bad value is one argparse error naming the option; a model source that cannot be loaded is one `error:` line.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .errors import MiniMindError
from .loading import DTYPES, load_model_and_tokenizer
from .modeling_minimind import MiniMindForCausalLM


def _argparse_number(kind: type, test, wanted: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    parse.__name__ = wanted  # argparse names the type in its message
    return parse


positive_int = _argparse_number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _argparse_number(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = _argparse_number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
probability = _argparse_number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
seed = _argparse_number(int, lambda v: 0 <= v < 2**32, "a seed in 0..2**32-1")


def device_problem(device: str) -> str | None:
    """Why `device` (a `--device` value) cannot be used here, or None."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        return f"--device {device!r} is not a device ({err})"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA device here (use cpu)"
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"--device {device}: there are {torch.cuda.device_count()} CUDA devices"
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: MPS is not available here"
    return None


def add_size_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The sizes a `.pth` was trained with (it carries no config); for a directory they must agree with it."""
    parser.add_argument("--hidden_size", type=int, default=None, help=".pth only: 512 (26M), 768 (104M), 640 (MoE)")
    parser.add_argument("--num_hidden_layers", type=int, default=None, help=".pth only (default 8)")
    parser.add_argument("--use_moe", type=int, choices=(0, 1), default=None, help=".pth only")
    parser.add_argument("--config_overrides", default="", help='.pth only: e.g. "num_attention_heads=4"')


def sizes_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`load_model`'s size keywords from `add_size_arguments`' options."""
    return {
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "use_moe": None if args.use_moe is None else bool(args.use_moe),
        "config_overrides": args.config_overrides,
    }


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options that say where a model comes from (chat, evaluate, serve)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="an HF or Llama directory, a PEFT adapter, or a MiniMind .pth")
    group.add_argument("--tokenizer", help="tokenizer directory (default: the model's own; required for .pth)")
    group.add_argument("--dtype", choices=DTYPES, default="float32", help="bfloat16 is fast on recent CPUs too")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_size_arguments(group)


def load_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[MiniMindForCausalLM, PreTrainedTokenizerBase]:
    """`load_model_and_tokenizer` from `add_model_arguments`' options; a bad source exits with one error line."""
    try:
        sizes = sizes_from_args(args)
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, dtype=args.dtype, **sizes)
    except (FileNotFoundError, ValueError, MiniMindError) as err:
        parser.exit(1, f"error: {err}\n")
    return model.to(args.device), tokenizer
