"""What every trainer of a recipe gets, as `TrainerCallback`s, so it works unchanged on any TRL trainer:

- `NonFiniteGuard`: stops (or skips) a step whose gradient is not finite, and never lets a non-finite model be
  saved; `raise_if_diverged` then turns a diverged run into `TrainingDiverged` instead of a final model;
- `NoSignalGuard`: stops a run whose objective gave no learning signal (GRPO: no completion could be scored, or
  no group's rewards differed for `patience` steps); `raise_if_diverged` then raises `TrainingGaveNoSignal`;
- `SealCheckpointCallback`: seals each checkpoint once complete, then rotates old ones (`checkpointing.py`);
- swanlab: `start_swanlab` starts (or continues) the run and returns swanlab's own callback;
  `write_swanlab_run_id` keeps the run id inside each checkpoint, so that a resumed run continues it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

# The sealing callback calls `checkpointing.<function>` through the module, so that the fault-injection harness
# and the tests can replace a step of the save there.
from . import checkpointing
from .checkpointing import discard_checkpoint, is_sealed, list_checkpoints
from .errors import TrainingDiverged, TrainingGaveNoSignal

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

logger = logging.getLogger("minimind_hf")
# The sealing callback logs where the rest of checkpointing does.
_checkpoint_logger = logging.getLogger("minimind_hf.checkpointing")

NONFINITE_POLICIES = ("stop", "skip")
# A `log_history` entry marks each skipped step, so the count survives a resume (it is in every checkpoint's
# trainer_state.json) and shows in the final one.
SKIPPED_STEP_KEY = "nonfinite_step_skipped"
SWANLAB_RUN_FILE = "swanlab_run_id.txt"
# swanlab would otherwise copy the console into the run, i.e. every redraw of the Trainer's progress bar; the
# metrics are what is logged.
SWANLAB_SETTINGS: dict[str, Any] = {"terminal": {"proxy_type": "none"}}


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


class NoSignalGuard(TrainerCallback):
    """Stops a run whose objective gives no signal, instead of saving an unchanged model as finished.

    It reads what TRL logs (`on_log`), so it needs no change to a trainer. With GRPO:

    - no completion of a whole logging window could be scored (every reward function returned None, e.g. rows
      without the `answer` exact_match needs, or NaN): TRL logs `reward` as None, every advantage is 0 and the loss
      0. The run stops at that window.
    - every group's rewards were equal (`frac_reward_zero_std` 1: every advantage 0) for `patience` steps in a row.
      A weak model can fail every prompt of a few steps, so one such window is only logged; `patience` 0 turns
      this rule off.

    The stop saves nothing more; `raise_if_diverged` then raises `TrainingGaveNoSignal`. Evaluation logs
    (`eval_*`) are not judged.
    """

    def __init__(self, patience: int = 0):
        self.patience = patience
        self.no_signal: str | None = None
        self.flat_since: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "reward" not in logs:
            return
        reward = logs["reward"]
        if reward is None or (isinstance(reward, float) and math.isnan(reward)):
            self.no_signal = (
                f"steps up to {state.global_step}: no completion could be scored (every reward function returned "
                'None or NaN): check that the rows hold what the rewards read (exact_match: an "answer")'
            )
        elif logs.get("frac_reward_zero_std") == 1.0:
            first = self.flat_since = self.flat_since or max(1, state.global_step - args.logging_steps + 1)
            logger.warning("steps %d-%d: every group's rewards were equal: no signal", first, state.global_step)
            if self.patience and state.global_step - first + 1 >= self.patience:
                self.no_signal = (
                    f"steps {first}-{state.global_step}: every group's completions got the same reward, so every "
                    f"advantage was 0 (no_signal_patience: {self.patience}); check the rewards, or raise temperature"
                )
        else:
            self.flat_since = None
        if self.no_signal is not None:
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
    silent = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoSignalGuard)), None)
    if silent is not None and silent.no_signal is not None:
        raise TrainingGaveNoSignal(
            f"the objective gave no learning signal ({silent.no_signal}); the run stopped without a final model"
        )
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


class SealCheckpointCallback(TrainerCallback):
    """Seals each checkpoint once the Trainer has written all of it, then rotates old ones (see the module doc).

    The recipe hands this callback its `save_total_limit` and leaves the Trainer's own at None: the library
    rotates inside its private `_save_checkpoint`, before any public hook runs, so its rotation could delete the
    last sealed checkpoint while the new one is still unsealed. `extra_files(checkpoint)` writes files that belong
    in the checkpoint (the logging run id) before the seal, so that the manifest covers them.
    """

    def __init__(self, save_total_limit: int | None = None, extra_files: Callable[[Path], None] | None = None):
        self.save_total_limit = save_total_limit
        self.extra_files = extra_files

    def on_step_end(self, args, state, control, **kwargs):
        # A directory of this step's name is left by an interrupted save, or by a run that went further before we
        # resumed from an older checkpoint: saving over it in place would mix the files of two saves.
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if control.should_save and state.is_world_process_zero and folder.exists():
            _checkpoint_logger.warning("replacing %s, left by an earlier run", folder)
            discard_checkpoint(folder)
        PartialState().wait_for_everyone()

    def on_save(self, args, state, control, **kwargs):
        # Every rank writes its own RNG state: all must be done before the seal lists the files.
        PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if self.extra_files is not None:
                self.extra_files(folder)
            checkpointing.seal_checkpoint(folder)
            checkpointing.rotate_complete_checkpoints(
                args.output_dir, self.save_total_limit, keep=[folder, state.best_model_checkpoint]
            )
        PartialState().wait_for_everyone()


def write_swanlab_run_id(checkpoint: Path) -> None:
    """Keep the swanlab run id inside a checkpoint, so that a resumed run continues the same swanlab run."""
    try:
        import swanlab

        run = swanlab.get_run()
    except Exception:
        run = None
    if run is not None and checkpoint.is_dir():
        (checkpoint / SWANLAB_RUN_FILE).write_text(run.id)


def start_swanlab(args: Any, training_args: TrainingArguments, resume_from: str | None) -> list[TrainerCallback]:
    """swanlab logging, continuing the run saved with the checkpoint we resume from.

    transformers' built-in `report_to: swanlab` calls `swanlab.get_run()`, which raises in swanlab >= 0.9 when
    no run is active; swanlab's own transformers callback is used instead, on a run started here (on the main
    process) so that it can carry the resumed run id. `SWANLAB_MODE=local|offline|disabled` works as usual.
    """
    if "swanlab" not in training_args.report_to:
        return []
    training_args.report_to = [name for name in training_args.report_to if name != "swanlab"]
    import swanlab
    from swanlab.integration.transformers import SwanLabCallback

    if training_args.process_index == 0:
        run_file = Path(resume_from or "", SWANLAB_RUN_FILE)
        run_id = run_file.read_text().strip() if resume_from and run_file.is_file() else None
        swanlab.init(
            project=os.environ.get("SWANLAB_PROJECT", args.swanlab_project),
            experiment_name=training_args.run_name,
            logdir=os.environ.get("SWANLAB_LOG_DIR", str(Path(training_args.output_dir) / "swanlog")),
            id=run_id,
            resume="allow" if run_id else None,
            settings=swanlab.Settings(**SWANLAB_SETTINGS),
        )
    return [SwanLabCallback()]
