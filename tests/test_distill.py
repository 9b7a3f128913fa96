"""Distillation (MiniMind-3's train_distillation.py): the loss against a hand computation on a real batch, exact
resume, and a teacher of another vocabulary refused before any work."""

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minimind_hf.errors import RecipeError
from minimind_hf.stages import distill
from minimind_hf.testing import (
    final_weights,
    max_abs_diff,
    record_batches,
    save_hf_dir,
    save_minimind3_dir,
    tiny_minimind3_model,
    tiny_model,
    write_sft_data,
    write_tiny_recipe,
)

pytestmark = pytest.mark.usefixtures("datasets_cache")


@pytest.fixture
def tokenizer_dir(shared_fixtures) -> Path:
    return shared_fixtures / "minimind3_reference" / "tokenizer"


def write_recipe(tmp_path: Path, tokenizer_dir: Path, name: str = "recipe.yaml", **overrides) -> Path:
    """A dense student half the MoE teacher's width (32 vs 64), both MiniMind-3."""
    student = save_minimind3_dir(tiny_minimind3_model(seed=0), tmp_path / "student", tokenizer_dir)
    teacher = tiny_minimind3_model(seed=1, hidden_size=64, intermediate_size=128, use_moe=True)
    write_sft_data(tmp_path / "sft.jsonl")
    keys = {
        "tokenizer_name_or_path": str(tokenizer_dir),
        "model_name_or_path": str(student),
        "teacher_model_name_or_path": str(save_minimind3_dir(teacher, tmp_path / "teacher", tokenizer_dir)),
        "config_overrides": "",
        "max_length": 128,
        "max_steps": 4,
        "save_steps": 2,
        "logging_steps": 1,
        **overrides,
    }
    return write_tiny_recipe(tmp_path, name, **keys)


def test_loss_is_alpha_ce_plus_t2_kl_on_a_real_batch(tmp_path, tokenizer_dir):
    recipe = write_recipe(tmp_path, tokenizer_dir, max_steps=1, alpha=0.3, temperature=2.0, use_moe=False)
    batches = []
    trainer = distill.main(
        ["--config", str(recipe)], before_train=lambda trainer: record_batches(trainer, batches, first_only=True)
    )
    student = tiny_minimind3_model(seed=0)
    teacher = tiny_minimind3_model(seed=1, hidden_size=64, intermediate_size=128, use_moe=True)
    batch = batches[0]
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        s_logits, t_logits = student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    s_logits, t_logits, targets = s_logits[keep], t_logits[keep], targets[keep]
    ce = F.cross_entropy(s_logits, targets)
    kl_per_token = [
        sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt.tolist(), qs.tolist(), strict=True) if p > 0)
        for pt, qs in zip(F.softmax(t_logits / 2.0, -1), F.softmax(s_logits / 2.0, -1), strict=True)
    ]
    expected = 0.3 * ce.item() + 0.7 * 4.0 * sum(kl_per_token) / len(kl_per_token)
    logged = trainer.state.log_history[0]
    print(f"distillation: logged {logged['loss']:.6f}, by hand {expected:.6f} (ce {ce.item():.4f})")
    # Float32 sums in a different order (the trainer reduces on the tensor, the hand computation in Python floats).
    assert logged["ce_loss"] == pytest.approx(ce.item(), rel=1e-4)
    assert logged["loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_moe_student_adds_its_aux_and_resume_is_exact(tmp_path, tokenizer_dir):
    straight = write_recipe(tmp_path, tokenizer_dir, "straight.yaml", output_dir=str(tmp_path / "a"))
    trainer = distill.main(["--config", str(straight)])
    assert "kl_loss" in trainer.state.log_history[0]

    interrupted = write_recipe(tmp_path, tokenizer_dir, "interrupted.yaml", output_dir=str(tmp_path / "b"))
    distill.main(["--config", str(interrupted)])
    out = tmp_path / "b"
    shutil.rmtree(out / "checkpoint-4")
    for lost in ["model.safetensors", "model_complete.json"]:
        (out / lost).unlink(missing_ok=True)
    distill.main(["--config", str(interrupted), "--resume_from_checkpoint", "true"])
    assert max_abs_diff(final_weights(tmp_path / "a"), final_weights(out)) == 0.0


def test_moe_student_loss_includes_its_aux(tmp_path, tokenizer_dir):
    moe = save_minimind3_dir(tiny_minimind3_model(seed=0, use_moe=True), tmp_path / "moe", tokenizer_dir)
    recipe = write_recipe(tmp_path, tokenizer_dir, max_steps=1, model_name_or_path=str(moe))
    logged = distill.main(["--config", str(recipe)]).state.log_history[0]
    # alpha 0.5: loss = 0.5 * (ce + aux) + 0.5 * T^2 * kl
    expected = 0.5 * (logged["ce_loss"] + logged["aux_loss"]) + 0.5 * 1.5**2 * logged["kl_loss"]
    assert logged["aux_loss"] > 0 and logged["loss"] == pytest.approx(expected, rel=1e-4)


def test_bad_teachers_and_keys_are_refused_before_any_work(tmp_path, tokenizer_dir):
    recipe = write_recipe(tmp_path, tokenizer_dir)
    minimind2 = save_hf_dir(tiny_model(), tmp_path / "minimind2")
    with pytest.raises(RecipeError, match="is a MiniMind2 model and the student MiniMind-3: their vocabularies differ"):
        distill.main(["--config", str(recipe), "--teacher_model_name_or_path", str(minimind2)])
    small = save_minimind3_dir(tiny_minimind3_model(vocab_size=3000), tmp_path / "small", tokenizer_dir)
    with pytest.raises(RecipeError, match="vocab_size=3000, fewer than the student's 6400"):
        distill.main(["--config", str(recipe), "--teacher_model_name_or_path", str(small)])
    with pytest.raises(RecipeError, match="teacher_model_name_or_path .*no such model"):
        distill.main(["--config", str(recipe), "--teacher_model_name_or_path", str(tmp_path / "missing")])
    with pytest.raises(RecipeError, match="alpha must be between 0 and 1"):
        distill.main(["--config", str(recipe), "--alpha", "1.5"])
    with pytest.raises(RecipeError, match="temperature must be > 0"):
        distill.main(["--config", str(recipe), "--temperature", "0"])
    assert not (tmp_path / "out" / "checkpoint-2").exists()
