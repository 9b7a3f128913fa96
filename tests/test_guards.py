"""Guard rails around a run (minimind_hf/guards.py): divergence, clobbered and concurrent runs, vocabularies and
tokenizers that do not fit the model, resuming from what is not a checkpoint. Each test runs the real SFT recipe
on a tiny model, as an unlucky user would."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from minimind_hf.callbacks import SKIPPED_STEP_KEY
from minimind_hf.checkpointing import FINAL_MANIFEST, MANIFEST, check_resumable, is_sealed, list_checkpoints
from minimind_hf.checks import check_model_fits
from minimind_hf.errors import RecipeError, TrainingDiverged
from minimind_hf.run_dir import LOCK_FILE, RunLock
from minimind_hf.stages import sft
from minimind_hf.testing import write_tiny_recipe
from minimind_hf.tokenizer import load_tokenizer
from minimind_hf.training import run_cli

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("datasets_cache")

ROWS = [
    {"conversations": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
    for i in range(16)
]


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return tmp_path


def recipe(directory: Path, **overrides) -> list[str]:
    return ["--config", str(write_tiny_recipe(directory, **overrides))]


def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(directory.rglob("*"))
    }


def finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


class InjectNaN(TrainerCallback):
    """Makes the loss of the given steps NaN (the final norm outputs NaN during them), as a bad batch would."""

    def __init__(self, steps):
        self.steps, self.handle = set(steps), None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            self.handle = model.model.norm.register_forward_hook(lambda module, inputs, out: out * float("nan"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class Record(TrainerCallback):
    """The weights and AdamW's step count of one parameter after each step."""

    def __init__(self):
        self.weights, self.adam_steps = {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        first = next(model.parameters())
        self.adam_steps[state.global_step] = int(optimizer.state.get(first, {}).get("step", 0))


def test_learning_rate_50_stops_naming_the_step_and_saves_nothing_non_finite(work):
    out = work / "out"
    argv = recipe(work, learning_rate=50, max_steps=6, save_steps=1, logging_steps=1)
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: sft.main(argv))
    message = str(exit_.value.code)
    match = re.fullmatch(r"error: training diverged at step (\d+): the gradient norm is not finite .*", message)
    assert match, message
    step = int(match.group(1))
    assert "\n" not in message and "on_nonfinite: skip" in message
    assert not (out / FINAL_MANIFEST).exists() and not (out / "model.safetensors").exists(), "no final model"
    sealed = [folder for folder in list_checkpoints(out) if is_sealed(folder)]
    assert sealed and all(finite(folder) for folder in sealed), "only finite checkpoints are sealed"
    assert int(sealed[-1].name.split("-")[1]) == step - 1, "every step before the divergence was saved"
    assert f"{sealed[-1]}, is intact" in message
    assert not list((out).glob(f"checkpoint-{step}")), "the diverged step is not saved"
    assert not (out / LOCK_FILE).exists(), "the lock is released"


def test_injected_nan_stops_and_the_last_good_checkpoint_resumes(work):
    out = work / "out"
    argv = recipe(work, max_steps=4, save_steps=2)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 3: the gradient norm is not finite"):
        sft.main(argv, callbacks=[InjectNaN({3})])
    assert [folder.name for folder in list_checkpoints(out)] == ["checkpoint-2"]
    check_resumable(out / "checkpoint-2")
    assert finite(out / "checkpoint-2") and not (out / FINAL_MANIFEST).exists()

    trainer = sft.main(recipe(work, max_steps=4, save_steps=2, resume_from_checkpoint=True))
    assert trainer.state.global_step == 4
    assert (out / FINAL_MANIFEST).is_file() and finite(out)


def test_skip_leaves_weights_and_optimizer_state_exactly_as_they_were(work):
    out = work / "out"
    record = Record()
    trainer = sft.main(recipe(work, max_steps=3, save_steps=3, on_nonfinite="skip"), callbacks=[InjectNaN({2}), record])
    for name, before in record.weights[1].items():
        assert torch.equal(record.weights[2][name], before), f"{name} moved on a skipped step"
        assert not torch.equal(record.weights[3][name], before), f"{name} did not train after it"
    # A zeroed gradient would still have counted an AdamW step (and moved the weights by momentum and decay).
    assert [record.adam_steps[step] for step in (1, 2, 3)] == [1, 1, 2]
    skipped = [entry for entry in trainer.state.log_history if entry.get(SKIPPED_STEP_KEY)]
    assert skipped == [{SKIPPED_STEP_KEY: 1, "step": 2}]
    saved = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert {SKIPPED_STEP_KEY: 1, "step": 2} in saved, "the count is kept with the final model"
    assert (out / FINAL_MANIFEST).is_file() and finite(out)


def test_skip_with_every_step_non_finite_is_an_error(work):
    with pytest.raises(TrainingDiverged, match="every one of the 2 steps of this run had a non-finite gradient"):
        sft.main(recipe(work, max_steps=2, on_nonfinite="skip"), callbacks=[InjectNaN({1, 2})])
    assert not (work / "out" / FINAL_MANIFEST).exists()


@pytest.fixture
def finished_run(work) -> Path:
    """`work/out` holding a finished 4-step run: final model, checkpoint-2 and checkpoint-4."""
    sft.main(recipe(work, max_steps=4, save_steps=2))
    return work / "out"


def test_a_finished_run_is_not_overwritten_without_asking(work, finished_run):
    before = snapshot(finished_run)
    with pytest.raises(RecipeError, match=r"holds another run \(checkpoint-2, checkpoint-4, .*overwrite_output_dir"):
        sft.main(recipe(work, max_steps=2))
    # A run that resumes true but finds no checkpoint would start fresh over the final model: refused as well.
    shutil.rmtree(finished_run / "checkpoint-2")
    shutil.rmtree(finished_run / "checkpoint-4")
    after_removal = snapshot(finished_run)
    with pytest.raises(RecipeError, match=r"holds another run \(model_complete.json"):
        sft.main(recipe(work, max_steps=2, resume_from_checkpoint=True))
    assert snapshot(finished_run) == after_removal
    assert set(before) > set(after_removal)


def test_overwrite_output_dir_replaces_the_whole_earlier_run(work, finished_run):
    old_weights = (finished_run / "model.safetensors").read_bytes()
    sft.main(recipe(work, max_steps=2, save_steps=2, learning_rate=5e-3, overwrite_output_dir=True))
    assert [folder.name for folder in list_checkpoints(finished_run)] == ["checkpoint-2"]
    assert (finished_run / "model.safetensors").read_bytes() != old_weights
    state = json.loads((finished_run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["max_steps"] == 2, "checkpoint-2 is the new run's"
    # Resuming now continues the new run, not the old run's checkpoint-4.
    trainer = sft.main(recipe(work, max_steps=2, learning_rate=5e-3, resume_from_checkpoint=True))
    assert trainer.state.max_steps == 2


def test_resuming_from_a_final_model_directory_says_how_to_start_from_its_weights(work, finished_run):
    before = snapshot(finished_run)
    argv = recipe(work, output_dir=str(work / "other"), resume_from_checkpoint=str(finished_run))
    with pytest.raises(RecipeError) as raised:
        sft.main(argv)
    assert str(raised.value) == (
        f"resume_from_checkpoint: {finished_run} is a final model directory, not a Trainer checkpoint (no optimizer "
        f"or scheduler state to resume); to start a new run from its weights, set model_name_or_path: "
        f"{finished_run} and resume_from_checkpoint: false; to continue the newest checkpoint in it, set "
        f"output_dir: {finished_run} and resume_from_checkpoint: true"
    )
    assert snapshot(finished_run) == before and not (work / "other").exists()


def test_a_vocabulary_smaller_than_the_tokenizer_fails_before_training(work, tokenizer_dir):
    overrides = "num_attention_heads=4,num_key_value_heads=2,vocab_size=1000"
    n = len(load_tokenizer(tokenizer_dir))
    with pytest.raises(RecipeError, match=rf"has 1000 embedding rows .* emits ids up to {n - 1} .*vocab_size={n},"):
        sft.main(recipe(work, config_overrides=overrides))
    assert not (work / "out").exists()


def test_added_tokens_count_in_the_vocabulary_check(tokenizer_dir):
    from minimind_hf import MiniMindConfig, MiniMindForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1))
    check_model_fits(model, tokenizer, 64)
    tokenizer.add_tokens(["<tool_call>"])
    with pytest.raises(RecipeError, match=f"emits ids up to {len(tokenizer) - 1}"):
        check_model_fits(model, tokenizer, 64)


def test_max_length_above_max_position_embeddings_is_refused(work):
    overrides = "num_attention_heads=4,num_key_value_heads=2,max_position_embeddings=32"
    with pytest.raises(RecipeError, match="max_length 64 is above the model's max_position_embeddings 32"):
        sft.main(recipe(work, config_overrides=overrides))


def test_zero_epochs_is_refused_unless_resuming(work, finished_run):
    with pytest.raises(RecipeError, match="num_train_epochs: is 0 and max_steps is not set"):
        sft.main(recipe(work, output_dir=str(work / "fresh"), max_steps=-1, num_train_epochs=0))
    # Resuming the finished run with 0 epochs publishes its last checkpoint, trains nothing.
    trainer = sft.main(recipe(work, max_steps=-1, num_train_epochs=0, resume_from_checkpoint=True))
    assert trainer.state.global_step == 4


def test_a_tokenizer_other_than_the_models_is_refused_unless_intended(work, finished_run, tokenizer_dir):
    other = load_tokenizer(tokenizer_dir)
    other.add_tokens(["<new>"])
    other.save_pretrained(work / "other_tok")
    same = work / "same_tok"
    shutil.copytree(tokenizer_dir, same)
    start = {"model_name_or_path": str(finished_run), "output_dir": str(work / "sft2")}
    with pytest.raises(RecipeError) as raised:
        sft.main(recipe(work, tokenizer_name_or_path=str(work / "other_tok"), **start))
    n = len(load_tokenizer(tokenizer_dir))
    assert re.fullmatch(
        rf"tokenizer {work / 'other_tok'} is not the tokenizer {finished_run} was trained with \({n + 1} vs {n} "
        r"tokens, 1 with another id\): .* set allow_tokenizer_change: true if the change is intended",
        str(raised.value),
    ), raised.value
    assert not (work / "sft2").exists()
    sft.main(recipe(work, tokenizer_name_or_path=str(same), **start))  # another copy of the same vocabulary
    start["output_dir"] = str(work / "sft3")
    sft.main(recipe(work, tokenizer_name_or_path=str(work / "other_tok"), allow_tokenizer_change=True, **start))
    assert (work / "sft3" / FINAL_MANIFEST).is_file()


def test_a_run_in_progress_holds_output_dir_and_names_its_holder(work):
    out = work / "out"
    lock = RunLock(out).acquire()
    try:
        before = snapshot(out)
        with pytest.raises(RecipeError) as raised:
            sft.main(recipe(work))
        assert str(raised.value).startswith(f"output_dir {out} is in use by another run (pid {os.getpid()}, host ")
        assert snapshot(out) == before
    finally:
        lock.release()
    assert not (out / LOCK_FILE).exists()
    sft.main(recipe(work))


def test_a_lock_left_by_a_killed_run_does_not_block_resume(work):
    out = work / "out"
    sft.main(recipe(work, max_steps=2, save_steps=2))
    # What `RunLock.acquire` does, without importing the package (seconds of imports): flock, then the holder.
    holder = (
        "import fcntl, json, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.write(fd, json.dumps({'pid': os.getpid()}).encode()); "
        "print('held', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", holder, str(out / LOCK_FILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RecipeError, match=rf"is in use by another run \(pid {child.pid}\); wait for it"):
            sft.main(recipe(work, max_steps=4, save_steps=2, resume_from_checkpoint=True))
    finally:
        child.kill()  # SIGKILL: no release, the file stays behind
        child.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == child.pid
    trainer = sft.main(recipe(work, max_steps=4, save_steps=2, resume_from_checkpoint=True))
    assert trainer.state.global_step == 4 and not (out / LOCK_FILE).exists()


def test_run_lock_is_exclusive_and_released(tmp_path):
    first = RunLock(tmp_path).acquire()
    assert RunLock(tmp_path).holder()["pid"] == os.getpid()
    with pytest.raises(RecipeError, match="is in use by another run"):
        RunLock(tmp_path).acquire()
    first.release()
    assert RunLock(tmp_path).holder() is None
    RunLock(tmp_path).acquire().release()


def test_non_finite_checks_agree_with_torch():
    from minimind_hf.callbacks import all_finite

    assert all_finite([torch.ones(3), torch.zeros(2)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, math.inf])])
    assert not all_finite([torch.tensor([math.nan])])
    assert all_finite([])


def test_checkpoints_written_before_a_divergence_stay_sealed(work):
    out = work / "out"
    with pytest.raises(TrainingDiverged):
        sft.main(recipe(work, max_steps=4, save_steps=1), callbacks=[InjectNaN({4})])
    assert [folder.name for folder in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert all((folder / MANIFEST).is_file() for folder in list_checkpoints(out))


DDP_NAN_PROBE = """
import os, sys
from minimind_hf.stages import sft
from transformers import TrainerCallback
from minimind_hf.training import run_cli

class NaNOnRankOne(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if os.environ["RANK"] == "1" and state.global_step + 1 == 2:
            model.model.norm.register_forward_hook(lambda module, inputs, out: out * float("nan"))

run_cli(lambda: sft.main(sys.argv[1:], callbacks=[NaNOnRankOne()]))
"""


@pytest.mark.slow
def test_under_ddp_a_nan_on_one_rank_stops_every_rank_at_the_same_step(work):
    """DDP averages the NaN into both ranks' gradients; the guard's decision is all-reduced besides, so no rank
    trains on (or waits for) another that stopped."""
    out = work / "out"
    probe = work / "probe.py"
    probe.write_text(DDP_NAN_PROBE.format(recipes=str(REPO / "recipes")))
    argv = recipe(work, max_steps=4, save_steps=1, per_device_train_batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(probe), *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode != 0
    assert result.stderr.count("error: training diverged at step 2: the gradient norm is not finite") == 2, (
        result.stderr[-3000:]
    )
    assert [folder.name for folder in list_checkpoints(out)] == ["checkpoint-1"]
    assert is_sealed(out / "checkpoint-1") and not (out / FINAL_MANIFEST).exists()
    assert not (out / LOCK_FILE).exists()
