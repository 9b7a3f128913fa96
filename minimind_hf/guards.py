"""Guards of a run's inputs and of its resumes, checked by `run_recipe` before any work:

- `check_inputs_outside_output`: no model the run reads (the start model, DPO's reference, GRPO's reward model,
  the tokenizer, a LoRA adapter's base) is the output directory, inside it, or holds it. `overwrite_output_dir`
  clears the output directory and the final save replaces files in it, so an input there would be deleted or
  half-replaced while it is being read, and a kill at the wrong moment would leave neither model.
- `recipe_snapshot` / `check_resume_recipe`: every checkpoint holds the recipe it was trained with
  (`RECIPE_FILE`, written before the seal so the manifest covers it); a resume that changes a key which cannot
  change mid-run (`FROZEN_KEYS`: the schedule, the batch, the data, the model, the objective) is refused, naming
  each key with both values. Other keys (logging, saving, workers, the length of the run) take the new value,
  said in one log line. Extending `max_steps` / `num_train_epochs` is allowed: the learning-rate schedule is then
  rebuilt over the new length from the step reached, which the log line says.
- `RecipeIntervals`: transformers restores `logging_steps`, `eval_steps` and `save_steps` from the checkpoint's
  trainer_state.json on resume, so a changed interval would be silently ignored; this callback puts the recipe's
  back when training begins, so that what the log line says (the new values win) is true.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .errors import RecipeError
from .loading import adapter_base, source_kind

logger = logging.getLogger("minimind_hf")

# Recipe keys that name a model or tokenizer the run reads.
INPUT_KEYS = (
    "model_name_or_path",
    "tokenizer_name_or_path",
    "ref_model_name_or_path",
    "reward_model_name_or_path",
)
RECIPE_FILE = "recipe.json"

# Keys a resumed run may not change: each decides what the saved optimizer state, schedule, data position or
# weights mean. (Keys a stage does not have are skipped.) Values derived from the number of processes
# (GRPO's generation_batch_size) are not here: resuming with another number of processes is supported.
FROZEN_KEYS = (
    # optimizer and schedule
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "optim",
    "optim_args",
    "max_grad_norm",
    # batch, data and its order
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "packing",
    "seed",
    "data_seed",
    "data_path",
    "skip_invalid",
    "error_on_unsupervised",
    # the model (its sizes and its tokenizer have checks of their own, with more precise messages:
    # `check_checkpoint_fits` and `check_tokenizer_change`)
    "model_name_or_path",
    "config_overrides",
    "bf16",
    "fp16",
    # objectives
    "assistant_only_loss",
    "completion_only_loss",
    "tag_loss_weight",
    "tag_tokens",
    "beta",
    "loss_type",
    "loss_weights",
    "label_smoothing",
    "ref_model_name_or_path",
    "f_divergence_type",
    "ld_alpha",
    "num_generations",
    "steps_per_generation",
    "num_iterations",
    "temperature",
    "top_p",
    "top_k",
    "max_completion_length",
    "max_prompt_length",
    "epsilon",
    "epsilon_high",
    "scale_rewards",
    "importance_sampling_level",
    "multi_objective_aggregation",
    "reward_funcs",
    "reward_weights",
    "reward_model_name_or_path",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_init_std",
)
# Keys naming files or directories: a run directory moved with its data (or a model copied elsewhere) is the same
# run, so these are compared by what they hold (`fingerprint`), not by their path.
PATH_KEYS = (
    "data_path",
    "model_name_or_path",
    "tokenizer_name_or_path",
    "ref_model_name_or_path",
    "reward_model_name_or_path",
)
FINGERPRINTS = "_fingerprints"
_SAMPLE = 1 << 16
# Keys whose change is expected and needs no line in the log.
_IGNORED = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir", "logging_dir", "run_name")


def _paths_of(key: str, value: str) -> list[tuple[str, Path]]:
    """The paths the input `value` of `key` stands for: itself, and for a LoRA adapter its base too."""
    paths = [(key, Path(value))]
    try:
        if source_kind(value) == "adapter":
            paths.append((f"{key} (the adapter's base)", Path(adapter_base(value))))
    except Exception:  # an unusable source is reported by its own check; here it only counts as itself
        pass
    return paths


def check_inputs_outside_output(args: Any, output_dir: str) -> None:
    """Refuse an `output_dir` that is, contains or lies inside a model or tokenizer the recipe reads."""
    out = Path(output_dir).resolve()
    for key in INPUT_KEYS:
        value = getattr(args, key, None)
        if not value or not isinstance(value, str) or not Path(value).exists():
            continue
        for name, path in _paths_of(key, value):
            path = path.resolve()
            # A .pth file is its own input; a directory is compared as a whole.
            if path == out:
                relation = "is"
            elif path.is_relative_to(out):
                relation = "contains"
            elif out.is_relative_to(path) and path.is_dir():
                relation = "lies inside"
            else:
                continue
            raise RecipeError(
                f"output_dir {output_dir} {relation} {name} {value}: the run would write over (or, with "
                "overwrite_output_dir, delete) a model it reads; choose another output_dir"
            )


def _plain(value: Any) -> Any:
    """A JSON form of a recipe value (enums by their value; anything else JSON cannot hold as its str)."""
    value = getattr(value, "value", value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def fingerprint(path: str) -> Any:
    """What a file or directory holds, cheaply: a file's size and a hash of its first and last 64 KiB (a data file
    may be many GB); a directory's file names and sizes. None for what does not exist."""
    target = Path(path)
    if target.is_file():
        size = target.stat().st_size
        digest = hashlib.sha256()
        with target.open("rb") as handle:
            digest.update(handle.read(_SAMPLE))
            if size > _SAMPLE:
                handle.seek(max(_SAMPLE, size - _SAMPLE))
                digest.update(handle.read(_SAMPLE))
        return [size, digest.hexdigest()]
    if target.is_dir():
        return sorted([p.name, p.stat().st_size] for p in target.iterdir() if p.is_file())
    return None


def recipe_snapshot(*configs: Any) -> dict[str, Any]:
    """The recipe's values, as written into each checkpoint, with the fingerprints of its `PATH_KEYS`."""
    snapshot: dict[str, Any] = {}
    for config in configs:
        for item in dataclasses.fields(config):
            snapshot[item.name] = _plain(getattr(config, item.name))
    prints = {}
    for key in PATH_KEYS:
        value = snapshot.get(key)
        if value:
            prints[key] = [fingerprint(v) for v in value] if isinstance(value, list) else fingerprint(value)
    snapshot[FINGERPRINTS] = prints
    return snapshot


def write_recipe(checkpoint: Path, snapshot: dict[str, Any]) -> None:
    if checkpoint.is_dir():
        (checkpoint / RECIPE_FILE).write_text(json.dumps(snapshot, indent=1, sort_keys=True))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, str) and isinstance(b, str) and os.sep in a + b:
        return Path(a).resolve() == Path(b).resolve()  # a path given relative once and absolute once
    return a == b


def _missing(prints: Any) -> bool:
    return prints is None or (isinstance(prints, list) and any(p is None for p in prints))


def check_resume_recipe(checkpoint: str | None, snapshot: dict[str, Any]) -> None:
    """Refuse resuming with another value of a `FROZEN_KEYS` key; log what else changed and that it wins."""
    if checkpoint is None:
        return
    saved_file = Path(checkpoint) / RECIPE_FILE
    if not saved_file.is_file():
        logger.warning(
            "resume_from_checkpoint: %s holds no %s (saved by an older version): the recipe cannot be compared with "
            "the one it was trained with",
            checkpoint,
            RECIPE_FILE,
        )
        return
    try:
        saved = json.loads(saved_file.read_text())
    except ValueError as err:
        raise RecipeError(f"resume_from_checkpoint: {saved_file} is unreadable ({err})") from err
    saved_prints, prints = saved.get(FINGERPRINTS, {}), snapshot.get(FINGERPRINTS, {})
    moved = []
    changed = []
    for key in snapshot:
        if key == FINGERPRINTS or key not in saved or key in _IGNORED or _same(saved[key], snapshot[key]):
            continue
        if key in PATH_KEYS and key in saved_prints and saved_prints[key] == prints.get(key):
            moved.append(key)  # another path to the same content
        elif key in PATH_KEYS and _missing(prints.get(key)):
            continue  # a file that is gone: its loader says so, naming it
        else:
            changed.append(key)
    if moved:
        logger.info("resuming %s: %s moved, with the same content", checkpoint, ", ".join(moved))
    frozen = [key for key in changed if key in FROZEN_KEYS]
    if frozen:
        listed = ", ".join(f"{key} {json.dumps(saved[key])} -> {json.dumps(snapshot[key])}" for key in frozen)
        raise RecipeError(
            f"resume_from_checkpoint: {checkpoint} was trained with other values of keys a run cannot change midway "
            f"({listed}); resume with the checkpoint's values, or start a new run from its weights "
            f"(model_name_or_path: {checkpoint})"
        )
    if changed:
        listed = ", ".join(f"{key} {json.dumps(saved[key])} -> {json.dumps(snapshot[key])}" for key in changed)
        schedule = (
            "; the learning-rate schedule continues over the new length"
            if {"max_steps", "num_train_epochs"} & set(changed)
            else ""
        )
        logger.warning("resuming %s with changed keys, the new values win: %s%s", checkpoint, listed, schedule)


class RecipeIntervals(TrainerCallback):
    """On a resumed run, the recipe's logging, eval and save intervals, not the checkpoint's (see the module doc)."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)
