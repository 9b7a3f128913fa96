"""Every error this project raises on purpose, under one base class.

The command-line tools and recipes catch `MiniMindError` and print its message as one `error: ...` line (no
traceback): each subclass carries a message that names the file, key or value at fault. The subclasses keep the
standard bases they always had (`ValueError`, `RuntimeError`), so code that caught those still does.
"""

from __future__ import annotations

import os


class MiniMindError(Exception):
    """Base class of the project's errors: bad input, refused recipes, unusable checkpoints or model sources."""


class RecipeError(MiniMindError, ValueError):
    """A recipe that cannot run; raised before any model, data or output directory is touched."""


class TrainingDiverged(RecipeError):
    """Training produced a non-finite gradient or weights; nothing non-finite was saved."""


class TrainingGaveNoSignal(RecipeError):
    """Training ran, but its objective gave no learning signal (e.g. no GRPO reward could be computed)."""


class DataError(MiniMindError, ValueError):
    """A data file or line that cannot be used; `problem` is a short kind such as `"not_json"`."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str, detail: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {detail}")


class CheckpointError(MiniMindError, RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message names it and what to do."""


class ModelSourceError(MiniMindError, ValueError):
    """A model source that cannot be loaded; the message names it and what is wrong."""


class LoraFileError(MiniMindError, ValueError):
    """An adapter file that does not fit the model; the message names the file and the tensor."""


__all__ = [
    "CheckpointError",
    "DataError",
    "LoraFileError",
    "MiniMindError",
    "ModelSourceError",
    "RecipeError",
    "TrainingDiverged",
    "TrainingGaveNoSignal",
]
