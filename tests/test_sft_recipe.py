"""The SFT recipe end to end on a tiny model: loss, schedule, resume, model sources, DDP and bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from minimind_hf.training import RecipeError

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizer"
sys.path.insert(0, str(REPO / "recipes"))
import sft  # noqa: E402

from minimind_hf import training  # noqa: E402


def write_data(path: Path, n: int = 48) -> Path:
    lines = []
    for i in range(n):
        turns = [{"role": "user", "content": f"What is {i} plus {i % 7}?"}]
        turns.append({"role": "assistant", "content": f"{i} plus {i % 7} is {i + i % 7}."})
        if i % 3 == 0:
            turns = [{"role": "system", "content": "Answer briefly."}, *turns]
        if i % 4 == 0:
            turns += [{"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": str(2 * i)}]
        lines.append(json.dumps({"conversations": turns}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_recipe(tmp_path: Path, name: str = "recipe.yaml", **overrides) -> Path:
    recipe = {
        "data_path": str(write_data(tmp_path / "sft.jsonl")),
        "tokenizer_name_or_path": str(TOKENIZER),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "config_overrides": "num_attention_heads=4,num_key_value_heads=2",
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_length": 64,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_steps": 3,
        "bf16": False,
        "report_to": "none",
        "dataloader_num_workers": 0,
    }
    recipe.update(overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "model.safetensors")


def test_first_step_loss_is_masked_cross_entropy_and_lr_follows_minimind(tmp_path, monkeypatch):
    captured = {}
    original = training.build_trainer

    def capturing_build_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        compute_loss = trainer.compute_loss

        def first_loss(model, inputs, *a, **kw):
            if "inputs" not in captured:
                captured.update(inputs={k: v.clone() for k, v in inputs.items()}, initial=initial)
            return compute_loss(model, inputs, *a, **kw)

        trainer.compute_loss = first_loss
        captured["trainer"] = trainer
        return trainer

    monkeypatch.setattr(training, "build_trainer", capturing_build_trainer)
    sft.main(["--config", str(write_recipe(tmp_path, max_steps=8))])
    trainer, inputs = captured["trainer"], captured["inputs"]
    assert "attention_mask" not in inputs and "position_ids" in inputs, "packed rows, no padding mask"

    model = trainer.model
    model.load_state_dict(captured["initial"])
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits
    targets = inputs["labels"][:, 1:]
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    logged = trainer.state.log_history[0]["loss"]
    print(f"first step: logged {logged:.6f}, by hand {by_hand.item():.6f}")
    assert logged == pytest.approx(by_hand.item(), rel=1e-4)

    # MiniMind: lr(t) = peak * (0.1 + 0.45 * (1 + cos(pi * t / T))), t counting optimizer steps from 0.
    logged_lr = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    expected = [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * t / 8))) for t in range(8)]
    assert logged_lr == pytest.approx(expected, rel=1e-6)
    assert logged_lr[0] == pytest.approx(1e-3) and logged_lr[4] == pytest.approx(0.55e-3)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_after_a_checkpoint_is_exact(tmp_path, accumulation):
    straight = write_recipe(tmp_path, "straight.yaml", output_dir=str(tmp_path / "straight"))
    sft.main(["--config", str(straight), "--gradient_accumulation_steps", str(accumulation)])

    # The interrupted run: everything after checkpoint-3 is lost, then `resume_from_checkpoint: true`.
    interrupted = write_recipe(tmp_path, "interrupted.yaml", output_dir=str(tmp_path / "interrupted"))
    sft.main(["--config", str(interrupted), "--gradient_accumulation_steps", str(accumulation)])
    out = tmp_path / "interrupted"
    shutil.rmtree(out / "checkpoint-6")
    for lost in ["model.safetensors", "config.json"]:
        (out / lost).unlink()
    sft.main(["--config", str(interrupted), "--gradient_accumulation_steps", str(accumulation),
              "--resume_from_checkpoint", "true"])  # fmt: skip

    a, b = final_weights(tmp_path / "straight"), final_weights(out)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resume (accumulation {accumulation}): max |straight - resumed| = {diff}")
    assert diff == 0.0
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_resume_true_without_checkpoint_starts_fresh(tmp_path, caplog):
    recipe = write_recipe(tmp_path, max_steps=2, save_steps=10)
    with caplog.at_level("WARNING", logger="minimind_hf"):
        sft.main(["--config", str(recipe), "--resume_from_checkpoint", "true"])
    assert "no checkpoint" in caplog.text
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_final_directory_is_a_chat_model_and_writes_the_original_pth(tmp_path):
    sft.main(["--config", str(write_recipe(tmp_path, max_steps=2, save_pth=True))])
    out = tmp_path / "out"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    assert (out / "full_sft_32.pth").is_file()
    pth = torch.load(out / "full_sft_32.pth", weights_only=True)
    assert torch.equal(pth["lm_head.weight"], pth["model.embed_tokens.weight"])


def test_starting_from_the_original_pth(shared_fixtures, tmp_path):
    recipe = write_recipe(
        tmp_path,
        model_name_or_path=str(shared_fixtures / "minimind_reference" / "dense_fp16.pth"),
        hidden_size=64,
        num_hidden_layers=2,
        config_overrides="num_attention_heads=8,num_key_value_heads=2",
        max_steps=2,
        learning_rate=1e-12,
    )
    sft.main(["--config", str(recipe)])
    original = torch.load(shared_fixtures / "minimind_reference" / "dense_fp16.pth", weights_only=True)
    trained = final_weights(tmp_path / "out")
    diff = (trained["model.norm.weight"] - original["model.norm.weight"].float()).abs().max().item()
    assert diff < 1e-6, "a negligible learning rate must leave the loaded weights in place"


def test_bad_recipes_fail_fast_naming_the_problem(tmp_path):
    with pytest.raises(RecipeError, match="unknown key 'learning_rat' \\(did you mean 'learning_rate'\\?\\)"):
        sft.main(["--config", str(write_recipe(tmp_path, learning_rat=1e-3))])
    with pytest.raises(RecipeError, match="unknown key 'hiden_size'"):
        sft.main(["--config", str(write_recipe(tmp_path)), "--hiden_size", "64"])
    with pytest.raises(Exception, match="nothere.jsonl"):
        sft.main(["--config", str(write_recipe(tmp_path, data_path=str(tmp_path / "nothere.jsonl")))])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RecipeError, match="not writable"):
        sft.main(["--config", str(write_recipe(tmp_path, output_dir=str(tmp_path / "a_file" / "out")))])
    with pytest.raises(RecipeError, match="does not exist"):
        sft.main(["--config", str(write_recipe(tmp_path, model_name_or_path=str(tmp_path / "none.pth")))])
    with pytest.raises(SystemExit):
        sft.main(["--config", str(write_recipe(tmp_path, learning_rate="fast"))])
    assert not (tmp_path / "out").exists(), "nothing may be written for a recipe that cannot run"


DDP_PROBE = """
import json, os, sys
sys.path.insert(0, {recipes!r})
import sft
from minimind_hf import training
seen = []
original = training.build_trainer
def recording(*args, **kwargs):
    trainer = original(*args, **kwargs)
    compute_loss = trainer.compute_loss
    def record(model, inputs, *a, **kw):
        ids, labels = inputs["input_ids"], inputs["labels"]
        seen.extend(ids[row][labels[row] != -100].tolist().__repr__() for row in range(len(ids)))
        return compute_loss(model, inputs, *a, **kw)
    trainer.compute_loss = record
    return trainer
training.build_trainer = recording
sft.main(sys.argv[1:])
with open(os.path.join({out!r}, "seen-" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(seen, f)
"""


@pytest.mark.slow
def test_torchrun_two_processes_disjoint_data_and_reload(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, max_steps=3, save_steps=2, per_device_train_batch_size=2)
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE.format(recipes=str(REPO / "recipes"), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(probe), "--config", str(recipe)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = json.loads((tmp_path / "seen-0.json").read_text())
    rank1 = json.loads((tmp_path / "seen-1.json").read_text())
    assert rank0 and rank1
    assert not set(rank0) & set(rank1), "both ranks trained on the same packed rows"

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    answer = model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=5, do_sample=False)
    assert answer.shape[1] > 4

    # Saved by 2 processes, resumed by 1: the optimizer step count (and so the LR schedule) carries on.
    shutil.rmtree(tmp_path / "out" / "checkpoint-3")
    steps_run = []
    original = training.build_trainer

    def counting(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(type("Count", (TrainerCallback,), {"on_step_end": lambda *a, **k: steps_run.append(1)}))
        return trainer

    monkeypatch.setattr(training, "build_trainer", counting)
    trainer = sft.main(["--config", str(recipe), "--resume_from_checkpoint", "true"])
    assert trainer.state.global_step == 3 and len(steps_run) == 1, "resumed after step 2, not from the start"


def test_resumed_run_continues_the_same_swanlab_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SWANLAB_MODE", "local")  # written to disk only, never the network
    recipe = write_recipe(tmp_path, max_steps=4, save_steps=2, report_to="swanlab")
    sft.main(["--config", str(recipe)])
    out = tmp_path / "out"
    run_id = (out / "checkpoint-2" / "swanlab_run_id.txt").read_text()
    shutil.rmtree(out / "checkpoint-4")
    sft.main(["--config", str(recipe), "--resume_from_checkpoint", "true"])
    runs = sorted(p.name for p in (out / "swanlog").glob("run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), runs
