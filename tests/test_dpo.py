"""DPO: the original's loss on the original's fixture, the SFT-rule mask, validation, reference model, resume."""

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

from minimind_hf.data import IGNORE_INDEX, DataError, encode_conversation
from minimind_hf.errors import RecipeError
from minimind_hf.stages import dpo
from minimind_hf.stages.dpo import assistant_token_mask, load_dpo_dataset
from minimind_hf.testing import (
    REPO_ROOT,
    TINY_RECIPE,
    arithmetic_conversations,
    final_weights,
    max_abs_diff,
    record_batches,
    save_hf_dir,
    save_minimind3_dir,
    tiny_minimind3_model,
    tiny_model,
    write_jsonl,
    write_sft_data,
    write_tiny_recipe,
)
from minimind_hf.tokenizer import BOS_TOKEN, load_tokenizer


def preference_pairs(n: int = 24) -> list[dict]:
    """Pairs on the arithmetic conversations: chosen is the conversation, rejected gets wrong last answers."""
    pairs = []
    for row in arithmetic_conversations(n):
        chosen = row["conversations"]
        rejected = [dict(m) for m in chosen]
        rejected[-1]["content"] = "I do not know."
        pairs.append({"chosen": chosen, "rejected": rejected})
    return pairs


def write_recipe(tmp_path: Path, name: str = "recipe.yaml", **overrides) -> Path:
    write_jsonl(tmp_path / "dpo.jsonl", preference_pairs())
    recipe = {
        **TINY_RECIPE,
        "data_path": str(tmp_path / "dpo.jsonl"),
        "model_name_or_path": str(save_hf_dir(tiny_model(), tmp_path / "policy")),
        "output_dir": str(tmp_path / "out"),
        "max_length": 128,  # the default system prompt and an arithmetic question take ~64 shipped tokens
        "max_steps": 4,
        "save_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-2,
        **overrides,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_first_logged_loss_is_the_originals_on_its_fixture(shared_fixtures, tmp_path):
    reference = shared_fixtures / "minimind_reference"
    expected = json.loads((reference / "dpo" / "expected.json").read_text())
    sizes = expected["config"]
    recipe = {
        "data_path": str(reference / "dpo" / "pairs.jsonl"),
        "tokenizer_name_or_path": str(shared_fixtures / "minimind_tokenizer"),
        "model_name_or_path": str(reference / "dense_fp16.pth"),
        "ref_model_name_or_path": str(reference / "dpo" / "ref_fp16.pth"),
        "hidden_size": sizes["hidden_size"],
        "num_hidden_layers": sizes["num_hidden_layers"],
        "config_overrides": f"num_attention_heads={sizes['num_attention_heads']},"
        f"num_key_value_heads={sizes['num_key_value_heads']}",
        "max_length": expected["max_length"],
        "beta": expected["beta"],
        "per_device_train_batch_size": 4,
        "max_steps": 1,
        "logging_steps": 1,
        "save_steps": 10,
        "bf16": False,
        "report_to": "none",
        "dataloader_num_workers": 0,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for loss_type, key in [("sigmoid_norm", "loss_minimind"), ("sigmoid", "loss_summed_logps")]:
        batches = []
        trainer = dpo.main(
            ["--config", str(tmp_path / "recipe.yaml"), "--loss_type", loss_type, "--output_dir", str(tmp_path / key)],
            before_train=lambda trainer, batches=batches: record_batches(trainer, batches, first_only=True),
        )
        logged = trainer.state.log_history[0]
        print(f"{loss_type}: first logged loss {logged['loss']:.8f}, the original's {expected[key]:.8f}")
        assert logged["loss"] == pytest.approx(expected[key], abs=2e-6)
        assert {"rewards/margins", "rewards/accuracies", "rewards/chosen", "logps/chosen"} <= set(logged)
        # All four pairs in the one batch (shuffled): chosen rows first, then their rejected rows.
        counts = batches[0]["completion_mask"].sum(dim=1).tolist()
        pairs = sorted(zip(counts[:4], counts[4:], strict=True))
        want = expected["supervised_tokens_chosen"], expected["supervised_tokens_rejected"]
        assert pairs == sorted(zip(*want, strict=True))


def summed_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Each row's log-prob summed over its supervised targets (the completion mask, shifted)."""
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(1)


@pytest.mark.parametrize("use_moe", [True, False])
def test_minimind3_dpo_is_the_originals_summed_loss_with_beta_015_and_aux(shared_fixtures, tmp_path, use_moe):
    """MiniMind-3's `train_dpo.py`: summed log-probs, beta 0.15, plus the policy's MoE balance loss, by default."""
    tokenizer_dir = shared_fixtures / "minimind3_reference" / "tokenizer"
    policy = tiny_minimind3_model(seed=0, use_moe=use_moe)
    reference = tiny_minimind3_model(seed=1, use_moe=use_moe)
    write_jsonl(tmp_path / "dpo.jsonl", preference_pairs(8))
    recipe = {
        **TINY_RECIPE,
        "tokenizer_name_or_path": str(tokenizer_dir),
        "data_path": str(tmp_path / "dpo.jsonl"),
        "model_name_or_path": str(save_minimind3_dir(policy, tmp_path / "policy", tokenizer_dir)),
        "ref_model_name_or_path": str(save_minimind3_dir(reference, tmp_path / "reference", tokenizer_dir)),
        "config_overrides": "",
        "max_length": 128,
        "max_steps": 1,
        "logging_steps": 1,
        "save_steps": 10,
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    batches = []
    trainer = dpo.main(
        ["--config", str(tmp_path / "recipe.yaml")],
        before_train=lambda trainer: record_batches(trainer, batches, first_only=True),
    )
    assert trainer.args.beta == 0.15 and trainer.args.loss_type == ["sigmoid"]
    batch = batches[0]
    policy_logps, reference_logps = summed_logps(policy, batch), summed_logps(reference, batch)
    (pi_c, pi_r), (ref_c, ref_r) = policy_logps.chunk(2), reference_logps.chunk(2)
    expected = -F.logsigmoid(0.15 * ((pi_c - pi_r) - (ref_c - ref_r))).mean()
    logged = trainer.state.log_history[0]
    if use_moe:
        # The original adds the policy forward's `aux_loss` (train mode, every position of the batch).
        with torch.no_grad():
            aux = policy.train()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).aux_loss
        assert aux > 0 and logged["aux_loss"] == pytest.approx(aux.item(), rel=1e-5)
        expected = expected + aux
    else:
        assert "aux_loss" not in logged
    print(f"MiniMind-3 DPO (moe={use_moe}): logged {logged['loss']:.8f}, the original's formula {expected:.8f}")
    assert logged["loss"] == pytest.approx(expected.item(), abs=2e-6)


def test_the_seed_dpo_stays_an_option_for_minimind3_and_bad_keys_are_one_line_errors(shared_fixtures, tmp_path):
    tokenizer_dir = shared_fixtures / "minimind3_reference" / "tokenizer"
    write_jsonl(tmp_path / "dpo.jsonl", preference_pairs(8))
    recipe = {
        **TINY_RECIPE,
        "tokenizer_name_or_path": str(tokenizer_dir),
        "data_path": str(tmp_path / "dpo.jsonl"),
        "model_name_or_path": str(save_minimind3_dir(tiny_minimind3_model(), tmp_path / "policy", tokenizer_dir)),
        "config_overrides": "",
        "max_length": 128,
        "max_steps": 1,
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    argv = ["--config", str(tmp_path / "recipe.yaml")]
    trainer = dpo.main([*argv, "--dpo_logprob_reduction", "mean", "--beta", "0.1"])
    assert trainer.args.loss_type == ["sigmoid_norm"] and trainer.args.beta == 0.1
    argv += ["--output_dir", str(tmp_path / "refused")]
    with pytest.raises(RecipeError, match="dpo_logprob_reduction must be mean, sum or null"):
        dpo.main([*argv, "--dpo_logprob_reduction", "median"])
    with pytest.raises(RecipeError, match="dpo_logprob_reduction: sum is loss_type sigmoid, but loss_type is ipo"):
        dpo.main([*argv, "--dpo_logprob_reduction", "sum", "--loss_type", "ipo"])
    with pytest.raises(RecipeError, match=r"beta: must be in \(0, inf\]"):
        dpo.main([*argv, "--beta", "-1"])
    assert not (tmp_path / "refused").exists()


def test_the_mask_from_token_ids_is_the_originals_sft_mask(shared_fixtures, tokenizer_dir):
    tokenizer = load_tokenizer(shared_fixtures / "minimind_tokenizer")
    header = tokenizer.encode(BOS_TOKEN + "assistant", add_special_tokens=False)
    rows = (shared_fixtures / "minimind_reference" / "sft_loss_mask.jsonl").read_text().splitlines()
    for row in map(json.loads, rows):
        mask = assistant_token_mask(row["input_ids"], header, tokenizer.eos_token_id)
        assert [i for i, m in enumerate(mask) if m] == row["supervised_token_indices"]

    # The project tokenizer, with replies that start with spaces (the header's newline merges into them).
    tokenizer = load_tokenizer(tokenizer_dir)
    header = tokenizer.encode(BOS_TOKEN + "assistant", add_special_tokens=False)
    leading_spaces = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  b"}]
    for conversation in [pair["chosen"] for pair in preference_pairs(8)] + [leading_spaces]:
        encoded = encode_conversation(conversation, tokenizer, None)
        mask = assistant_token_mask(encoded["input_ids"], header, tokenizer.eos_token_id)
        assert mask == [int(label != IGNORE_INDEX) for label in encoded["labels"]]


def test_bad_pairs_are_named_by_file_and_line_or_counted(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    good = preference_pairs(2)
    answer = good[0]["chosen"][-1]
    long_question = {"role": "user", "content": "long " * 80}
    bad = [
        {"chosen": good[0]["chosen"]},
        {"chosen": good[0]["chosen"], "rejected": [{"role": "robot", "content": "x"}]},
        {"chosen": good[0]["chosen"], "rejected": good[0]["chosen"]},
        {"chosen": good[0]["chosen"], "rejected": [{"role": "user", "content": "other"}, answer]},
        {"chosen": [long_question, answer], "rejected": [long_question, {"role": "assistant", "content": "wrong"}]},
    ]
    messages = [
        'pairs.jsonl:2: no "rejected" field',
        "pairs.jsonl:2: rejected: message 0 has role 'robot'",
        "pairs.jsonl:2: chosen and rejected are the same conversation",
        "pairs.jsonl:2: chosen and rejected differ from their first message on",
        "pairs.jsonl:2: the prompt chosen and rejected share is",
    ]
    for row, message in zip(bad, messages, strict=True):
        path = write_jsonl(tmp_path / "pairs.jsonl", [good[1], row, good[1]])
        with pytest.raises(DataError, match=message):
            load_dpo_dataset(path, tokenizer=tokenizer, max_length=64)
    path = write_jsonl(tmp_path / "pairs.jsonl", [good[1], *bad, good[1]])
    dataset = load_dpo_dataset(path, skip_invalid=True, tokenizer=tokenizer, max_length=64)
    assert len(dataset) == 2 and sum(dataset.load_report.skipped.values()) == 5


@pytest.mark.slow
def test_reference_defaults_to_the_policys_start_and_resume_is_exact(tmp_path):
    # Policy == reference at step 1: the loss is exactly log 2 and the margin 0, whatever the pairs.
    straight = write_recipe(tmp_path, "straight.yaml", output_dir=str(tmp_path / "a"))
    trainer = dpo.main(["--config", str(straight)])
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0.0
    later = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert later[-1] < later[0], "the policy moved away from the reference"

    interrupted = write_recipe(tmp_path, "interrupted.yaml", output_dir=str(tmp_path / "b"))
    dpo.main(["--config", str(interrupted)])
    out = tmp_path / "b"
    shutil.rmtree(out / "checkpoint-4")
    for lost in ["model.safetensors", "model_complete.json"]:
        (out / lost).unlink()
    # Resumed, the reference is still the policy's start (model_name_or_path), not the checkpoint's weights.
    dpo.main(["--config", str(interrupted), "--resume_from_checkpoint", "true"])
    assert max_abs_diff(final_weights(tmp_path / "a"), final_weights(out)) == 0.0


def test_a_bad_reference_fails_before_any_work(tmp_path):
    recipe = write_recipe(tmp_path)
    with pytest.raises(RecipeError, match="ref_model_name_or_path .*no such model"):
        dpo.main(["--config", str(recipe), "--ref_model_name_or_path", str(tmp_path / "missing")])
    other = save_hf_dir(tiny_model(hidden_size=64, num_attention_heads=8), tmp_path / "wide")
    with pytest.raises(RecipeError, match="ref_model_name_or_path .*hidden_size=32"):
        dpo.main(["--config", str(recipe), "--ref_model_name_or_path", str(other)])
    assert not (tmp_path / "out" / "model.safetensors").exists()


DDP_SCRIPT = """
import shutil, sys
from pathlib import Path
from accelerate import PartialState
from minimind_hf.stages import dpo, lora

for recipe, names in [(lora, ["adapter_model.safetensors", "adapter_config.json"]), (dpo, ["model.safetensors"])]:
    stem = recipe.__name__.rsplit(".", 1)[-1]
    for run in "ab":
        recipe.main(["--config", {tmp!r} + f"/{{stem}}-{{run}}.yaml"])
    out = Path({tmp!r}, f"{{stem}}-b")
    if PartialState().is_main_process:
        shutil.rmtree(out / "checkpoint-4")
        for name in [*names, "model_complete.json"]:
            (out / name).unlink()
    PartialState().wait_for_everyone()
    recipe.main(["--config", {tmp!r} + f"/{{stem}}-b.yaml", "--resume_from_checkpoint", "true"])
"""


@pytest.mark.slow
def test_lora_and_dpo_under_torchrun_resume_exactly(tmp_path):
    """Both recipes with 2 processes (gloo on CPU): an interrupted and resumed run ends where a straight one does."""
    write_sft_data(tmp_path / "sft.jsonl")
    policy = save_hf_dir(tiny_model(), tmp_path / "policy")
    for run in "ab":
        keys = {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 2, "model_name_or_path": str(policy)}
        write_tiny_recipe(tmp_path, f"lora-{run}.yaml", **keys, output_dir=str(tmp_path / f"lora-{run}"))
        write_recipe(tmp_path, f"dpo-{run}.yaml", **keys, output_dir=str(tmp_path / f"dpo-{run}"))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(recipes=str(REPO_ROOT / "recipes"), tmp=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    straight, resumed = (load_file(tmp_path / f"lora-{run}" / "adapter_model.safetensors") for run in "ab")
    assert max_abs_diff(straight, resumed) == 0.0
    assert max_abs_diff(final_weights(tmp_path / "dpo-a"), final_weights(tmp_path / "dpo-b")) == 0.0
    assert json.loads((tmp_path / "dpo-b" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
