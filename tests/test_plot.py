"""Loss plots from a recorded trainer_state.json: which file is found, what is written, bad input."""

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from minimind_hf.plot import find_trainer_state, main, plot_trainer_state

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def trainer_state(steps: int, moe: bool = False) -> dict:
    """What `Trainer` records: a log entry per step, an eval entry every 10 steps, then the run's summary."""
    history = []
    for step in range(1, steps + 1):
        lm_loss = 8.7 * math.exp(-step / 15) + 0.3
        entry = {"epoch": step / 24, "grad_norm": 2 / step**0.5, "learning_rate": 1e-3 * (1 - step / 40), "step": step}
        entry["loss"] = lm_loss + (0.1 if moe else 0.0)
        if moe:
            entry.update(lm_loss=lm_loss, aux_loss=0.1 + 0.01 / step)
        history.append(entry)
        if step % 10 == 0:
            history.append({"epoch": step / 24, "eval_loss": lm_loss + 0.2, "eval_runtime": 1.5, "step": step})
    history.append({"epoch": steps / 24, "step": steps, "total_flos": 1.0e9, "train_loss": 2.1, "train_runtime": 42.0})
    return {"global_step": steps, "log_history": history, "max_steps": 40, "logging_steps": 1}


def write_state(directory: Path, steps: int, moe: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "trainer_state.json"
    path.write_text(json.dumps(trainer_state(steps, moe), indent=2))
    return path


@pytest.mark.parametrize("moe", [False, True])
def test_writes_a_png_of_the_given_size(tmp_path, moe):
    state = write_state(tmp_path / "run", steps=30, moe=moe)
    out = plot_trainer_state(state, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(out).shape[:2] == (720, 1080)  # 9 x 6 inches at 120 dpi


def test_run_directory_uses_the_newest_checkpoint_by_step_number(tmp_path, capsys):
    write_state(tmp_path / "out" / "checkpoint-9", steps=9)
    newest = write_state(tmp_path / "out" / "checkpoint-10", steps=10)
    (tmp_path / "out" / "checkpoint-final").mkdir()
    assert find_trainer_state(tmp_path / "out") == newest
    main([str(tmp_path / "out")])
    png = tmp_path / "out" / "loss.png"  # the run's directory, not the checkpoint that rotation may delete
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {png}" in capsys.readouterr().out
    assert plot_trainer_state(newest) == newest.parent / "loss.png"


def test_output_dir_state_wins_over_checkpoints(tmp_path):
    write_state(tmp_path / "out" / "checkpoint-10", steps=10)
    top = write_state(tmp_path / "out", steps=20)
    assert find_trainer_state(tmp_path / "out") == top
    assert find_trainer_state(top) == top


def test_state_without_losses_is_an_error_naming_the_file(tmp_path):
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [{"train_runtime": 1.0, "step": 0}]}))
    with pytest.raises(ValueError, match=r"trainer_state.json: no loss logged"):
        plot_trainer_state(state)
    state.write_text("{not json")
    with pytest.raises(ValueError, match=r"trainer_state.json: not a trainer state"):
        plot_trainer_state(state)


def test_missing_state_exits_with_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty_run")])
    assert exit_info.value.code == 1
    assert "empty_run: no trainer_state.json, nor a checkpoint-*/ holding one" in capsys.readouterr().err


def test_a_logged_reward_is_drawn_and_checked(tmp_path):
    state = trainer_state(30)
    plain = plot_trainer_state(write_state(tmp_path / "plain", steps=30), tmp_path / "plain.png")
    for number, entry in enumerate(state["log_history"]):
        if "loss" in entry:
            entry["reward"] = 0.5 + number / 100
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "trainer_state.json").write_text(json.dumps(state))
    drawn = plot_trainer_state(tmp_path / "grpo" / "trainer_state.json", tmp_path / "grpo.png")
    assert (matplotlib.image.imread(drawn) != matplotlib.image.imread(plain)).any(), "the reward curve is missing"
    state["log_history"][0]["reward"] = "high"
    (tmp_path / "grpo" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"log_history\[0\]\.reward is 'high'"):
        plot_trainer_state(tmp_path / "grpo" / "trainer_state.json")
