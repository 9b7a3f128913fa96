"""Conversion between MiniMind's original `.pth` files, HF checkpoints, plain Llama checkpoints and LoRA adapters:
the command line on top of `minimind_hf.formats` (the weight formats) and `minimind_hf.loading` (any source).

The input may be any model source `minimind_hf.loading` knows: HF directory, the original's HF export, a Llama
export, a PEFT adapter, a `.pth` with its sizes:

    python -m minimind_hf.convert pth2hf out/full_sft_512.pth out/full_sft_512_hf --hidden_size 512 \
        --num_hidden_layers 8 --tokenizer data/tokenizer
    python -m minimind_hf.convert hf2pth out/full_sft_512_hf out/full_sft_512.pth
    python -m minimind_hf.convert hf2llama out/full_sft_512_hf out/llama     # carries the source's tokenizer
    python -m minimind_hf.convert merge-lora out/lora out/lora_merged         # a PEFT adapter merged into its base
    python -m minimind_hf.convert lorapth2peft lora_identity_512.pth out/lora --base out/sft
    python -m minimind_hf.convert peft2lorapth out/lora lora_identity_512.pth
    python -m minimind_hf.convert hf2qwen3 out/minimind3_hf out/qwen3      # MiniMind-3: Qwen3 / Qwen3-MoE

A MiniMind-3 `.pth` (QK-norm keys) needs no sizes: they are read from its tensor shapes.

A `.pth` carries no config, so its sizes come from the command line, as in MiniMind. Directories are written
atomically (a staging folder moved into place), a `.pth` through a temporary file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from .checkpointing import atomic_write, begin_final, commit_final
from .cli_options import add_size_arguments, sizes_from_args
from .configuration_minimind3 import MiniMind3Config
from .errors import MiniMindError
from .formats.llama import llama_config, to_llama
from .formats.lora_pth import load_lora_pth, save_lora_pth, set_base_model
from .formats.minimind3_pth import minimind3_pth_state
from .formats.precision import narrow_model
from .formats.pth import save_pth
from .formats.qwen3 import to_qwen3
from .loading import adapter_base, load_model, source_kind, tokenizer_source
from .modeling_minimind import MiniMindForCausalLM
from .tokenizer import generation_config, load_tokenizer


def _check_paths(args: argparse.Namespace, out: str, directory: bool) -> None:
    """Refuse a missing source, or an output path that clashes with what is there, before any model is loaded."""
    source_kind(args.source)
    path = Path(out)
    if path.exists() and path.resolve() == Path(args.source).resolve():
        raise ValueError(f"{path}: the output would overwrite the source")
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory (the output is a model directory)")
    if not directory and path.is_dir():
        raise ValueError(f"{path}: is a directory; give the path of the .pth file to write")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{path}: {parent} is a file, not a directory")


def _tokenizer_for(args: argparse.Namespace, required: bool):
    """The tokenizer to carry into the output: `--tokenizer`, else the source's own (None if it has none)."""
    if args.no_tokenizer:
        return None
    path = args.tokenizer or tokenizer_source(args.source)
    if path is None:
        if required:
            raise ValueError(
                f"{args.source} holds no tokenizer, and an export without one cannot be served; pass --tokenizer "
                "DIR (or --no_tokenizer)"
            )
        return None
    try:
        # AutoTokenizer keeps the source's files and chat template as they are.
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer {path}: cannot load it ({err})") from err


def _load(args: argparse.Namespace) -> MiniMindForCausalLM:
    """The source at full precision, then cast to `--dtype` only if no weight overflows it (`precision.narrow`)."""
    model = load_model(args.source, **sizes_from_args(args))
    return narrow_model(model, getattr(torch, args.dtype), f"--dtype {args.dtype}")


def _write_model_dir(out_dir: Path, write: Callable[[Path], object], tokenizer) -> Path:
    """Write a model directory atomically: into a staging folder, moved into place once complete, so that a failed
    conversion never leaves a torn model over an earlier one (`checkpointing.begin_final`)."""
    existed = out_dir.exists()
    staging = begin_final(out_dir)
    try:
        write(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        if not existed:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    commit_final(out_dir)
    return out_dir


def to_hf_command(args: argparse.Namespace) -> Path:
    _check_paths(args, args.out_dir, directory=True)
    out_dir = Path(args.out_dir)
    tokenizer = _tokenizer_for(args, required=False)
    model = _load(args)
    if tokenizer is None:
        print(f"note: no tokenizer written to {out_dir} (pass --tokenizer DIR to add one)", file=sys.stderr)
    return _write_model_dir(out_dir, model.save_pretrained, tokenizer)


def to_pth_command(args: argparse.Namespace) -> Path:
    _check_paths(args, args.pth, directory=False)
    model = _load(args)
    if isinstance(model.config, MiniMind3Config):
        state = minimind3_pth_state(model)  # refuses a weight beyond fp16 before anything is written
        atomic_write(Path(args.pth), lambda handle: torch.save(state, handle))
        return Path(args.pth)
    return save_pth(model, args.pth)


def to_qwen3_command(args: argparse.Namespace) -> Path:
    _check_paths(args, args.out_dir, directory=True)
    tokenizer = _tokenizer_for(args, required=False)
    model = _load(args)
    if not isinstance(model.config, MiniMind3Config):
        raise ValueError(f"{args.source}: a MiniMind2 model has no Qwen3 equivalent (no QK-norm); use hf2llama")
    return _write_model_dir(Path(args.out_dir), lambda staging: to_qwen3(model, staging), tokenizer)


def to_llama_command(args: argparse.Namespace) -> Path:
    _check_paths(args, args.out_dir, directory=True)
    out_dir = Path(args.out_dir)
    tokenizer = _tokenizer_for(args, required=True)
    model = _load(args)
    llama_config(model.config)  # refuses an MoE model before anything is written
    return _write_model_dir(out_dir, lambda staging: to_llama(model, staging), tokenizer)


def add_conversion_commands(sub: argparse._SubParsersAction) -> None:
    """`pth2hf`, `hf2pth`, `hf2llama`. Each takes any model source `minimind_hf.loading` knows: this project's HF
    directory, the original's HF export, a Llama export, a PEFT adapter directory, or a `.pth` with its sizes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("source", help="an HF, original-export or Llama directory, a PEFT adapter, or a .pth")
    add_size_arguments(common)
    common.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    tokenizer = argparse.ArgumentParser(add_help=False)
    tokenizer.add_argument("--tokenizer", help="tokenizer directory for the output (default: the source's own)")
    tokenizer.add_argument("--no_tokenizer", action="store_true", help="write no tokenizer")

    to_hf = sub.add_parser("pth2hf", parents=[common, tokenizer], help="any model source (a .pth) -> HF directory")
    to_hf.add_argument("out_dir")
    to_hf.set_defaults(run=to_hf_command)
    to_pth = sub.add_parser("hf2pth", parents=[common], help="any model source -> original .pth (fp16)")
    to_pth.add_argument("pth")
    to_pth.set_defaults(run=to_pth_command)
    to_llama_parser = sub.add_parser(
        "hf2llama", parents=[common, tokenizer], help="a dense model -> LlamaForCausalLM directory with its tokenizer"
    )
    to_llama_parser.add_argument("out_dir")
    to_llama_parser.set_defaults(run=to_llama_command)
    to_qwen3_parser = sub.add_parser(
        "hf2qwen3",
        parents=[common, tokenizer],
        help="a MiniMind-3 model -> Qwen3ForCausalLM / Qwen3MoeForCausalLM directory with its tokenizer",
    )
    to_qwen3_parser.add_argument("out_dir")
    to_qwen3_parser.set_defaults(run=to_qwen3_command)


def _tokenizer_into(directory: Path, tokenizer_dir: str | os.PathLike | None) -> None:
    if tokenizer_dir:
        load_tokenizer(tokenizer_dir).save_pretrained(directory)


def lora_pth_to_peft(
    pth: str | os.PathLike,
    base: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    **sizes: Any,
) -> Path:
    """An original adapter file as a PEFT adapter directory on `base` (any model source; `sizes` for a `.pth`)."""
    model = load_lora_pth(load_model(base, **sizes), pth)
    set_base_model(model, base)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    _tokenizer_into(out_dir, tokenizer or tokenizer_source(base))
    return out_dir


def peft_to_lora_pth(adapter_dir: str | os.PathLike, pth: str | os.PathLike, **sizes: Any) -> Path:
    """A PEFT adapter directory as the original's adapter file (its base is loaded to place the adapter)."""
    base = load_model(adapter_base(adapter_dir), **sizes)
    return save_lora_pth(PeftModel.from_pretrained(base, str(adapter_dir)), pth)


def merge_lora(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, **sizes: Any) -> Path:
    """The base with the adapter merged in, written like a recipe's final model: weights (the LM head stays tied
    to the embedding), tokenizer, a generation config that stops at `<|im_end|>`, through the same atomic save."""
    if source_kind(adapter_dir) != "adapter":  # a plain model would be copied as if merged
        raise ValueError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json); nothing to merge")
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
    if args.command == "merge-lora":
        return str(merge_lora(args.adapter_dir, args.out_dir, **sizes_from_args(args)))
    if args.command == "lorapth2peft":
        return str(lora_pth_to_peft(args.pth, args.base, args.out_dir, args.tokenizer, **sizes_from_args(args)))
    if args.command == "peft2lorapth":
        return str(peft_to_lora_pth(args.adapter_dir, args.pth, **sizes_from_args(args)))
    return None


def main(argv: list[str] | None = None) -> None:
    """Each subcommand sets `run(args)`, which returns what it wrote; bad input is one `error:` line, exit 1."""
    parser = argparse.ArgumentParser(prog="python -m minimind_hf.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_conversion_commands(sub)
    # LoRA adapters: merge-lora, lorapth2peft, peft2lorapth
    add_lora_commands(sub)
    args = parser.parse_args(argv)
    try:
        written = run_lora_command(args)
        if written is None:
            written = args.run(args)
    except (OSError, ValueError, MiniMindError) as err:
        parser.exit(1, f"error: {err}\n")
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
