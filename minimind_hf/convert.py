"""Conversion between MiniMind's original `.pth` files, HF checkpoints and plain Llama checkpoints.

Library: `load_pth`, `save_pth`, `to_llama`, `build_config`. Command line:

    python -m minimind_hf.convert pth2hf out/full_sft_512.pth out/full_sft_512_hf --hidden_size 512 \
        --num_hidden_layers 8 --tokenizer data/tokenizer
    python -m minimind_hf.convert hf2pth out/full_sft_512_hf out/full_sft_512.pth
    python -m minimind_hf.convert hf2llama out/full_sft_512_hf out/llama --tokenizer data/tokenizer

A `.pth` carries no config, so its sizes come from the command line, as in MiniMind.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .checkpointing import atomic_write
from .configuration_minimind import MiniMindConfig
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


def load_pth(
    path: str | os.PathLike, config: MiniMindConfig, dtype: torch.dtype = torch.float32
) -> MiniMindForCausalLM:
    """Load an original MiniMind `.pth` (fp16 or fp32, optionally DDP/compile-prefixed) into an HF model.

    Strict: a missing, unexpected or wrongly shaped tensor is an error naming it, since a size mismatch
    between the file and `config` is the usual mistake. Loading never unpickles code (`weights_only=True`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .pth file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable MiniMind .pth state dict ({err})") from err
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors")
    state = {_strip_prefix(k): v for k, v in raw.items()}

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


def _copy_tokenizer(tokenizer_dir: str | None, out_dir: str | os.PathLike) -> None:
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)


def _load_hf(model_dir: str) -> MiniMindForCausalLM:
    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not an HF checkpoint directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimind_hf.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p2h = sub.add_parser("pth2hf", help="original .pth -> HF directory")
    p2h.add_argument("pth")
    p2h.add_argument("out_dir")
    p2h.add_argument("--hidden_size", type=int, default=512)
    p2h.add_argument("--num_hidden_layers", type=int, default=8)
    p2h.add_argument("--use_moe", type=int, choices=(0, 1), default=0)
    p2h.add_argument("--config_overrides", default="", help='e.g. "num_attention_heads=4,rms_norm_eps=1e-6"')
    p2h.add_argument("--tokenizer", help="tokenizer directory to copy into the output")
    p2h.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")

    h2p = sub.add_parser("hf2pth", help="HF directory -> original .pth (fp16)")
    h2p.add_argument("model_dir")
    h2p.add_argument("pth")

    h2l = sub.add_parser("hf2llama", help="dense HF MiniMind directory -> LlamaForCausalLM directory")
    h2l.add_argument("model_dir")
    h2l.add_argument("out_dir")
    h2l.add_argument("--tokenizer", help="tokenizer directory to copy into the output")

    # LoRA adapters (minimind_hf/lora.py): merge-lora, lorapth2peft, peft2lorapth
    add_lora_commands(sub)
    args = parser.parse_args(argv)
    try:
        written = run_lora_command(args)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")
    if written is not None:
        print(f"wrote {written}")
        return
    if args.command == "pth2hf":
        config = build_config(
            args.hidden_size, args.num_hidden_layers, bool(args.use_moe), parse_overrides(args.config_overrides)
        )
        model = load_pth(args.pth, config, dtype=getattr(torch, args.dtype))
        model.save_pretrained(args.out_dir)
        _copy_tokenizer(args.tokenizer, args.out_dir)
        print(f"wrote {args.out_dir}")
    elif args.command == "hf2pth":
        print(f"wrote {save_pth(_load_hf(args.model_dir), args.pth)}")
    else:
        to_llama(_load_hf(args.model_dir), args.out_dir)
        _copy_tokenizer(args.tokenizer, args.out_dir)
        print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
