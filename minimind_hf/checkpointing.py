"""Checkpoints that count only once they are complete on disk, and resuming from the newest complete one.

transformers 5.24 writes `checkpoint-N` in place (model, optimizer, scheduler, RNG states, `trainer_state.json`
last) and then deletes the checkpoints beyond `save_total_limit`. Nothing is fsynced, and nothing tells a
directory left half-written by a crash from a complete one: `get_last_checkpoint` returns the newest
`checkpoint-N` whatever its state, and the library's rotation counts half-written directories as checkpoints.

Here a checkpoint is *sealed* once everything in it is written: every file is fsynced and hashed, and a manifest
`checkpoint_complete.json` (each file's size and SHA-256) is written last, atomically. Resuming trusts only sealed
checkpoints whose files still match the manifest, and old checkpoints are rotated out only after the new one is
sealed. A directory without a manifest is what an interrupted save leaves behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .convert import atomic_write

logger = logging.getLogger(__name__)

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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message names it and what to do."""


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


def _write_atomically(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))
    _fsync_dir(path.parent)


def seal_checkpoint(folder: str | os.PathLike) -> Path:
    """Make every file of `folder` durable, then write its manifest: from now on it is a complete checkpoint."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": {
            p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
            for p in files
        },
    }
    for directory in {p.parent for p in files} | {folder}:
        _fsync_dir(directory)
    _write_atomically(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    # The checkpoint's own directory entry must be durable too, or a power cut can lose the whole checkpoint.
    _fsync_dir(folder.parent)
    return folder / MANIFEST


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


class AtomicCheckpointMixin:
    """`Trainer` mixin: checkpoints are sealed when complete, rotated only after that, and checked on resume.

    Overrides `_save_checkpoint` because the library rotates at the end of it, before any hook could seal the new
    checkpoint: a crash there would leave only an unsealed checkpoint. Its own rotation is switched off for the
    call and done here after the seal. A failed save (a full disk) becomes a `CheckpointError` that says what is
    left. `_load_from_checkpoint` refuses a checkpoint of other sizes by name, and `_run_epoch` keeps a run
    resumed from its final checkpoint from training a step past `max_steps`.
    """

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():
            # Left by an interrupted save, or by a run that went further before we resumed from an older
            # checkpoint: saving over it in place would mix the files of two saves.
            logger.warning("replacing %s, left by an earlier run", folder)
            discard_checkpoint(folder)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                seal_checkpoint(folder)
        except Exception as err:
            raise self._save_failed(run_dir, folder, err) from err
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            rotate_complete_checkpoints(run_dir, limit, keep=[folder, self.state.best_model_checkpoint])

    def _save_failed(self, run_dir: Path, folder: Path, err: Exception) -> CheckpointError:
        if self.args.should_save:
            # Best effort: a partial checkpoint is useless, and on a full disk its space is what is missing.
            shutil.rmtree(folder, ignore_errors=True)
        sealed = [f for f in list_checkpoints(run_dir) if is_sealed(f)]
        last = (
            f"the last complete checkpoint, {sealed[-1]}, is intact"
            if sealed
            else "there is no complete checkpoint yet"
        )
        free = shutil.disk_usage(run_dir).free / 2**20 if run_dir.is_dir() else float("nan")
        return CheckpointError(
            f"could not write {folder}: {err}\n{free:.0f} MiB free on {run_dir}; {last}. Make room and rerun with "
            "--resume_from_checkpoint true."
        )

    def _run_epoch(self, *args, **kwargs) -> None:
        # transformers checks `max_steps` only after a step: resumed from the final checkpoint (a crash during the
        # final save), it would train one step too many instead of none.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        check_checkpoint_fits(resume_from_checkpoint, self.accelerator.unwrap_model(model or self.model).config)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
