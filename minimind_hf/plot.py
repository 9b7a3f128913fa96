"""Plot a training run's losses and learning rate from its `trainer_state.json`.

    python -m minimind_hf.plot out/sft                 # out/sft/loss.png, from the newest checkpoint's state
    python -m minimind_hf.plot out/sft/checkpoint-300 --out sft_loss.png

The top panel shows the training loss, and where logged the eval loss and MoE's `lm_loss` / `aux_loss`, with
GRPO's mean reward and DPO's reward margin on a right-hand axis (a GRPO loss stays near 0 while the reward
climbs); the bottom one the learning rate. The directory given gets the PNG, `loss.png` (beside the state file
when a file is given): a run's output directory, rather than a checkpoint that rotation may delete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# A bare Figure renders with the Agg canvas and, unlike pyplot, sets no global backend in the importing process.
from matplotlib.figure import Figure
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

STATE_FILE = "trainer_state.json"
LOSS_KEYS = {"loss": "train loss", "lm_loss": "train lm_loss", "aux_loss": "train aux_loss", "eval_loss": "eval loss"}
REWARD_KEYS = {"reward": "mean reward (right)", "rewards/margins": "reward margin (right)"}


def find_trainer_state(path: str | Path) -> Path:
    """`path` itself if a file, else its `trainer_state.json`, else the one of its newest `checkpoint-N`."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory or {STATE_FILE}")
    if (path / STATE_FILE).is_file():
        return path / STATE_FILE
    # transformers' own listing of `checkpoint-N` directories, oldest step first: the newest one holding a state.
    for checkpoint in map(Path, reversed(sort_checkpoints(str(path)))):
        if checkpoint.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-").isdigit() and (checkpoint / STATE_FILE).is_file():
            return checkpoint / STATE_FILE
    raise FileNotFoundError(f"{path}: no {STATE_FILE}, nor a checkpoint-*/ holding one")


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
    return [step for step, _ in points], [value for _, value in points]


def plot_trainer_state(state_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Draw the losses and learning rate of `state_path` into a PNG (default: `loss.png` beside it)."""
    state_path = Path(state_path)
    try:
        history = json.loads(state_path.read_text())["log_history"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{state_path}: not a trainer state with a log_history ({err!r})") from None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise ValueError(f"{state_path}: log_history is not a list of objects")
    for number, entry in enumerate(history):
        for key in ("step", "learning_rate", *LOSS_KEYS, *REWARD_KEYS):
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{state_path}: log_history[{number}].{key} is {value!r}, not a number")
    curves = {label: _series(history, key) for key, label in LOSS_KEYS.items()}
    curves = {label: points for label, points in curves.items() if points[0]}
    if not curves:
        raise ValueError(f"{state_path}: no loss logged (log_history has {len(history)} entries)")

    figure = Figure(figsize=(9, 6), layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for label, (steps, values) in curves.items():
        loss_axes.plot(steps, values, "o-" if label.startswith("eval") else "-", label=label, markersize=4)
    loss_axes.set_ylabel("loss")
    handles = loss_axes.get_legend_handles_labels()
    rewards = {label: _series(history, key) for key, label in REWARD_KEYS.items()}
    if rewards := {label: points for label, points in rewards.items() if points[0]}:
        reward_axes = loss_axes.twinx()
        for label, (steps, values) in rewards.items():
            reward_axes.plot(steps, values, "--", color="tab:orange", label=label)
        reward_axes.set_ylabel("reward")
        handles = [a + b for a, b in zip(handles, reward_axes.get_legend_handles_labels(), strict=True)]
    loss_axes.legend(*handles)
    loss_axes.grid(alpha=0.3)
    last_step = max((entry.get("step", 0) for entry in history), default=0)
    loss_axes.set_title(f"{state_path.parent} (up to step {last_step})")
    lr_axes.plot(*_series(history, "learning_rate"), color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)

    out_path = Path(out_path) if out_path is not None else state_path.parent / "loss.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=120)
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimind_hf.plot", description=__doc__.split("\n")[0])
    parser.add_argument("run", help=f"a run's output_dir, a checkpoint directory, or a {STATE_FILE}")
    parser.add_argument("--out", help="PNG to write (default: loss.png in the directory given)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if args.out and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a directory; name the PNG file to write")
    out = args.out or (run / "loss.png" if run.is_dir() else None)
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            parser.error(f"--out {args.out}: cannot write there ({err})")
    try:
        print(f"wrote {plot_trainer_state(find_trainer_state(run), out)}")
    except (OSError, ValueError) as err:  # unreadable state, unwritable --out, a format matplotlib lacks
        parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
    main()
