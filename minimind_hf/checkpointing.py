"""Checkpoints that count only once they are complete on disk, and resuming from the newest complete one.

transformers 5.24 writes `checkpoint-N` in place (model, optimizer, scheduler, RNG states, `trainer_state.json`
last) and then deletes the checkpoints beyond `save_total_limit`. Nothing is fsynced, and nothing tells a
directory left half-written by a crash from a complete one: `get_last_checkpoint` returns the newest
`checkpoint-N` whatever its state, and the library's rotation counts half-written directories as checkpoints.

Here a checkpoint is *sealed* once everything in it is written: every file is fsynced and hashed, and a manifest
`checkpoint_complete.json` (each file's size and SHA-256) is written last, atomically. Resuming trusts only sealed
checkpoints whose files still match the manifest, and old checkpoints are rotated out only after the new one is
sealed. A directory without a manifest is what an interrupted save leaves behind.

The resume policy lives here too: which checkpoint `resume_from_checkpoint` means (`resolve_resume`), whether it
may be resumed (`check_resume_point`, `check_resumable`, `check_checkpoint_fits`) and whether it already holds the
whole run (`training_finished`). The callback that seals checkpoints during training is in `callbacks.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .errors import CheckpointError, RecipeError

logger = logging.getLogger(__name__)
# What the recipe tells its user (the logger `run_recipe` logs to).
_recipe_logger = logging.getLogger("minimind_hf")

MANIFEST = "checkpoint_complete.json"
MANIFEST_FORMAT = 1
# Architecture fields that decide the shapes of the saved tensors (a mismatch cannot load).
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "use_moe",
    "n_routed_experts",
    "n_shared_experts",
)
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_CHUNK = 1 << 22


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N of a `checkpoint-N` directory name, None for any other name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` directories of `output_dir`, oldest step first, complete or not."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def is_sealed(folder: str | os.PathLike) -> bool:
    """Whether the save of `folder` ran to its end (says nothing about later damage; see `checkpoint_problem`)."""
    return (Path(folder) / MANIFEST).is_file()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: a crash leaves no torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_atomically(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))
    _fsync_dir(path.parent)


def seal_checkpoint(folder: str | os.PathLike, manifest_name: str = MANIFEST) -> Path:
    """Make every file of `folder` durable, then write its manifest: from now on it is a complete checkpoint."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != manifest_name)
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": {
            p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
            for p in files
        },
    }
    for directory in {p.parent for p in files} | {folder}:
        _fsync_dir(directory)
    _write_atomically(folder / manifest_name, json.dumps(manifest, indent=1).encode())
    # The checkpoint's own directory entry must be durable too, or a power cut can lose the whole checkpoint.
    _fsync_dir(folder.parent)
    return folder / manifest_name


def checkpoint_problem(folder: str | os.PathLike, verify_contents: bool = True) -> str | None:
    """Why `folder` cannot be resumed from, or None for a complete checkpoint whose files match its manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a checkpoint directory"
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"incomplete: no {MANIFEST} (its save was interrupted, or another tool wrote it)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes where {expected['size']} were written"
        if verify_contents and _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 (the file changed after the checkpoint was written)"
    if "trainer_state.json" not in files:
        return "the manifest lists no trainer_state.json"
    return None


def structural_problem(folder: str | os.PathLike) -> str | None:
    """Why an unsealed checkpoint (written by another tool) cannot be loaded, from its files' own structure."""
    from safetensors import safe_open

    folder = Path(folder)
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json is missing or unreadable ({err})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("*.bin")):
        return "no model weights"
    for path in weights:
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as err:
            return f"{path.name} is not a readable safetensors file ({err})"
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")]):
        try:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
        except (OSError, zipfile.BadZipFile) as err:
            return f"{path.name} is not a readable torch file ({err})"
        if broken is not None:
            return f"{path.name} is damaged ({broken} fails its CRC)"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint in `output_dir` that is complete and intact; None when there is none.

    Newer incomplete or damaged checkpoints are skipped with a warning. When checkpoints were completed but all
    are damaged now, starting over would silently throw the training away: that is a `CheckpointError`.
    """
    damaged = []
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        logger.warning("skipping %s: %s", folder, problem)
        if is_sealed(folder):
            damaged.append(f"{folder.name}: {problem}")
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {output_dir} ({'; '.join(damaged)}); delete the damaged checkpoints or set "
            "resume_from_checkpoint to false to start over"
        )
    return None


def check_resumable(folder: str | os.PathLike) -> None:
    """Raise `CheckpointError` unless `folder` can be resumed from: sealed and intact, or (unsealed, from another
    tool) structurally sound, which is accepted with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint directory")
    if is_sealed(folder):
        problem = checkpoint_problem(folder)
    else:
        problem = structural_problem(folder)
        if problem is None:
            logger.warning("%s has no %s; its files look whole, resuming from it", folder, MANIFEST)
    if problem is not None:
        raise CheckpointError(f"{folder}: {problem}")


def discard_checkpoint(folder: str | os.PathLike) -> None:
    """Delete a checkpoint; the manifest goes first, so that a crash midway leaves an incomplete one, never a
    complete-looking one with files missing."""
    folder = Path(folder)
    (folder / MANIFEST).unlink(missing_ok=True)
    if folder.is_dir():
        _fsync_dir(folder)
        shutil.rmtree(folder)


def rotate_complete_checkpoints(
    output_dir: str | os.PathLike, save_total_limit: int | None, keep: Iterable[str | os.PathLike | None] = ()
) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `save_total_limit`, never the newest one nor those in `keep`.

    Incomplete directories neither count nor get deleted here (the next save of the same step replaces one).
    Returns the deleted directories.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    sealed = [folder for folder in list_checkpoints(output_dir) if is_sealed(folder)]
    protected = {Path(p).resolve() for p in keep if p} | {folder.resolve() for folder in sealed[-1:]}
    excess = len(sealed) - save_total_limit
    deleted = []
    for folder in sealed:
        if excess <= 0:
            break
        if folder.resolve() in protected:
            continue
        logger.info("deleting %s (save_total_limit=%d)", folder, save_total_limit)
        discard_checkpoint(folder)
        deleted.append(folder)
        excess -= 1
    return deleted


def check_checkpoint_fits(folder: str | os.PathLike, config) -> None:
    """Raise `CheckpointError` when the checkpoint's model has other sizes than `config` (before loading it)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return
    try:
        saved = json.loads(config_file.read_text())
    except ValueError as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err})") from err
    for key in SHAPE_FIELDS:
        if key in saved and hasattr(config, key) and saved[key] != getattr(config, key):
            raise CheckpointError(
                f"{folder} holds a model with {key}={saved[key]} but the recipe builds {key}={getattr(config, key)}; "
                "resume with the recipe that wrote the checkpoint"
            )


def training_finished(checkpoint: str | os.PathLike, training_args=None) -> bool:
    """Whether resuming from `checkpoint` has nothing left to train (e.g. the run was killed during its final save).

    transformers checks `max_steps` only after a step, so resuming from such a checkpoint would train one step
    too many; the recipe publishes the checkpoint's weights instead of training. The length is the current
    recipe's (`training_args`: `max_steps`, else `num_train_epochs`), so that a run resumed to train longer does.
    """
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    step = state.get("global_step", 0)
    if training_args is not None and training_args.max_steps > 0:
        return step >= training_args.max_steps
    if training_args is not None and state.get("epoch", 0) < training_args.num_train_epochs - 1e-6:
        return False
    return 0 < state.get("max_steps", 0) <= step


def interrupted_save(output_dir: str | os.PathLike, step: int) -> Path | None:
    """The checkpoint of `step` when its save started but was not sealed (the save failed midway), else None."""
    folder = Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    return folder if folder.is_dir() and not is_sealed(folder) else None


def save_failed(output_dir: str | os.PathLike, folder: Path, err: BaseException) -> CheckpointError:
    """A failed checkpoint save (a full disk) as an error that says what is left and how to go on.

    The partial checkpoint is deleted (best effort): it is useless, and on a full disk its space is what is missing.
    """
    shutil.rmtree(folder, ignore_errors=True)
    run_dir = Path(output_dir)
    sealed = [f for f in list_checkpoints(run_dir) if is_sealed(f)]
    last = f"the last complete checkpoint, {sealed[-1]}, is intact" if sealed else "there is no complete checkpoint yet"
    free = shutil.disk_usage(run_dir).free / 2**20 if run_dir.is_dir() else float("nan")
    return CheckpointError(
        f"could not write {folder}: {err}\n{free:.0f} MiB free on {run_dir}; {last}. Make room and rerun with "
        "--resume_from_checkpoint true."
    )


FINAL_MANIFEST = "model_complete.json"
_STAGING = ".final.partial"


def final_save_problem(model_dir: str | os.PathLike) -> str | None:
    """Why `model_dir` holds a torn final model (its final save was interrupted), or None."""
    if (Path(model_dir) / _STAGING).exists():
        return (
            f"its final save was interrupted ({_STAGING} is left); rerun the recipe with "
            "--resume_from_checkpoint true to finish it"
        )
    return None


def begin_final(output_dir: str | os.PathLike) -> Path:
    """Start the final save: an empty staging folder inside `output_dir` to write the final model into.

    Writing goes there, `commit_final` then moves it into place, so that a crash never leaves a torn model that
    looks whole: until the commit ends, the staging folder is left and `final_save_problem` says so.
    """
    staging = Path(output_dir) / _STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit_final(output_dir: str | os.PathLike) -> None:
    """Seal the staging folder, then move its files over those of `output_dir`, the manifest last.

    Each file moves by one `os.replace`, so each is either the old or the new one, never torn; the manifest
    `model_complete.json` and the removal of the staging folder mark the end.
    """
    output_dir = Path(output_dir)
    staging = output_dir / _STAGING
    seal_checkpoint(staging, manifest_name=FINAL_MANIFEST)
    (output_dir / FINAL_MANIFEST).unlink(missing_ok=True)
    names = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file() and p.name != FINAL_MANIFEST)
    for name in names:
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, output_dir / name)
    os.replace(staging / FINAL_MANIFEST, output_dir / FINAL_MANIFEST)
    _fsync_dir(output_dir)
    shutil.rmtree(staging)
    _fsync_dir(output_dir)


def resolve_resume(training_args) -> str | None:
    """`resume_from_checkpoint`: a path, or true/"true" for the newest complete checkpoint in output_dir (None if
    none). Incomplete or damaged newer checkpoints are skipped with a warning; a given path must be intact."""
    value = training_args.resume_from_checkpoint
    if value in (None, False, "", "false", "False"):
        return None
    try:
        if str(value).lower() == "true":
            last = last_complete_checkpoint(training_args.output_dir)
            if last is None:
                _recipe_logger.warning(
                    "resume_from_checkpoint: no checkpoint in %s, starting fresh", training_args.output_dir
                )
            return last
        check_resumable(value)
    except CheckpointError as err:
        raise RecipeError(f"resume_from_checkpoint: {err}") from err
    return str(value)


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
