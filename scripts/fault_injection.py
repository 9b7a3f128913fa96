"""Kill a real SFT run at chosen moments, resume it until it finishes, and check that it ends bit for bit where an
uninterrupted run ends.

    python scripts/fault_injection.py --kills 20      # the first 20 kill points (default: all of them)
    python scripts/fault_injection.py --only step:5,save:6:unsealed --keep /tmp/fault_injection

Each run is `recipes/sft.py` on a tiny model (hidden 32, 2 layers, 10 steps, a checkpoint every 3 steps, at most
2 kept), float32 on the CPU with one thread, on generated data. A kill point is a list of faults, one per attempt:
the attempt dies by SIGKILL at that moment (the process signals itself at the exact point, or, for `timed`
points, this script kills it after a random delay), and the next attempt runs with `--resume_from_checkpoint
true`, until an attempt without a fault finishes. The final weights must equal the uninterrupted run's exactly
(max abs diff 0), and each resume must start from the expected checkpoint. `disk_full:N` is no kill: the save
of step N hits RLIMIT_FSIZE (writes fail with EFBIG, as on a full disk); the run must stop with a clear
message and resume from the previous checkpoint.

The script imports torch and the recipe once and forks one process per attempt: a fresh interpreter would
spend more time starting (5-15 s) than the run itself (about 3 s). A forked attempt is an ordinary process,
killed by an ordinary SIGKILL. Prints a table and exits non-zero on any mismatch.
"""

# ruff: noqa: E402 (the environment must be set before torch is imported)
from __future__ import annotations

import os

# Bitwise-equal results need the same thread count in every run, and forked children must not inherit a live
# OpenMP pool: one thread, set before torch is imported.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SWANLAB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import dataclasses
import io
import json
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import datasets
import safetensors.torch
import torch
import transformers.modeling_utils
from datasets.arrow_writer import ArrowWriter
from transformers import Trainer, TrainerCallback, TrainerState

from minimind_hf import checkpointing, training
from minimind_hf.stages import sft
from minimind_hf.testing import final_weights, max_abs_diff, write_sft_data, write_tiny_recipe

MAX_STEPS, SAVE_STEPS, SAVE_TOTAL_LIMIT = 10, 3, 2
RECIPE = {
    "max_steps": MAX_STEPS,
    "logging_steps": 1,
    "save_steps": SAVE_STEPS,
    "save_total_limit": SAVE_TOTAL_LIMIT,
    "use_cpu": True,
}
DISK_LIMIT_BYTES = 64 * 1024
# --sabotage: resumed attempts skip loading the optimizer state, to show that the comparison catches a bad resume.
SABOTAGE = False


@dataclasses.dataclass(frozen=True)
class KillPoint:
    """Faults, one per attempt: `step:N` (after backward, before the optimizer step), `step:N:optimizer` (after
    it), `save:N:P` with P one of start, after_model, after_optimizer, after_rng, torn:FILE (half of FILE
    written), unsealed, manifest, sealed, mid_rotation, done; `final:torn:FILE` (the final save), `data:arrow:K`
    (the K-th Arrow cache file), `resume:load`, `disk_full:N`, `timed:I`."""

    name: str
    moment: str
    resumes: tuple[str, ...] | None  # the checkpoint each resumed attempt must start from ("fresh": none)
    faults: tuple[str, ...] = ()  # one per attempt (default: the name); the attempt after the last runs to the end

    def __post_init__(self):
        if not self.faults:
            object.__setattr__(self, "faults", (self.name,))


KILL_POINTS = [
    KillPoint("step:2", "mid-step 2: after backward, before the optimizer step", ("fresh",)),
    KillPoint("step:5", "mid-step 5, after checkpoint-3", ("checkpoint-3",)),
    KillPoint("save:3:start", "checkpoint-3 save begins, nothing written", ("fresh",)),
    KillPoint("save:3:torn:model.safetensors", "half of checkpoint-3/model.safetensors written", ("fresh",)),
    KillPoint("save:6:after_model", "checkpoint-6: model written, optimizer not", ("checkpoint-3",)),
    KillPoint("save:6:torn:optimizer.pt", "half of checkpoint-6/optimizer.pt written", ("checkpoint-3",)),
    KillPoint("save:6:after_optimizer", "checkpoint-6: optimizer and scheduler written", ("checkpoint-3",)),
    KillPoint("save:6:after_rng", "checkpoint-6: all but trainer_state.json written", ("checkpoint-3",)),
    KillPoint("save:6:torn:trainer_state.json", "half of checkpoint-6/trainer_state.json written", ("checkpoint-3",)),
    KillPoint("save:6:unsealed", "checkpoint-6 fully written, not yet sealed", ("checkpoint-3",)),
    KillPoint("save:6:manifest", "checkpoint-6 manifest in its temp file, not renamed", ("checkpoint-3",)),
    KillPoint("save:6:sealed", "checkpoint-6 sealed, old checkpoints not yet rotated", ("checkpoint-6",)),
    KillPoint("step:8:optimizer", "step 8: after optimizer.step, before the step count", ("checkpoint-6",)),
    KillPoint("save:9:mid_rotation", "checkpoint-9 sealed, rotation half-way deleting checkpoint-3", ("checkpoint-9",)),
    KillPoint("save:9:done", "right after checkpoint-9 is saved", ("checkpoint-9",)),
    KillPoint("save:10:unsealed", "final checkpoint-10 written, not sealed", ("checkpoint-9",)),
    KillPoint(
        "final:torn:model.safetensors",
        "half of the final model.safetensors, in staging",
        ("checkpoint-10",),
    ),
    KillPoint("data:arrow:1", "writing the dataset's Arrow cache", ("fresh",)),
    KillPoint("data:arrow:2", "writing TRL's tokenized Arrow cache", ("fresh",)),
    KillPoint(
        "resume:load",
        "mid-step 5, then while the resumed run loads checkpoint-3",
        ("checkpoint-3", "checkpoint-3"),
        ("step:5", "resume:load"),
    ),
    KillPoint(
        "twice",
        "checkpoint-6 half saved, then mid-step 8 of the resumed run",
        ("checkpoint-3", "checkpoint-6"),
        ("save:6:after_model", "step:8"),
    ),
    KillPoint(
        "three times",
        "mid-step 2, mid-step 5, then checkpoint-9 unsealed",
        ("fresh", "checkpoint-3", "checkpoint-6"),
        ("step:2", "step:5", "save:9:unsealed"),
    ),
    KillPoint("disk_full:6", "checkpoint-6 save fails: file size limit (EFBIG)", ("checkpoint-3",)),
    *(KillPoint(f"timed:{i}", "SIGKILL from outside at a random moment", None) for i in range(1, 7)),
]


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def write_torn(path: str | os.PathLike, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    die()


class FaultCallback(TrainerCallback):
    """Kills the process inside a training step, as a save begins or right after it, or fills the disk before a
    save."""

    def __init__(self, fault: str):
        self.fault = fault

    def on_step_end(self, args, state, control, **kwargs):
        # The step's save runs right after this hook, when `control.should_save` is set.
        if not control.should_save:
            return
        if self.fault == f"save:{state.global_step}:start":
            die()
        if self.fault == f"disk_full:{state.global_step}":
            fill_disk()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.fault == f"step:{state.global_step + 1}":
            die()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.fault == f"step:{state.global_step + 1}:optimizer":
            die()

    def on_save(self, args, state, control, **kwargs):
        if self.fault == f"save:{state.global_step}:done":
            die()


def tear_writes_of(target: Path) -> None:
    """The writer of `target` (safetensors, torch.save or the trainer state's JSON) writes half of it and dies."""
    save_file, torch_save, save_to_json = (
        transformers.modeling_utils.safe_save_file,
        torch.save,
        TrainerState.save_to_json,
    )

    def is_target(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(path).resolve() == target.resolve()

    def torn_save_file(tensors, filename, metadata=None):
        if is_target(filename):
            write_torn(filename, safetensors.torch.save(tensors, metadata=metadata))
        return save_file(tensors, filename, metadata=metadata)

    def torn_torch_save(obj, f, *args, **kwargs):
        if is_target(f):
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            write_torn(f, buffer.getvalue())
        return torch_save(obj, f, *args, **kwargs)

    def torn_save_to_json(self, json_path):
        if is_target(json_path):
            write_torn(json_path, (json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n").encode())
        return save_to_json(self, json_path)

    transformers.modeling_utils.safe_save_file = torn_save_file
    torch.save = torn_torch_save
    TrainerState.save_to_json = torn_save_to_json


def die_before_seal(checkpoint: Path) -> None:
    seal = checkpointing.seal_checkpoint

    def dying_seal(folder, *args, **kwargs):
        if Path(folder).name == checkpoint.name:
            die()
        return seal(folder, *args, **kwargs)

    checkpointing.seal_checkpoint = dying_seal


def die_before_manifest_rename(checkpoint: Path) -> None:
    replace = os.replace

    def dying_replace(src, dst, *args, **kwargs):
        if Path(dst) == checkpoint / checkpointing.MANIFEST:
            die()
        return replace(src, dst, *args, **kwargs)

    os.replace = dying_replace


def die_in_rotation(checkpoint: Path, midway: bool) -> None:
    """Die before rotating after the save of `checkpoint`, or once half the files of the first deleted one are gone."""
    rotate = checkpointing.rotate_complete_checkpoints

    def half_rmtree(path, *args, **kwargs):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        for p in files[: len(files) // 2]:
            p.unlink()
        die()

    def dying_rotate(run_dir, limit, keep=()):
        if Path(next(iter(keep))).name == checkpoint.name:
            if not midway:
                die()
            shutil.rmtree = half_rmtree
        return rotate(run_dir, limit, keep)

    checkpointing.rotate_complete_checkpoints = dying_rotate


def die_in_arrow_write(nth: int) -> None:
    """Die as the `nth` Arrow cache file (dataset generation, then each of TRL's maps) is about to be finalized."""
    finalize, calls = ArrowWriter.finalize, [0]

    def dying_finalize(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            die()
        return finalize(self, *args, **kwargs)

    ArrowWriter.finalize = dying_finalize


def wrap_trainer_method(
    trainer: Trainer, name: str, step: int | None, before: bool = False, checkpoint_only: bool = False
) -> None:
    """Die before or after `trainer.<name>` runs at global step `step` (any step: None)."""
    original = getattr(trainer, name)

    def wrapped(*args, **kwargs):
        hit = step is None or trainer.state.global_step == step
        if hit and before:
            die()
        result = original(*args, **kwargs)
        if hit and (not checkpoint_only or "checkpoint-" in str(args[0])):
            die()
        return result

    setattr(trainer, name, wrapped)


def fill_disk() -> None:
    """From now on no file may grow past DISK_LIMIT_BYTES: writes fail with EFBIG, as on a full disk
    (RLIMIT_FSIZE needs no root, unlike mounting a small tmpfs)."""
    # Without this, exceeding RLIMIT_FSIZE kills the process instead of failing the write.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_LIMIT_BYTES, resource.RLIM_INFINITY))


def install_fault(fault: str, output_dir: Path) -> tuple[list[TrainerCallback], Callable[[Trainer], None]]:
    """Arm `fault` in this (child) process by wrapping what runs at its moment; see KILL_POINTS for the forms.
    Returns the callbacks and the `before_train` hook to run the recipe with."""
    parts = fault.split(":")
    kind = parts[0]
    step = int(parts[1]) if kind in ("save", "disk_full") else None
    checkpoint = output_dir / f"checkpoint-{step}"
    phase = parts[2] if len(parts) > 2 else ""
    if "torn" in parts:
        # The final model is written to a staging folder first (`checkpointing.begin_final`).
        tear_writes_of((output_dir / ".final.partial" if kind == "final" else checkpoint) / parts[-1])
    elif phase == "unsealed":
        die_before_seal(checkpoint)
    elif phase == "manifest":
        die_before_manifest_rename(checkpoint)
    elif phase in ("sealed", "mid_rotation"):
        die_in_rotation(checkpoint, midway=phase == "mid_rotation")
    elif kind == "data":
        die_in_arrow_write(int(parts[2]))

    def arm(trainer: Trainer) -> None:
        # The moments between the parts of one checkpoint save (model, optimizer, RNG) and inside a resume's
        # loading have no public hook: `on_save` runs only after the whole save. To die exactly there, the harness
        # wraps the methods of this trainer instance that write or read each part (private ones included); the
        # recipe itself overrides none of them.
        if phase == "after_model":
            wrap_trainer_method(trainer, "save_model", step, checkpoint_only=True)
        elif phase == "after_optimizer":
            wrap_trainer_method(trainer, "_save_optimizer_and_scheduler", step)
        elif phase == "after_rng":
            wrap_trainer_method(trainer, "_save_rng_state", step)
        elif kind == "resume":
            wrap_trainer_method(trainer, "_load_rng_state", None, before=True)

    return [FaultCallback(fault)], arm


def record_resumes(log: Path, attempt: int) -> None:
    """Append `attempt checkpoint-name` (or `fresh`) to `log` when the recipe decides where to resume from.

    What the recipe decided, not what the trainer loaded: a run killed during its final save resumes by
    publishing its last checkpoint, without a `train()` whose hooks would see it."""
    resolve_resume = training.resolve_resume

    def recording(training_args):
        resumed = resolve_resume(training_args)
        with open(log, "a") as handle:
            handle.write(f"{attempt} {Path(resumed).name if resumed else 'fresh'}\n")
        return resumed

    training.resolve_resume = recording


def run_attempt(workdir: Path, recipe: Path, fault: str | None, attempt: int, kill_after: float | None) -> dict:
    """One training process, forked: its exit code (negative: the signal), the error it raised, and when its
    training started (wall clock)."""
    log = workdir / f"attempt-{attempt}.log"
    started = workdir / f"attempt-{attempt}.started"
    error = workdir / f"attempt-{attempt}.error"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os._exit(_child(workdir, recipe, fault, attempt, log, started, error))
    status = None
    if kill_after is not None:
        while status is None and not started.exists():
            reaped, code = os.waitpid(pid, os.WNOHANG)
            status = code if reaped else None
            time.sleep(0.01)
        if status is None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)
    if status is None:
        _, status = os.waitpid(pid, 0)
    return {
        "returncode": os.waitstatus_to_exitcode(status),
        "error": error.read_text() if error.exists() else "",
        "started": started.stat().st_mtime if started.exists() else None,
    }


def _child(workdir: Path, recipe: Path, fault: str | None, attempt: int, log: Path, started: Path, error: Path) -> int:
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        datasets.config.HF_DATASETS_CACHE = workdir / "datasets_cache"
        datasets.disable_progress_bars()
        record_resumes(workdir / "resumes.txt", attempt)
        callbacks, arm = (
            install_fault(fault, workdir / "out") if fault and not fault.startswith("timed") else ([], None)
        )

        def before_train(trainer: Trainer) -> None:
            if arm is not None:
                arm(trainer)
            if SABOTAGE and attempt > 1:
                trainer._load_optimizer_and_scheduler = lambda checkpoint: None
            started.touch()

        argv = ["--config", str(recipe)] + (["--resume_from_checkpoint", "true"] if attempt > 1 else [])
        sft.main(argv, callbacks=callbacks, before_train=before_train)
        return 0
    except BaseException:
        traceback.print_exc()
        error.write_text(traceback.format_exc(limit=0))
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def checkpoints_on_disk(output_dir: Path) -> str:
    """`checkpoints 3, 6 (partial)` for what a killed attempt left behind."""
    found = checkpointing.list_checkpoints(output_dir)
    steps = [
        str(checkpointing.checkpoint_step(c)) + ("" if checkpointing.is_sealed(c) else " (partial)") for c in found
    ]
    return f"checkpoints {', '.join(steps)}" if steps else "no checkpoint"


def prepare(workdir: Path, data: Path) -> Path:
    workdir.mkdir(parents=True)
    return write_tiny_recipe(workdir, **RECIPE, data_path=str(data))


def run_kill_point(point: KillPoint, root: Path, data: Path, reference: dict, train_seconds: float, seed: int):
    workdir = root / point.name.replace(":", "_").replace(" ", "_")
    recipe = prepare(workdir, data)
    rng = random.Random(f"{seed}-{point.name}")
    problems, attempts, delays = [], [], []
    for attempt, fault in enumerate([*point.faults, None], start=1):
        kill_after = rng.uniform(0.0, train_seconds) if fault and fault.startswith("timed") else None
        delays += [kill_after] if kill_after is not None else []
        result = run_attempt(workdir, recipe, fault, attempt, kill_after)
        attempts.append({**result, "left": checkpoints_on_disk(workdir / "out")})
        code = result["returncode"]
        if fault is None and code != 0:
            problems.append(f"attempt {attempt} failed (exit {code}, see {workdir}/attempt-{attempt}.log)")
            break
        if fault and fault.startswith("disk_full"):
            if code != 1 or "could not write" not in result["error"] or "File too large" not in result["error"]:
                problems.append(f"disk full: expected a clear error, got exit {code}: {result['error'][-300:]}")
        elif fault and not fault.startswith("timed") and code != -signal.SIGKILL:
            problems.append(f"attempt {attempt}: fault {fault} never fired (exit {code})")
    resumes_file = workdir / "resumes.txt"
    entries = [line.split() for line in resumes_file.read_text().splitlines()] if resumes_file.exists() else []
    resumed = [name for attempt, name in entries if int(attempt) > 1]
    if point.resumes is not None and tuple(resumed) != point.resumes:
        problems.append(f"resumed from {resumed}, expected {list(point.resumes)}")
    diff = max_abs_diff(reference, final_weights(workdir / "out")) if not problems else float("nan")
    if not problems and diff != 0.0:
        problems.append(f"final weights differ by {diff}")
    killed = sum(a["returncode"] == -signal.SIGKILL for a in attempts)
    moment = point.moment
    if point.name.startswith("timed"):
        moment = f"{delays[0]:.2f} s into training; left {attempts[0]['left']}" if killed else "finished before kill"
    return {
        "kill_point": point.name,
        "moment": moment,
        "kills": killed,
        "resumes": len(attempts) - 1,
        "resumed_from": resumed,
        "max_diff": diff,
        "verdict": "exact" if not problems else "; ".join(problems),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=len(KILL_POINTS), help="run the first N kill points")
    parser.add_argument("--only", default="", help="comma-separated kill point names (see KILL_POINTS)")
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the timed kills' delays")
    parser.add_argument("--list", action="store_true", help="list the kill points and exit")
    parser.add_argument(
        "--sabotage", action="store_true", help="self-check: resume without the optimizer state; every point must fail"
    )
    args = parser.parse_args(argv)
    global SABOTAGE
    SABOTAGE = args.sabotage
    if args.list:
        for point in KILL_POINTS:
            print(f"{point.name:32} {point.moment}")
        return 0
    points = KILL_POINTS[: args.kills]
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {p.name for p in KILL_POINTS})
        if unknown:
            parser.error(f"unknown kill point(s): {', '.join(unknown)} (see --list)")
        points = [p for p in KILL_POINTS if p.name in names]

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="fault_injection_")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    try:
        data = write_sft_data(root / "sft.jsonl")
        reference_dir = root / "reference"
        recipe = prepare(reference_dir, data)
        result = run_attempt(reference_dir, recipe, None, 1, None)
        if result["returncode"] != 0:
            print(f"the uninterrupted run failed; see {reference_dir}/attempt-1.log", file=sys.stderr)
            return 2
        train_seconds = time.time() - result["started"]
        reference = final_weights(reference_dir / "out")

        header = (
            f"{'kill point':31} {'moment':62} {'kills':>5} {'resumes':>7}  {'resumed from':37} {'max diff':>8}  verdict"
        )
        print(header)
        print("-" * len(header))
        results = []
        for point in points:
            row = run_kill_point(point, root, data, reference, train_seconds, args.seed)
            results.append(row)
            print(
                f"{row['kill_point']:31} {row['moment'][:62]:62} {row['kills']:>5} {row['resumes']:>7}  "
                f"{' > '.join(row['resumed_from'])[:37]:37} {row['max_diff']:>8.3g}  {row['verdict']}",
                flush=True,
            )
        failed = [r for r in results if r["verdict"] != "exact"]
        print(f"\n{len(results) - len(failed)} of {len(results)} kill points resumed to the exact final weights")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 1 if failed else 0
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
