"""One way to load a MiniMind model and its tokenizer, from every form in which MiniMind checkpoints circulate.

Recipes, `chat`, `evaluate`, `serve` and `convert` all call `load_model` / `load_model_and_tokenizer`. The source
is one of:

- this project's HF directory (`model_type: minimind`, safetensors), or the original's own HF export
  (`model_type: minimind` with the original's field names, `pytorch_model.bin` in fp16, written by
  transformers 4.x): both load through `AutoModelForCausalLM`;
- a Llama export (`model_type: llama`, how the dense MiniMind2 is published): converted by `formats.llama.from_llama`,
  which refuses what MiniMind cannot represent, naming the field;
- MiniMind-3 in any of its forms: this project's (`model_type: minimind3`), the original's HF export
  (`model_type: minimind` with MiniMind-3's fields, read by `MiniMindConfig.from_dict` as a `MiniMind3Config`,
  never as remote code), a Qwen3 / Qwen3-MoE export (`formats.qwen3`), or its `.pth` (QK-norm keys; sized from
  its tensor shapes, `formats.minimind3_pth`);
- a PEFT adapter directory (`adapter_config.json`): its base model, loaded by these same rules, with the adapter
  merged in;
- an original `.pth` file, with the sizes it was trained with (a `.pth` carries no config);
- None: a fresh model of the given sizes.

The formats themselves live in `formats/` (`pth.py`, `llama.py`, `lora_pth.py`); this module only chooses which one
to use. The command-line options that name a source are in `cli_options.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from .checkpointing import final_save_problem
from .configuration_minimind import MiniMindConfig, build_config, parse_overrides
from .configuration_minimind3 import MiniMind3Config
from .errors import ModelSourceError
from .formats.llama import from_llama
from .formats.minimind3_pth import is_minimind3_state, load_minimind3_pth
from .formats.pth import load_pth, read_state_dict
from .formats.qwen3 import QWEN3_MODEL_TYPES, from_qwen3
from .modeling_minimind import MiniMindForCausalLM
from .modeling_minimind3 import MiniMind3ForCausalLM
from .tokenizer import load_tokenizer

__all__ = [
    "DTYPES",
    "ModelSourceError",
    "adapter_base",
    "load_model",
    "load_model_and_tokenizer",
    "source_kind",
    "tokenizer_source",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"


def source_kind(source: str | os.PathLike | None) -> str:
    """ "fresh", "pth", "adapter", "llama", "qwen3" or "minimind" (an HF directory of either MiniMind generation),
    by inspection."""
    if source is None:
        return "fresh"
    path = Path(source)
    if path.is_file():
        return "pth"
    if not path.is_dir():
        raise ModelSourceError(f"{source}: no such model (an HF directory, a PEFT adapter directory or a .pth file)")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{source}: a directory without config.json (not an HF model directory)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelSourceError(f"{config_file}: not a readable JSON config ({err})") from err
    if model_type == "llama":
        return "llama"
    if model_type in QWEN3_MODEL_TYPES:  # how MiniMind-3 is published
        return "qwen3"
    if model_type not in (MiniMindConfig.model_type, MiniMind3Config.model_type):
        raise ModelSourceError(
            f"{source}: model_type {model_type!r} is none of 'minimind', 'minimind3', 'llama', 'qwen3', 'qwen3_moe'"
        )
    return "minimind"


def adapter_base(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter directory was trained on (its `base_model_name_or_path`, which may be relative
    to the working directory or to the adapter directory)."""
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelSourceError(f"{config_file}: no readable base_model_name_or_path ({err})") from err
    for candidate in (Path(base), Path(adapter_dir) / base):
        if candidate.exists():
            return str(candidate)
    raise ModelSourceError(f"{adapter_dir}: its base model {base} does not exist")


def _check_sizes(config: MiniMindConfig, source: str, wanted: dict[str, Any]) -> None:
    for key, value in wanted.items():
        if value is not None and getattr(config, key, value) != value:
            raise ModelSourceError(
                f"the recipe says {key}={value} but the checkpoint {source} has {key}={getattr(config, key)}"
            )


def load_model(
    source: str | os.PathLike | None,
    *,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    use_moe: bool | None = None,
    config_overrides: str | dict[str, Any] = "",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    minimind_version: int | None = None,
) -> MiniMindForCausalLM | MiniMind3ForCausalLM:
    """A `MiniMindForCausalLM` or `MiniMind3ForCausalLM` from any source (see the module doc).

    The sizes and `config_overrides` build a fresh model or read a `.pth`; for a directory they must agree with
    its config (a mismatch is an error, not a silent reshape). `minimind_version` picks the generation of a fresh
    model (default 2); for a saved one the source decides, and a different `minimind_version` is an error.
    """
    overrides = parse_overrides(config_overrides) if isinstance(config_overrides, str) else dict(config_overrides)
    sizes = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers, "use_moe": use_moe}
    kind = source_kind(source)
    source = None if source is None else str(source)
    try:
        if kind == "adapter":
            from peft import PeftModel

            # The sizes reach the base too: an adapter trained on an original .pth needs them to load it.
            base = load_model(
                adapter_base(source),
                **sizes,
                config_overrides=overrides,
                attn_implementation=attn_implementation,
                minimind_version=minimind_version,
            )
            _check_sizes(base.config, source, {**sizes, **overrides})
            # PEFT froze the base's weights and merging does not thaw them: a recipe would train nothing.
            return PeftModel.from_pretrained(base, source).merge_and_unload().requires_grad_(True).to(dtype)
        if kind == "pth" and is_minimind3_state(state := read_state_dict(source, "MiniMind .pth", ModelSourceError)):
            # MiniMind-3's .pth (QK-norm keys): sizes from its tensor shapes, the options only where given.
            model = load_minimind3_pth(source, state, {**sizes, **overrides}, dtype=dtype)
        elif kind == "fresh":
            config = build_config(**sizes, overrides=overrides, minimind_version=minimind_version or 2)
            model_class = MiniMind3ForCausalLM if isinstance(config, MiniMind3Config) else MiniMindForCausalLM
            model = model_class(config).to(dtype)
        elif kind == "pth":
            model = load_pth(source, build_config(**sizes, overrides=overrides), dtype=dtype)
        else:
            problem = final_save_problem(source)
            if problem:
                raise ModelSourceError(f"{source}: {problem}")
            if kind == "llama":
                model = from_llama(source, dtype=dtype)
            elif kind == "qwen3":
                model = from_qwen3(source, dtype=dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            _check_sizes(model.config, source, {**sizes, **overrides})
        generation = 3 if isinstance(model.config, MiniMind3Config) else 2
        if minimind_version is not None and generation != minimind_version:
            name = "MiniMind-3" if generation == 3 else "MiniMind2"
            raise ModelSourceError(f"{source} is a {name} model, not minimind_version {minimind_version}")
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        return model
    except (OSError, SafetensorError) as err:
        raise ModelSourceError(f"{source}: cannot load the model ({err})") from err


def tokenizer_source(source: str | os.PathLike | None) -> str | None:
    """Where a model source keeps its tokenizer: the directory itself, an adapter's base, or nowhere."""
    if source is None or not Path(source).is_dir():
        return None
    path = Path(source)
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        return str(path)
    if (path / ADAPTER_CONFIG).is_file():
        return tokenizer_source(adapter_base(path))
    return None


def load_model_and_tokenizer(
    source: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    **sizes: Any,
) -> tuple[MiniMindForCausalLM, PreTrainedTokenizerBase]:
    """The model in eval mode and its tokenizer (the source's own unless `tokenizer` names one)."""
    if tokenizer is None and source_kind(source) == "pth":
        raise ModelSourceError(f"{source}: a .pth carries no tokenizer; pass --tokenizer DIR")
    tokenizer = tokenizer or tokenizer_source(source)
    if tokenizer is None:
        raise ModelSourceError(f"{source}: holds no tokenizer; pass --tokenizer DIR")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = load_model(source, dtype=dtype, **sizes)
    try:
        return model.eval(), load_tokenizer(tokenizer)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"tokenizer {tokenizer}: cannot load it ({err})") from err
