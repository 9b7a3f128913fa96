"""Guard rails around a training run: what an unlucky user can do wrong, refused early with one clear line.

`run_recipe` calls these at fixed points of its lifecycle:

- `check_recipe` right after parsing: value types and ranges of every key, the optimizer and learning-rate
  schedule built once on a dummy parameter, the attention implementation on a tiny model, so that an impossible
  recipe fails in milliseconds instead of mid-training;
- `check_resume_point`: resuming needs a Trainer checkpoint (optimizer and scheduler state), not a model;
- `check_tokenizer_change`: a model keeps the tokenizer it was trained with; another vocabulary is refused;
- `check_model_fits`: the embedding covers every id the tokenizer can emit, and `max_length` fits the model;
- `check_output_dir_use`: an `output_dir` holding another run is not overwritten unless the recipe says so, and
  one in use by a live run (`RunLock`) is refused naming its holder;
- `NonFiniteGuard`: a callback that stops (or skips) a step whose gradient is not finite, and never lets a
  non-finite model be saved.

Every refusal is a `RecipeError` (one `error:` line from the command line), raised before anything is written.
The command-line tools use the argparse types at the end (`positive_int`, ...).
"""

from __future__ import annotations

import argparse
import difflib
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from .checkpointing import FINAL_MANIFEST, discard_checkpoint, is_sealed, list_checkpoints
from .configuration_minimind import MiniMindConfig
from .convert import parse_overrides
from .loading import ModelSourceError, tokenizer_source
from .tokenizer import load_tokenizer

if TYPE_CHECKING:  # the command-line tools import this module too, and need not load the Trainer
    from transformers import Trainer, TrainingArguments

logger = logging.getLogger("minimind_hf")

NONFINITE_POLICIES = ("stop", "skip")
# A `log_history` entry marks each skipped step, so the count survives a resume (it is in every checkpoint's
# trainer_state.json) and shows in the final one.
SKIPPED_STEP_KEY = "nonfinite_step_skipped"
LOCK_FILE = "run.lock"
# Values a key takes beyond its declared type: the recipes document `resume_from_checkpoint: true`.
ALSO_ACCEPTED: dict[str, Any] = {"resume_from_checkpoint": bool}
# What a run leaves in its output_dir besides its sealed checkpoints: refusing to write over these is what keeps a
# finished run safe. An unsealed checkpoint is debris of an interrupted save, which the next save replaces.
RUN_FILES = (FINAL_MANIFEST, "config.json", "model.safetensors", "trainer_state.json")


class RecipeError(ValueError):
    """A recipe that cannot run; raised before any model, data or output directory is touched (defined here, with
    the checks that raise it; `minimind_hf.training` re-exports it)."""


class TrainingDiverged(RecipeError):
    """Training produced a non-finite gradient or weights; nothing non-finite was saved."""


def _fail(key: str, message: str) -> typing.NoReturn:
    raise RecipeError(f"{key}: {message}")


def _accepts(value: Any, hint: Any) -> bool | None:
    """Whether `value` fits a simple type hint (bool, int, float, str, None, list[str] and unions of them); None
    for hints this check does not judge (enums, dicts, ...), which their own classes validate."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(value, arg) for arg in typing.get_args(hint)]
        if None in verdicts:
            return None
        return any(verdicts)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if item is not str:
            return None
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return None


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return "a list of strings"
    return names.get(hint, str(hint))


def check_value_types(*configs: Any) -> None:
    """Every key of simple type holds a value of that type.

    argparse converts the strings of the command line and of the YAML, but a YAML value that is already a list,
    a number or a boolean reaches the dataclass unchecked: `learning_rate: true` would train at 1.0.
    """
    for config in configs:
        try:
            hints = typing.get_type_hints(type(config))
        except (NameError, TypeError):  # an annotation this Python cannot resolve: leave the types to the class
            hints = {}
        for item in fields(config):
            value = getattr(config, item.name)
            hint = hints.get(item.name)
            if item.name in ALSO_ACCEPTED:
                hint = hint | ALSO_ACCEPTED[item.name]
            if hint is not None and _accepts(value, hint) is False:
                shown = json.dumps(value) if isinstance(value, (list, bool, type(None))) else repr(value)
                _fail(item.name, f"expected {_type_name(hint)}, got {shown}")


def _check_ranges(args: Any, training_args: TrainingArguments, resuming: bool) -> None:
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, key) < 1:
            _fail(key, f"must be at least 1, got {getattr(training_args, key)}")
    for key in ("learning_rate", "weight_decay", "max_grad_norm", "dataloader_num_workers", "num_train_epochs"):
        if getattr(training_args, key) < 0:
            _fail(key, f"must be >= 0, got {getattr(training_args, key)}")
    for key, strategy in (("save_steps", "save_strategy"), ("logging_steps", "logging_strategy")):
        if getattr(training_args, strategy) == "steps" and not getattr(training_args, key) > 0:
            _fail(
                key,
                f"must be positive with {strategy}: steps, got {getattr(training_args, key)} "
                f"(set {strategy}: no for none)",
            )
    if (
        training_args.eval_strategy == "steps"
        and training_args.eval_steps is not None
        and training_args.eval_steps <= 0
    ):
        _fail("eval_steps", f"must be positive, got {training_args.eval_steps}")
    if training_args.save_total_limit is not None and training_args.save_total_limit < 1:
        _fail(
            "save_total_limit",
            f"must be at least 1 (null keeps every checkpoint), got {training_args.save_total_limit}",
        )
    if not 0 <= training_args.seed < 2**32:
        _fail("seed", f"must be in 0..2**32-1, got {training_args.seed}")
    max_length = getattr(training_args, "max_length", None)
    if max_length is not None and max_length < 1:
        _fail("max_length", f"must be a positive number of tokens, got {max_length}")
    if max_length is None and getattr(training_args, "packing", False):
        _fail("max_length", "is null, but packing needs the length of the rows it packs into")
    if not str(training_args.output_dir).strip():
        _fail("output_dir", "is empty; name the directory the run writes to")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        _fail("max_steps", f"must be positive, or -1 to train num_train_epochs epochs; got {training_args.max_steps}")
    if training_args.max_steps == -1 and training_args.num_train_epochs == 0 and not resuming:
        _fail("num_train_epochs", "is 0 and max_steps is not set: the run would save an untrained model")
    if not args.data_path:
        _fail("data_path", "is empty; name at least one JSON Lines file")
    if args.on_nonfinite not in NONFINITE_POLICIES:
        _fail("on_nonfinite", f"must be one of {', '.join(NONFINITE_POLICIES)}, got {args.on_nonfinite!r}")


def _check_optimizer(training_args: TrainingArguments) -> None:
    """Build the optimizer and learning-rate schedule once, on a dummy parameter, as the Trainer will.

    Their own constructors validate the learning rate, betas, weight decay and every `lr_scheduler_kwargs` key;
    otherwise those errors come only when training starts, after the data and model are loaded.
    """
    from transformers import Trainer
    from transformers.optimization import get_scheduler

    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
    if not optimizer_cls.__module__.startswith("torch.optim"):
        return  # Optimizers of other libraries may need the real model; they are built by the Trainer only.
    try:
        optimizer = optimizer_cls([torch.nn.Parameter(torch.zeros(1))], **optimizer_kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        _fail("optim", f"{training_args.optim} cannot be built with these settings: {err}")
    steps = training_args.max_steps if training_args.max_steps > 0 else 100
    kwargs = training_args.lr_scheduler_kwargs
    if not isinstance(kwargs, dict):
        _fail("lr_scheduler_kwargs", f"must be a mapping such as {{min_lr_rate: 0.1}}, got {kwargs!r}")
    try:
        get_scheduler(
            training_args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=training_args.get_warmup_steps(steps),
            num_training_steps=steps,
            scheduler_specific_kwargs=kwargs,
        )
    except (ValueError, TypeError) as err:
        name = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
        _fail("lr_scheduler_kwargs", f"{name} cannot be built with {kwargs}: {err}")


def _check_report_to(training_args: TrainingArguments) -> None:
    from transformers.integrations import get_reporting_integration_callbacks

    try:  # only looks the names up; the Trainer would do it after the data and the model are loaded
        get_reporting_integration_callbacks(training_args.report_to)
    except ValueError as err:
        _fail("report_to", str(err))


def config_overrides_problem(text: str) -> str | None:
    """Why `config_overrides` ("k=v,...") cannot apply, or None. Checked for every model source: a directory's
    loader compares the overrides with its config and would pass over a misspelt field unseen."""
    try:
        overrides = parse_overrides(text)
    except ValueError as err:
        return str(err)
    known = sorted(set(MiniMindConfig.__dataclass_fields__) | {"rope_theta"})
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            return f"unknown MiniMindConfig field '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    return None


def check_attn_implementation(name: str) -> None:
    """The attention implementation can run here: checked by transformers itself on a tiny model."""
    from .modeling_minimind import MiniMindForCausalLM

    config = MiniMindConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config._attn_implementation = name
    try:
        MiniMindForCausalLM(config)
    except (ImportError, ValueError, RuntimeError) as err:
        _fail("attn_implementation", f"{name!r} cannot be used here ({str(err).splitlines()[0]}); sdpa always works")


def check_recipe(args: Any, training_args: TrainingArguments) -> None:
    """Everything about the recipe's values that can be known before any file is read (see the module doc).

    `num_train_epochs: 0` is accepted when resuming: it publishes the checkpoint as the final model.
    """
    check_value_types(args, training_args)
    resuming = str(training_args.resume_from_checkpoint or "").lower() not in ("", "false")
    _check_ranges(args, training_args, resuming)
    _check_optimizer(training_args)
    _check_report_to(training_args)
    if problem := config_overrides_problem(args.config_overrides):
        _fail("config_overrides", problem)
    check_attn_implementation(args.attn_implementation)


def check_command_line(argv: list[str]) -> None:
    """`--config` must name a file; argparse would otherwise read the next flag, or nothing, as its value."""
    for i, item in enumerate(argv):
        if item == "--config" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            raise RecipeError("--config needs a recipe file: --config FILE.yaml")


def check_resume_point(checkpoint: str | None) -> None:
    """A resume point must hold optimizer and scheduler state: resuming from a model directory would silently
    restart both (a new run from those weights is `model_name_or_path`, which says so)."""
    if checkpoint is None:
        return
    folder = Path(checkpoint)
    if any(folder.glob("optimizer*")) or any(folder.glob("global_step*")):  # plain/FSDP, or DeepSpeed
        return
    if (folder / FINAL_MANIFEST).is_file() or list_checkpoints(folder):
        what = "a final model directory"
    else:
        what = "a model without optimizer state (a checkpoint saved with save_only_model: true, or not one at all)"
    hint = (
        f"; to continue the newest checkpoint in it, set output_dir: {folder} and resume_from_checkpoint: true"
        if list_checkpoints(folder)
        else ""
    )
    raise RecipeError(
        f"resume_from_checkpoint: {folder} is {what}, not a Trainer checkpoint (no optimizer or scheduler state to "
        f"resume); to start a new run from its weights, set model_name_or_path: {folder} and resume_from_checkpoint:"
        f" false{hint}"
    )


def check_tokenizer_change(args: Any, tokenizer: PreTrainedTokenizerBase, resume_from: str | None) -> None:
    """The recipe's tokenizer has the vocabulary of the one saved with the model (and with the checkpoint resumed
    from): with another one, the trained embeddings would stand for other tokens. `allow_tokenizer_change`
    accepts it, for a deliberate vocabulary change."""
    if args.allow_tokenizer_change:
        return
    for key, source in (("resume_from_checkpoint", resume_from), ("model_name_or_path", args.model_name_or_path)):
        try:
            own = tokenizer_source(source)
        except ModelSourceError as err:
            raise RecipeError(f"{key} {err}") from err
        if own is None or Path(own).resolve() == Path(tokenizer.name_or_path).resolve():
            continue
        try:
            theirs = load_tokenizer(own).get_vocab()
        except (OSError, ValueError) as err:
            raise RecipeError(f"{key} {source}: its tokenizer cannot be loaded ({err})") from err
        ours = tokenizer.get_vocab()
        if theirs != ours:
            differ = sum(theirs.get(token) != index for token, index in ours.items())
            raise RecipeError(
                f"tokenizer {tokenizer.name_or_path} is not the tokenizer {source} was trained with "
                f"({len(ours)} vs {len(theirs)} tokens, {differ} with another id): its embeddings would stand for "
                "other tokens. Leave tokenizer_name_or_path unset to use the model's own, or set "
                "allow_tokenizer_change: true if the change is intended"
            )


def tokenizer_id_count(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many embedding rows the tokenizer needs: one past the largest id it can emit, added tokens included."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def check_model_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> None:
    """The model's embedding covers every id the tokenizer can emit (else the first rare token raises an
    IndexError hours in), and `max_length` does not exceed the positions the model declares."""
    rows = min(model.get_input_embeddings().num_embeddings, model.get_output_embeddings().out_features)
    needed = tokenizer_id_count(tokenizer)
    if rows < needed:
        raise RecipeError(
            f"the model has {rows} embedding rows (vocab_size={model.config.vocab_size}) but tokenizer "
            f"{tokenizer.name_or_path} emits ids up to {needed - 1} ({len(tokenizer)} tokens); a new model needs "
            f"config_overrides: vocab_size={needed}, a trained one the tokenizer it was trained with"
        )
    positions = model.config.max_position_embeddings
    if max_length is not None and max_length > positions:
        raise RecipeError(
            f"max_length {max_length} is above the model's max_position_embeddings {positions}: lower max_length, "
            f"or give a new model config_overrides: max_position_embeddings={max_length}"
        )


def previous_run(output_dir: str | os.PathLike) -> list[str]:
    """What in `output_dir` belongs to a run: its complete checkpoints and final model files."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p.name for p in list_checkpoints(root) if is_sealed(p)]
    found += [name for name in RUN_FILES if (root / name).exists()]
    return found


def _main_process_decides(problem: Callable[[], str | None]) -> None:
    """Run `problem()` on the main process only and raise its answer on every process.

    What the main process sees of `output_dir` is what counts: another node may not share the directory, and a
    slower rank of this very run could otherwise find the lock its own main process has just taken. Every process
    gets the same answer, so all stop together rather than wait for one that stopped.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    message = problem() if state.is_main_process else None
    if state.num_processes > 1:
        message = broadcast_object_list([message])[0]
    if message is not None:
        raise RecipeError(message)


def _output_dir_problem(output_dir: str, resume_from: str | None, overwrite: bool) -> str | None:
    holder = RunLock(output_dir).holder()
    if holder is not None:
        return RunLock.busy_message(output_dir, holder)
    found = previous_run(output_dir)
    if not found or overwrite:
        return None
    if resume_from is not None and Path(resume_from).resolve().parent == Path(output_dir).resolve():
        return None
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    return (
        f"output_dir {output_dir} holds another run ({shown}): set resume_from_checkpoint: true to continue it, "
        "overwrite_output_dir: true to replace it, or choose another output_dir"
    )


def _writable_problem(output_dir: str) -> str | None:
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{os.getpid()}"  # one per process: two runs may probe the directory at once
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return f"output_dir {output_dir} is not writable: {err}"
    return None


def check_output_dir_writable(output_dir: str) -> None:
    """Fail before training when the output directory cannot be written (not after hours, at the first save).
    Decided by the main process, the one that saves."""
    _main_process_decides(lambda: _writable_problem(output_dir))


def check_output_dir_use(output_dir: str, resume_from: str | None, overwrite: bool) -> None:
    """`output_dir` is not in use by a live run, and holds no other run, unless this run resumes from a checkpoint
    in it or `overwrite` (the recipe's `overwrite_output_dir`) says to replace it. Decided by the main process."""
    _main_process_decides(lambda: _output_dir_problem(output_dir, resume_from, overwrite))


def clear_previous_run(output_dir: str) -> None:
    """With `overwrite_output_dir`, remove the earlier run's checkpoints and final model first: a checkpoint left
    from it would otherwise be what a later `resume_from_checkpoint: true` continues."""
    from accelerate import PartialState

    state = PartialState()
    root = Path(output_dir)
    for name in previous_run(root) if state.is_main_process else []:
        path = root / name
        logger.warning("overwrite_output_dir: removing %s of the earlier run", path)
        if name.startswith("checkpoint-"):
            discard_checkpoint(path)
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    state.wait_for_everyone()


class RunLock:
    """An exclusive lock on `output_dir` for the length of a run (`fcntl.flock` on `output_dir/run.lock`).

    The file names its holder (pid, host, start time, command). The kernel drops the lock when the holding
    process dies, however it dies, so a file left by a killed run never blocks the next one: only a live holder
    does. The file is removed on release while still locked; an opener that raced with that finds its inode
    unlinked and retries on a fresh file.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> dict | None:
        """Who holds the lock now (what its file says), or None when it is free."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._read(fd)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except ValueError:
            return {}

    @staticmethod
    def busy_message(output_dir: str | os.PathLike, holder: dict) -> str:
        who = ", ".join(f"{key} {holder[key]}" for key in ("pid", "host", "started") if key in holder)
        command = f": {holder['command']}" if holder.get("command") else ""
        return (
            f"output_dir {output_dir} is in use by another run ({who or 'holder unknown'}{command}); wait for it to "
            f"end or choose another output_dir (the lock, {Path(output_dir) / LOCK_FILE}, is released as soon as "
            "that process ends)"
        )

    def acquire(self) -> RunLock:
        """Take the lock, or raise `RecipeError` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise RecipeError(self.busy_message(self.path.parent, holder)) from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


@contextmanager
def run_lock(output_dir: str) -> Iterator[None]:
    """Hold `RunLock(output_dir)` for the block. Under DDP the main process takes it for the whole run (a shared
    lock per rank would conflict with its own main process's, and other nodes may not share the directory); every
    process learns whether it could, so that all stop together when it is busy."""
    lock = None

    def take() -> str | None:
        nonlocal lock
        try:
            lock = RunLock(output_dir).acquire()
        except RecipeError as err:
            return str(err)
        return None

    _main_process_decides(take)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether the 2-norm of all `tensors` together is finite, agreed by every process of a distributed run (so
    that all take the same decision; each checks its own shards under FSDP)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    local = [t for t in local if t.numel()]
    device = local[0].device if local else torch.device("cpu")
    bad = torch.zeros((), device=device)
    if local:
        bad = (~torch.isfinite(torch.nn.utils.get_total_norm(local))).float().to(device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad)


class NonFiniteGuard(TrainerCallback):
    """Stops training at a step whose gradient norm is not finite, or skips that step (`policy="skip"`).

    Checked in `on_pre_optimizer_step`, after the Trainer's clipping (a non-finite norm leaves non-finite
    gradients behind it). A NaN loss always gives one; the logged loss cannot be trusted for this, as
    transformers' `logging_nan_inf_filter` replaces it by a running mean. The step's update is then not applied:
    every gradient is set to None, which `torch.optim` optimizers skip entirely (zeroed gradients would not do:
    AdamW would still move the weights by momentum and weight decay). Weights, optimizer moments and step counts
    stay exactly as they were; the step still counts (step number, data position and learning-rate schedule go
    on), so a run with skipped steps resumes exactly. Skipped steps are logged and counted in `log_history`.

    With "stop" the run ends at that step without saving it; the recipe then raises `TrainingDiverged` instead of
    writing a final model (`raise_if_diverged`). In both modes a checkpoint is saved only when the weights are
    finite. With fp16 the GradScaler already skips steps that overflow, so gradients are not judged then;
    DeepSpeed keeps its gradients out of `param.grad` and is not covered.
    """

    def __init__(self, policy: str = "stop"):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"policy must be one of {NONFINITE_POLICIES}, got {policy!r}")
        self.policy = policy
        self.diverged: str | None = None
        self.skipped_now = False
        self.steps_run = 0
        self.steps_skipped = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps_run = self.steps_skipped = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps_run += 1
        if model is None or getattr(optimizer, "scaler", None) is not None:
            return
        if all_finite(p.grad for p in model.parameters() if p.grad is not None):
            return
        for parameter in model.parameters():
            parameter.grad = None
        step = state.global_step + 1
        if self.policy == "skip":
            self.skipped_now = True
            self.steps_skipped += 1
            logger.warning(
                "step %d: non-finite gradient norm, update skipped (%d skipped)", step, skipped_steps(state) + 1
            )
        else:
            self.diverged = f"step {step}: the gradient norm is not finite"
            control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.skipped_now:
            self.skipped_now = False
            state.log_history.append({SKIPPED_STEP_KEY: 1, "step": state.global_step})
        self._before_save(state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._before_save(state, control, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The pre-clip norm is only logged: an overflow to inf with finite gradients is clipped to zeros, not NaN.
        # (A skipped step logs its NaN norm too: only "stop" looks here.)
        norm = (logs or {}).get("grad_norm")
        if self.policy == "stop" and isinstance(norm, float) and not math.isfinite(norm):
            self.diverged = self.diverged or f"step {state.global_step}: the gradient norm is {norm}"
            control.should_save = control.should_evaluate = False
            control.should_training_stop = True

    def _before_save(self, state, control, model) -> None:
        if self.diverged is None and control.should_save and model is not None:
            if not all_finite(model.parameters()):
                self.diverged = f"step {state.global_step}: the weights are not finite"
        if self.diverged is not None:
            control.should_save = control.should_evaluate = False
            control.should_training_stop = True


def skipped_steps(state) -> int:
    """How many steps of the run (resumed runs included) were skipped for a non-finite gradient."""
    return sum(1 for entry in state.log_history if entry.get(SKIPPED_STEP_KEY))


def _last_checkpoint_note(output_dir: str) -> str:
    sealed = [folder for folder in list_checkpoints(output_dir) if is_sealed(folder)]
    if not sealed:
        return "There is no complete checkpoint."
    return (
        f"The last complete checkpoint, {sealed[-1]}, is intact; resumed as is it diverges again, so start a new run "
        f"from its weights (model_name_or_path: {sealed[-1]}) with a lower learning_rate"
    )


def raise_if_diverged(trainer: Trainer) -> None:
    """After `trainer.train()`: raise `TrainingDiverged` instead of letting a diverged run save a final model."""
    guard = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteGuard)), None)
    output_dir = trainer.args.output_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    if guard is not None and guard.diverged is None and not all_finite(model.parameters()):
        guard.diverged = f"step {trainer.state.global_step}: the weights are not finite"
    if guard is None or guard.diverged is None:
        if guard is not None and guard.steps_run and guard.steps_skipped == guard.steps_run:
            raise TrainingDiverged(
                f"every one of the {guard.steps_run} steps of this run had a non-finite gradient norm and was "
                f"skipped: nothing was learned; lower learning_rate (now {trainer.args.learning_rate})"
            )
        if guard is not None and guard.steps_skipped:
            logger.warning(
                "%d of %d steps skipped for a non-finite gradient norm (%d in the whole run)",
                guard.steps_skipped,
                guard.steps_run,
                skipped_steps(trainer.state),
            )
        return
    raise TrainingDiverged(
        f"training diverged at {guard.diverged} (learning_rate {trainer.args.learning_rate}, max_grad_norm "
        f"{trainer.args.max_grad_norm}); the run stopped without saving that step or a final model. "
        f"{_last_checkpoint_note(output_dir)}, or set on_nonfinite: skip to skip such steps"
    )


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
