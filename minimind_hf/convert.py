"""Conversion between MiniMind's original `.pth` files, HF checkpoints and plain Llama checkpoints.

Library: `load_pth`, `save_pth`, `to_llama`, `from_llama`, `build_config`. Command line (the input may be any
model source `minimind_hf.loading` knows: HF directory, the original's HF export, a Llama export, a PEFT adapter,
a `.pth` with its sizes):

    python -m minimind_hf.convert pth2hf out/full_sft_512.pth out/full_sft_512_hf --hidden_size 512 \
        --num_hidden_layers 8 --tokenizer data/tokenizer
    python -m minimind_hf.convert hf2pth out/full_sft_512_hf out/full_sft_512.pth
    python -m minimind_hf.convert hf2llama out/full_sft_512_hf out/llama     # carries the source's tokenizer
    python -m minimind_hf.convert hf2qwen3 out/minimind3_hf out/qwen3      # MiniMind-3: Qwen3 / Qwen3-MoE

A MiniMind-3 `.pth` (QK-norm keys) needs no sizes: they are read from its tensor shapes.

A `.pth` carries no config, so its sizes come from the command line, as in MiniMind. Directories are written
atomically (a staging folder moved into place), a `.pth` through a temporary file.
"""

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .checkpointing import atomic_write, begin_final, commit_final
from .configuration_minimind import MiniMindConfig
from .configuration_minimind3 import MiniMind3Config
from .formats.minimind3_pth import minimind3_pth_state
from .formats.qwen3 import to_qwen3
from .lora import add_lora_commands, load_lora_pth, run_lora_command  # noqa: F401  (load_lora_pth: re-exported)
from .modeling_minimind import MiniMindForCausalLM

# DDP and torch.compile wrap the model and MiniMind saved whatever the wrapper's state_dict gave.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TIED = ("lm_head.weight", "model.embed_tokens.weight")


def parse_overrides(text: str | None) -> dict[str, Any]:
    """Parse `"num_attention_heads=4,rms_norm_eps=1e-6"` into typed values (JSON literals, else strings)."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config override {item!r} is not of the form key=value")
        try:
            value = json.loads(raw.strip())
        except json.JSONDecodeError:
            value = raw.strip()
        overrides[key.strip()] = value
    return overrides


def build_config(
    hidden_size: int = 512,
    num_hidden_layers: int = 8,
    use_moe: bool = False,
    overrides: dict[str, Any] | None = None,
) -> MiniMindConfig:
    """The config MiniMind builds from its three size arguments, plus any other field by name."""
    overrides = dict(overrides or {})
    known = set(MiniMindConfig.__dataclass_fields__) | {"rope_theta"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown MiniMindConfig field(s): {', '.join(unknown)}")
    return MiniMindConfig(
        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=bool(use_moe), **overrides
    )


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
        raise error(f"{path}: not a readable {what} state dict ({err})") from err
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
    if config.tie_word_embeddings and _TIED[0] not in state:
        state[_TIED[0]] = state.get(_TIED[1])
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
    if config.tie_word_embeddings and not torch.equal(state[_TIED[0]], state[_TIED[1]]):
        raise ValueError(f"{path}: lm_head.weight differs from model.embed_tokens.weight, but the config ties them")
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def save_pth(model: MiniMindForCausalLM, path: str | os.PathLike) -> Path:
    """Save in MiniMind's format: flat fp16 state dict with both tied names, written atomically."""
    state = {k: v.detach().to("cpu", torch.float16).clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state[_TIED[0]] = state[_TIED[1]]
    path = Path(path)
    atomic_write(path, lambda handle: torch.save(state, handle))
    return path


def pth_name(weight: str, config: MiniMindConfig) -> str:
    """MiniMind's file-name rule: `{weight}_{hidden_size}[_moe].pth`."""
    return f"{weight}_{config.hidden_size}{'_moe' if config.use_moe else ''}.pth"


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
    if not torch.equal(state[_TIED[0]], state[_TIED[1]]):
        raise ValueError(
            f"{model_dir}: tie_word_embeddings is false and lm_head.weight differs from the embedding; MiniMind "
            "ties them, so this head cannot be represented"
        )
    model = MiniMindForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.generation_config = llama.generation_config
    return model.to(dtype)


def _check_paths(args: argparse.Namespace, out: str, directory: bool) -> None:
    """Refuse a missing source, or an output path that clashes with what is there, before any model is loaded."""
    from .loading import source_kind  # loading builds on this module's conversions

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
    from .loading import tokenizer_source

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
    from .loading import load_model, sizes_from_args

    return load_model(args.source, dtype=getattr(torch, args.dtype), **sizes_from_args(args))


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
    from .loading import add_size_arguments

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


def main(argv: list[str] | None = None) -> None:
    """Each subcommand sets `run(args)`, which returns what it wrote; bad input is one `error:` line, exit 1."""
    parser = argparse.ArgumentParser(prog="python -m minimind_hf.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_conversion_commands(sub)
    # LoRA adapters (minimind_hf/lora.py): merge-lora, lorapth2peft, peft2lorapth
    add_lora_commands(sub)
    args = parser.parse_args(argv)
    try:
        written = run_lora_command(args)
        if written is None:
            written = args.run(args)
    except (OSError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
