"""Helpers shared by the tests and `scripts/fault_injection.py`, as `transformers.testing_utils` is for transformers:
tiny data and recipes that train in seconds, tiny models in every form MiniMind checkpoints circulate in, and
weight comparisons.

Nothing here is used by training itself; it lives in the package (not in `tests/`) so that scripts can import it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainerCallback

from .agent_tools import TOOLS
from .configuration_minimind import MiniMindConfig
from .configuration_minimind3 import MiniMind3Config
from .formats.llama import llama_config
from .formats.pth import save_pth
from .modeling_minimind import MiniMindForCausalLM
from .modeling_minimind3 import MiniMind3ForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO_ROOT / "data" / "tokenizer"
# Reference outputs of the original MiniMind code; they live beside the repository, never in it.
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"

# A model that trains in milliseconds per step: 2 layers, 32 wide, 4 heads (head size 8), 2 KV heads.
TINY_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TINY_RECIPE: dict[str, Any] = {
    "tokenizer_name_or_path": str(TOKENIZER_DIR),
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "config_overrides": "num_attention_heads=4,num_key_value_heads=2",
    "per_device_train_batch_size": 4,
    "max_length": 64,
    "max_steps": 2,
    "save_steps": 2,
    "learning_rate": 1e-3,
    "bf16": False,
    "report_to": "none",
    "dataloader_num_workers": 0,
}


def arithmetic_conversations(n: int = 48) -> list[dict]:
    """`n` short SFT rows: additions, some with a system prompt, some with a second turn."""
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": f"What is {i} plus {i % 7}?"}]
        turns.append({"role": "assistant", "content": f"{i} plus {i % 7} is {i + i % 7}."})
        if i % 3 == 0:
            turns = [{"role": "system", "content": "Answer briefly."}, *turns]
        if i % 4 == 0:
            turns += [{"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": str(2 * i)}]
        rows.append({"conversations": turns})
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_sft_data(path: str | os.PathLike, n: int = 48) -> Path:
    """A small SFT JSON Lines file (`arithmetic_conversations`)."""
    return write_jsonl(path, arithmetic_conversations(n))


def write_pretrain_texts(path: str | os.PathLike, n: int = 40) -> Path:
    """A small pretraining JSON Lines file of documents of different lengths."""
    texts = [f"Document {i}: " + " ".join(["word"] * (3 + i % 11)) + f" ends {i}." for i in range(n)]
    return write_jsonl(path, ({"text": t} for t in texts))


def write_tiny_recipe(directory: str | os.PathLike, name: str = "recipe.yaml", **overrides: Any) -> Path:
    """`directory/name`: a `TINY_RECIPE` on `directory/sft.jsonl` writing to `directory/out`, with `overrides`.

    The data file is not written here (`write_sft_data`): tests of bad input put their own bytes there.
    """
    directory = Path(directory)
    recipe = {"data_path": str(directory / "sft.jsonl"), "output_dir": str(directory / "out"), **TINY_RECIPE}
    path = directory / name
    path.write_text(yaml.safe_dump({**recipe, **overrides}))
    return path


def final_weights(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a saved model directory (or checkpoint)."""
    return load_file(Path(model_dir) / "model.safetensors")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest elementwise difference between two state dicts; infinite when their keys differ."""
    if a.keys() != b.keys():
        return float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def record_batches(trainer: Trainer, batches: list[dict[str, torch.Tensor]], first_only: bool = False) -> None:
    """Append a copy of every batch `trainer` computes a loss on to `batches` (for `before_train`).

    Batches are not visible to any callback, so the trainer instance's `compute_loss` is wrapped.
    """
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        if not (first_only and batches):
            batches.append({k: v.detach().clone() for k, v in inputs.items()})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording


class StepCounter(TrainerCallback):
    """Counts the optimizer steps a run takes (a resumed run counts only the steps it trained itself)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def tiny_model(seed: int = 0, fp16_exact: bool = True, **config: Any) -> MiniMindForCausalLM:
    """A random `TINY_SIZES` model in eval mode. With `fp16_exact`, every weight is a float16 value, so that the
    model is the same in every form (a `.pth` and the original's HF export store float16)."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(**{**TINY_SIZES, **config}))
    if fp16_exact:
        # Parameters only: `model.half()` would also round buffers such as RoPE's inverse frequencies.
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.half().float())
    return model.eval()


def save_tokenizer(directory: str | os.PathLike, tokenizer_dir: str | os.PathLike = TOKENIZER_DIR) -> None:
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(directory))


def save_hf_dir(model: MiniMindForCausalLM, directory: str | os.PathLike, tokenizer: bool = True) -> Path:
    """This project's HF directory: safetensors, `model_type: minimind`, and the tokenizer."""
    model.save_pretrained(directory)
    if tokenizer:
        save_tokenizer(directory)
    return Path(directory)


# The original project's config fields (its `model_minimind.MiniMindConfig`), as its transformers 4.x export wrote them.
_ORIGINAL_CONFIG_FIELDS = (
    "dropout bos_token_id eos_token_id hidden_act hidden_size intermediate_size max_position_embeddings "
    "num_attention_heads num_hidden_layers num_key_value_heads vocab_size rms_norm_eps inference_rope_scaling "
    "use_moe num_experts_per_tok n_routed_experts n_shared_experts scoring_func aux_loss_alpha seq_aux norm_topk_prob"
).split()
_ORIGINAL_CODE_STUB = 'raise RuntimeError("the original\'s model_minimind.py must never be executed when loading")\n'


def save_original_hf_export(model: MiniMindForCausalLM, directory: str | os.PathLike, tokenizer: bool = True) -> Path:
    """What the original's `scripts/convert_model.py` (`convert_torch2transformers_minimind`) writes: a
    `config.json` with `model_type: minimind` and the original's field names (`flash_attn`, `rope_theta`,
    `rope_scaling`, ...), `auto_map` to its own `model_minimind.py`, the weights in `pytorch_model.bin` as float16
    with both tied names, and transformers 4.x's `torch_dtype` / `transformers_version` keys.

    The `model_minimind.py` written here raises when run: loading the export must never execute it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    fields = {name: getattr(config, name) for name in _ORIGINAL_CONFIG_FIELDS}
    fields.update(
        architectures=["MiniMindForCausalLM"],
        auto_map={
            "AutoConfig": "model_minimind.MiniMindConfig",
            "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM",
        },
        flash_attn=True,
        model_type="minimind",
        rope_scaling=None,
        rope_theta=config.rope_parameters["rope_theta"],
        torch_dtype="float16",
        transformers_version="4.57.1",
        use_cache=True,
    )
    (directory / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "model_minimind.py").write_text(_ORIGINAL_CODE_STUB)
    if tokenizer:
        save_tokenizer(directory)
    return directory


def save_llama_export(
    model: MiniMindForCausalLM,
    directory: str | os.PathLike,
    tokenizer: bool = True,
    edit_state: Callable[[dict[str, torch.Tensor]], None] | None = None,
    **config_changes: Any,
) -> Path:
    """What the original's `convert_torch2transformers_llama` writes: `LlamaForCausalLM.save_pretrained` of the
    model's weights. `config_changes` alter the Llama config (e.g. `attention_bias=True`), to build exports that
    MiniMind cannot represent; `edit_state` may change the tensors before they are loaded (e.g. an untied head)."""
    config = llama_config(model.config)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    llama = LlamaForCausalLM(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if edit_state is not None:
        edit_state(state)
    shapes = {k: v.shape for k, v in llama.state_dict().items()}
    llama.load_state_dict({k: v for k, v in state.items() if shapes.get(k) == v.shape}, strict=False)
    llama.save_pretrained(directory)
    if tokenizer:
        save_tokenizer(directory)
    return Path(directory)


def save_in_every_form(model: MiniMindForCausalLM, root: str | os.PathLike) -> dict[str, Path]:
    """`model` as this project's HF directory, the original's HF export, a Llama export and a `.pth`, under `root`."""
    root = Path(root)
    return {
        "hf": save_hf_dir(model, root / "hf"),
        "original": save_original_hf_export(model, root / "original"),
        "llama": save_llama_export(model, root / "llama"),
        "pth": save_pth(model, root / "tiny.pth"),
    }


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits of `input_ids`, without a cache."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


def load_script(path: str | os.PathLike) -> types.ModuleType:
    """A script outside the package (`benchmarks/*.py`) imported as a module by its path, so that tests need not
    put its folder on `sys.path`. Registered under its stem, as a dataclass in it needs its module there."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


# MiniMind-3 at the size of `TINY_SIZES`, with the MiniMind-3 vocabulary (its tokenizer is a shared fixture).
TINY3_SIZES: dict[str, Any] = {**TINY_SIZES, "intermediate_size": 64, "vocab_size": 6400}


def tiny_minimind3_model(seed: int = 0, **config: Any) -> MiniMind3ForCausalLM:
    """A random tiny `MiniMind3ForCausalLM` (`use_moe=True` for the MoE form) in eval mode, fp16-exact weights."""
    torch.manual_seed(seed)
    model = MiniMind3ForCausalLM(MiniMind3Config(**{**TINY3_SIZES, **config}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model.eval()


def save_minimind3_dir(model: torch.nn.Module, directory: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> Path:
    """A MiniMind-3 model as this project's HF directory, with the MiniMind-3 tokenizer from `tokenizer_dir`."""
    model.save_pretrained(directory)
    save_tokenizer(directory, tokenizer_dir)
    return Path(directory)


def agent_rows(n: int = 8) -> list[dict]:
    """Agent RL rows in the original's format (`agent_rl.jsonl`): the tool schemas as a JSON string on the system
    message, the last assistant turn empty (left out by the loader), and `gt` from the mock tools' tables."""

    def schemas(*names: str) -> str:
        return json.dumps([TOOLS[name].schema for name in names], ensure_ascii=False)

    tasks = [
        (("calculate_math", "unit_converter"), "What is 12 * 7?", [84]),
        (("get_current_weather", "get_current_time"), "How warm is it in Tokyo?", ["12°C"]),
        (("get_exchange_rate", "calculate_math"), "How many CNY is one USD?", [7.21]),
        (("translate_text", "get_current_time"), "Translate 'Happy birthday' into chinese.", ["生日快乐"]),
    ]
    rows = []
    for i in range(n):
        names, question, gt = tasks[i % len(tasks)]
        system = {"role": "system", "content": "You are a helpful assistant.", "tools": schemas(*names)}
        conversation = [system, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        rows.append({"conversations": conversation, "gt": gt})
    return rows
