"""The run's output directory: what a run leaves in it, who may write to it, and its lock.

`run_recipe` refuses, before training, an `output_dir` that is in use by a live run (`RunLock`), that holds another
run (unless the recipe resumes it or says `overwrite_output_dir: true`), or that cannot be written. Under DDP the
main process decides and every process gets its answer, so that all stop together.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from .checkpointing import FINAL_MANIFEST, discard_checkpoint, is_sealed, list_checkpoints
from .errors import RecipeError

logger = logging.getLogger("minimind_hf")

LOCK_FILE = "run.lock"
# What a run leaves in its output_dir besides its sealed checkpoints: refusing to write over these is what keeps a
# finished run safe. An unsealed checkpoint is debris of an interrupted save, which the next save replaces.
RUN_FILES = (FINAL_MANIFEST, "config.json", "model.safetensors", "trainer_state.json")


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
