"""The SFT recipe end to end on a tiny model: loss, schedule, seeding, resume, model sources, DDP and bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minimind_hf.checkpointing import MANIFEST, checkpoint_problem
from minimind_hf.errors import RecipeError
from minimind_hf.run_dir import check_output_dir_writable
from minimind_hf.stages import sft
from minimind_hf.testing import (
    REPO_ROOT,
    StepCounter,
    final_weights,
    max_abs_diff,
    record_batches,
    write_sft_data,
    write_tiny_recipe,
)
from minimind_hf.training import parse_recipe


def write_recipe(tmp_path: Path, name: str = "recipe.yaml", **overrides) -> Path:
    """The tiny recipe on `write_sft_data`'s conversations: 6 steps, a checkpoint every 3, a log line every step."""
    write_sft_data(tmp_path / "sft.jsonl")
    return write_tiny_recipe(tmp_path, name, **{"max_steps": 6, "save_steps": 3, "logging_steps": 1, **overrides})


def test_first_step_loss_is_masked_cross_entropy_and_lr_follows_minimind(tmp_path):
    batches, initial = [], {}

    def before_train(trainer):
        initial.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        record_batches(trainer, batches, first_only=True)

    trainer = sft.main(["--config", str(write_recipe(tmp_path, max_steps=8))], before_train=before_train)
    inputs = batches[0]
    assert "attention_mask" not in inputs and "position_ids" in inputs, "packed rows, no padding mask"

    model = trainer.model
    model.load_state_dict(initial)
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
    diff = max_abs_diff(a, b)
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
    with pytest.raises(RecipeError, match="none.pth: no such model"):
        sft.main(["--config", str(write_recipe(tmp_path, model_name_or_path=str(tmp_path / "none.pth")))])
    with pytest.raises(SystemExit):
        sft.main(["--config", str(write_recipe(tmp_path, learning_rate="fast"))])
    assert not (tmp_path / "out").exists(), "nothing may be written for a recipe that cannot run"


DDP_PROBE = """
import json, os, sys
from minimind_hf.stages import sft
seen, find_unused = [], []
def before_train(trainer):
    compute_loss = trainer.compute_loss
    def record(model, inputs, *a, **kw):
        find_unused.append(model.find_unused_parameters)  # `model` is the DDP wrapper here
        ids, labels = inputs["input_ids"], inputs["labels"]
        seen.extend(repr(ids[row][labels[row] != -100].tolist()) for row in range(len(ids)))
        return compute_loss(model, inputs, *a, **kw)
    trainer.compute_loss = record
sft.main(sys.argv[1:], before_train=before_train)
with open(os.path.join({out!r}, "seen-" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({{"seen": seen, "find_unused": find_unused}}, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_torchrun_two_processes_disjoint_data_no_unused_parameter_search_and_reload(tmp_path, use_moe):
    recipe = write_recipe(tmp_path, max_steps=3, save_steps=2, per_device_train_batch_size=2, use_moe=use_moe)
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE.format(recipes=str(REPO_ROOT / "recipes"), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(probe), "--config", str(recipe)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["seen"] and ranks[1]["seen"]
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"]), "both ranks trained on the same packed rows"
    # Every parameter gets a gradient (MoE experts too), so DDP is not asked to search for unused ones; were it
    # asked, torch would warn that it found none.
    assert {flag for rank in ranks for flag in rank["find_unused"]} == {False}
    assert "find_unused_parameters=True" not in result.stderr

    out = tmp_path / "out"
    assert max_abs_diff(final_weights(out), final_weights(out / "checkpoint-3")) == 0.0, "the final model is step 3"
    assert json.loads((out / "config.json").read_text())["use_moe"] is use_moe

    # Saved by 2 processes, resumed by 1: the optimizer step count (and so the LR schedule) carries on.
    shutil.rmtree(out / "checkpoint-3")
    counter = StepCounter()
    trainer = sft.main(["--config", str(recipe), "--resume_from_checkpoint", "true"], callbacks=[counter])
    assert trainer.state.global_step == 3 and counter.steps == 1, "resumed after step 2, not from the start"


@pytest.mark.slow
def test_resumed_run_continues_the_same_swanlab_run_whose_id_the_manifest_covers(tmp_path, monkeypatch):
    monkeypatch.setenv("SWANLAB_MODE", "local")  # written to disk only, never the network
    recipe = write_recipe(tmp_path, max_steps=4, save_steps=2, report_to="swanlab")
    sft.main(["--config", str(recipe)])
    out = tmp_path / "out"
    run_id = (out / "checkpoint-2" / "swanlab_run_id.txt").read_text()
    # The run id is part of the sealed checkpoint: covered by its manifest, so damage to it is detected too.
    for step in (2, 4):
        manifest = json.loads((out / f"checkpoint-{step}" / MANIFEST).read_text())
        assert "swanlab_run_id.txt" in manifest["files"], sorted(manifest["files"])
        assert checkpoint_problem(out / f"checkpoint-{step}") is None
    shutil.rmtree(out / "checkpoint-4")
    sft.main(["--config", str(recipe), "--resume_from_checkpoint", "true"])
    runs = sorted(p.name for p in (out / "swanlog").glob("run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), runs


def test_the_seed_decides_a_fresh_models_initialisation(tmp_path):
    weights = {}
    for name, seed, noise in (("a", 7, 1), ("b", 7, 2), ("c", 8, 1)):
        # Whatever the global RNG state before the run, the recipe's seed alone decides the fresh model.
        torch.manual_seed(noise)
        recipe = write_recipe(tmp_path, f"{name}.yaml", output_dir=str(tmp_path / name), model_name_or_path=None,
                              seed=seed, max_steps=3, save_steps=100)  # fmt: skip
        sft.main(["--config", str(recipe)])
        weights[name] = final_weights(tmp_path / name)
    diff = max_abs_diff(weights["a"], weights["b"])
    print(f"two runs of seed 7: max |a - b| = {diff}; seed 7 vs 8: {max_abs_diff(weights['a'], weights['c']):.3g}")
    assert diff == 0.0
    assert max_abs_diff(weights["a"], weights["c"]) > 0.0


def test_project_defaults_no_unused_parameter_search_and_no_deprecated_checkpointing_key(tmp_path):
    recipe = write_recipe(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, training_args = parse_recipe(argv=["--config", str(recipe)])
    assert training_args.ddp_find_unused_parameters is False
    assert training_args.activation_checkpointing is False
    deprecated = [str(w.message) for w in caught if "gradient_checkpointing" in str(w.message)]
    assert not deprecated, deprecated


def _probe_output_dir(path: str, rounds: int, barrier, failures) -> None:
    for _ in range(rounds):
        barrier.wait()  # both processes probe at the same moment, as DDP ranks do at start-up
        try:
            check_output_dir_writable(path)
        except RecipeError as err:
            failures.put(str(err))


@pytest.mark.slow
def test_ranks_probing_one_output_dir_at_once_do_not_trip_each_other(tmp_path):
    # Two processes checking one output directory at the same moment (under torchrun before only the main process
    # checked; two runs starting together still do): a shared probe file made one delete the file the other was
    # about to delete ("not writable: No such file").
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, failures = context.Barrier(2), context.Queue()
    ranks = [
        context.Process(target=_probe_output_dir, args=(str(tmp_path / "out"), 400, barrier, failures))
        for _ in range(2)
    ]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=120)
    assert all(rank.exitcode == 0 for rank in ranks)
    assert failures.empty(), failures.get()
    assert list((tmp_path / "out").iterdir()) == [], "the probes must leave nothing behind"
