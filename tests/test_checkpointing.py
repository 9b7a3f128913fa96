"""Sealed checkpoints: rotation order, resuming past incomplete or damaged ones, the atomic final save, what a resume
unpickles, and that all of it runs on the Trainer's public hooks."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer

from minimind_hf import checkpointing
from minimind_hf.checkpointing import (
    FINAL_MANIFEST,
    MANIFEST,
    checkpoint_problem,
    resolve_resume,
    rotate_complete_checkpoints,
    seal_checkpoint,
)
from minimind_hf.errors import RecipeError
from minimind_hf.loading import ModelSourceError, load_model
from minimind_hf.stages import sft
from minimind_hf.stages.sft import MiniMindTrainer
from minimind_hf.testing import StepCounter, final_weights, max_abs_diff, write_sft_data, write_tiny_recipe

pytestmark = pytest.mark.usefixtures("datasets_cache")


def write_recipe(directory: Path, **overrides) -> Path:
    if not (directory / "sft.jsonl").exists():
        write_sft_data(directory / "sft.jsonl", n=32)
    return write_tiny_recipe(directory, **{"max_steps": 6, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 6-step run with sealed checkpoints 2, 4 and 6 (copy it before changing it)."""
    directory = tmp_path_factory.mktemp("trained")
    sft.main(["--config", str(write_recipe(directory))])
    return directory


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    write_recipe(tmp_path)  # the same recipe, pointing into the copy
    return tmp_path


def resume_true(output_dir: Path) -> str | None:
    return resolve_resume(SimpleNamespace(resume_from_checkpoint="true", output_dir=str(output_dir)))


def flip_a_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_rotation_deletes_an_old_checkpoint_only_after_the_new_one_is_sealed(tmp_path, monkeypatch):
    present_at_seal = []
    seal = checkpointing.seal_checkpoint

    def recording_seal(folder, *args, **kwargs):
        if checkpointing.checkpoint_step(folder) is not None:  # not the final model's staging folder
            sealed = [p.name for p in checkpointing.list_checkpoints(Path(folder).parent) if checkpointing.is_sealed(p)]
            present_at_seal.append((Path(folder).name, sealed))
        return seal(folder, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "seal_checkpoint", recording_seal)
    sft.main(["--config", str(write_recipe(tmp_path, save_total_limit=1))])
    assert present_at_seal == [
        ("checkpoint-2", []),
        ("checkpoint-4", ["checkpoint-2"]),
        ("checkpoint-6", ["checkpoint-4"]),
    ]
    out = tmp_path / "out"
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-6"]
    manifest = json.loads((out / "checkpoint-6" / MANIFEST).read_text())
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        manifest["files"]
    )
    assert checkpoint_problem(out / "checkpoint-6") is None


def test_resume_true_skips_incomplete_and_damaged_checkpoints(run_copy, caplog):
    out = run_copy / "out"
    assert resume_true(out) == str(out / "checkpoint-6")

    (out / "checkpoint-6" / MANIFEST).unlink()
    flip_a_byte(out / "checkpoint-4" / "model.safetensors")
    with caplog.at_level("WARNING", logger="minimind_hf"):
        assert resume_true(out) == str(out / "checkpoint-2")
    assert f"skipping {out / 'checkpoint-6'}: incomplete" in caplog.text
    assert f"skipping {out / 'checkpoint-4'}: model.safetensors does not match its SHA-256" in caplog.text

    with pytest.raises(RecipeError, match="checkpoint-4: model.safetensors does not match its SHA-256"):
        resolve_resume(SimpleNamespace(resume_from_checkpoint=str(out / "checkpoint-4"), output_dir=str(out)))

    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(RecipeError, match="no intact checkpoint in .*checkpoint-4: .*checkpoint-2: optimizer.pt has 0"):
        resume_true(out)


def test_a_given_unsealed_checkpoint_is_checked_by_its_file_structure(run_copy, caplog):
    checkpoint = run_copy / "out" / "checkpoint-4"
    (checkpoint / MANIFEST).unlink()
    with caplog.at_level("WARNING", logger="minimind_hf"):
        assert resolve_resume(SimpleNamespace(resume_from_checkpoint=str(checkpoint), output_dir="")) == str(checkpoint)
    assert "its files look whole" in caplog.text

    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RecipeError, match="model.safetensors is not a readable safetensors file"):
        resolve_resume(SimpleNamespace(resume_from_checkpoint=str(checkpoint), output_dir=""))


def test_resuming_the_final_checkpoint_trains_no_extra_step(run_copy):
    out = run_copy / "out"
    (out / "model.safetensors").unlink()  # as if killed during the final save
    counter = StepCounter()
    trainer = sft.main(
        ["--config", str(run_copy / "recipe.yaml"), "--resume_from_checkpoint", "true"], callbacks=[counter]
    )
    assert counter.steps == 0 and trainer.state.global_step == 6
    assert max_abs_diff(final_weights(out), final_weights(out / "checkpoint-6")) == 0.0
    assert not (out / "checkpoint-7").exists()


def test_a_run_resumed_from_its_final_checkpoint_to_train_longer_does(run_copy):
    counter = StepCounter()
    argv = ["--config", str(run_copy / "recipe.yaml"), "--resume_from_checkpoint", "true", "--max_steps", "8"]
    trainer = sft.main(argv, callbacks=[counter])
    assert counter.steps == 2 and trainer.state.global_step == 8
    assert checkpoint_problem(run_copy / "out" / "checkpoint-8") is None


def test_an_epoch_based_run_resumed_at_its_end_trains_only_the_epochs_it_lacks(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=-1, num_train_epochs=1, save_strategy="epoch")
    first = sft.main(["--config", str(recipe)]).state.global_step
    counter = StepCounter()
    sft.main(["--config", str(recipe), "--resume_from_checkpoint", "true"], callbacks=[counter])
    assert counter.steps == 0, "an epoch-based run at its end trains no extra step either"
    counter = StepCounter()
    trainer = sft.main(["--config", str(recipe), "--resume_from_checkpoint", "true", "--num_train_epochs", "2"],
                       callbacks=[counter])  # fmt: skip
    assert counter.steps == first and trainer.state.global_step == 2 * first


def crash_after_staging(trainer: Trainer) -> None:
    """The process dies (here: raises) once the final model is written to its staging folder, before the commit."""
    save_model = trainer.save_model

    def save_then_crash(output_dir=None, *args, **kwargs):
        save_model(output_dir, *args, **kwargs)
        if Path(output_dir).name == ".final.partial":
            raise KeyboardInterrupt("killed after staging the final model")

    trainer.save_model = save_then_crash


def test_the_final_save_is_atomic_and_a_resume_finishes_it(run_copy):
    out = run_copy / "out"
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert (out / FINAL_MANIFEST).is_file(), "a completed final save says so"
    # Train on to step 8; the final save of that run dies after staging: the earlier model is untouched.
    argv = ["--config", str(run_copy / "recipe.yaml"), "--resume_from_checkpoint", "true", "--max_steps", "8"]
    with pytest.raises(KeyboardInterrupt):
        sft.main(argv, before_train=crash_after_staging)
    assert (out / ".final.partial" / "model.safetensors").is_file()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == earlier
    with pytest.raises(ModelSourceError, match=r"its final save was interrupted \(.final.partial is left\); rerun"):
        load_model(out)

    counter = StepCounter()
    sft.main(argv, callbacks=[counter])
    assert counter.steps == 0, "the final checkpoint is published, not trained on"
    assert not (out / ".final.partial").exists() and (out / FINAL_MANIFEST).is_file()
    last = final_weights(out / "checkpoint-8")
    assert max_abs_diff(final_weights(out), last) == 0.0
    loaded = load_model(out).state_dict()
    assert max_abs_diff({k: loaded[k] for k in last}, last) == 0.0


def test_checkpointing_overrides_no_private_trainer_method():
    """Sealing, rotation, the run id and the final save are callbacks and checks in `run_recipe`: no class of this
    project in the trainer's MRO overrides a private `Trainer` method, which a transformers release could change."""
    ours = [cls for cls in MiniMindTrainer.__mro__ if cls.__module__.startswith("minimind_hf")]
    overridden = {
        f"{cls.__name__}.{name}"
        for cls in ours
        for name in vars(cls)
        if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)
    }
    assert not overridden, overridden
    for name in ("_save_checkpoint", "_load_from_checkpoint", "_run_epoch", "_rotate_checkpoints"):
        assert all(name not in vars(cls) for cls in ours), name


def test_a_leftover_directory_of_the_same_step_is_replaced_not_mixed_into(tmp_path):
    leftover = tmp_path / "out" / "checkpoint-2"
    leftover.mkdir(parents=True)
    (leftover / "stale.bin").write_bytes(b"from an interrupted save")
    sft.main(["--config", str(write_recipe(tmp_path, max_steps=2))])
    assert not (leftover / "stale.bin").exists()
    assert checkpoint_problem(leftover) is None


def test_rotation_counts_only_sealed_checkpoints_and_keeps_the_newest_and_the_kept(tmp_path):
    for step in (2, 4, 6, 8):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        if step != 8:
            seal_checkpoint(folder)
    assert rotate_complete_checkpoints(tmp_path, 1, keep=[tmp_path / "checkpoint-2"]) == [tmp_path / "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert rotate_complete_checkpoints(tmp_path, None) == []


class Payload:
    """Unpickling this creates a directory: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_never_unpickles_code_from_a_checkpoint(run_copy, name):
    checkpoint = run_copy / "out" / "checkpoint-4"
    marker = run_copy / "code_ran"
    torch.save({"state": Payload(marker)}, checkpoint / name)
    seal_checkpoint(checkpoint)  # even with a matching manifest
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        sft.main(["--config", str(run_copy / "recipe.yaml"), "--resume_from_checkpoint", str(checkpoint)])
    assert not marker.exists()


def test_training_args_bin_is_never_loaded_on_resume(run_copy):
    checkpoint = run_copy / "out" / "checkpoint-6"
    marker = run_copy / "code_ran"
    torch.save(Payload(marker), checkpoint / "training_args.bin")
    seal_checkpoint(checkpoint)
    sft.main(["--config", str(run_copy / "recipe.yaml"), "--resume_from_checkpoint", str(checkpoint)])
    assert not marker.exists()
