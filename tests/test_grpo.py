"""The GRPO recipe on a tiny model: both row formats and their errors, the rewards and a local reward model, the
loss against the original's formula, every model form as the start (and as the reference), DDP and resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from minimind_hf.data import DataError
from minimind_hf.errors import RecipeError
from minimind_hf.formats.pth import save_pth
from minimind_hf.stages import grpo
from minimind_hf.stages.grpo import load_grpo_dataset
from minimind_hf.testing import REPO_ROOT, TINY_RECIPE, TOKENIZER_DIR, StepCounter, tiny_model, write_jsonl
from minimind_hf.tokenizer import load_tokenizer
from minimind_hf.training import parse_recipe

pytestmark = pytest.mark.usefixtures("datasets_cache")


def eval_rows(n: int = 16) -> list[dict]:
    """Evaluation-format rows: single-digit additions with their answers."""
    rows = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10
        question = [{"role": "user", "content": f"What is {a} plus {b}?"}]
        if i % 4 == 0:
            question = [{"role": "system", "content": "Reply with just the answer."}, *question]
        answer = str(a + b)
        rows.append(
            {"conversations": [*question, {"role": "assistant", "content": answer}], "task": "add", "answer": answer}
        )
    return rows


RLAIF_ROWS = [
    {"conversations": [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": ""}]},
    {
        "conversations": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]


def write_recipe(tmp_path: Path, **overrides) -> Path:
    import yaml

    data = write_jsonl(tmp_path / "grpo.jsonl", eval_rows() + RLAIF_ROWS)
    recipe = {
        **{k: v for k, v in TINY_RECIPE.items() if k != "max_length"},
        "data_path": str(data),
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "max_prompt_length": 64,
        "temperature": 1.0,
        "logging_steps": 1,
        "reward_funcs": ["exact_match", "reasoning_tags"],
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_both_row_formats_load_as_prompts(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", eval_rows(2) + RLAIF_ROWS)
    dataset = load_grpo_dataset(path, load_tokenizer(TOKENIZER_DIR), max_prompt_length=None)
    rows = list(dataset)
    assert rows[0]["prompt"] == [
        {"role": "system", "content": "Reply with just the answer."},
        eval_rows(1)[0]["conversations"][1],
    ]
    assert (rows[0]["answer"], rows[0]["solution"], rows[0]["task"], rows[0]["reference"]) == ("0", "0", "add", "0")
    assert rows[2]["prompt"] == RLAIF_ROWS[0]["conversations"][:1] and rows[2]["answer"] is None
    assert rows[2]["reference"] == ""
    assert rows[3]["prompt"] == RLAIF_ROWS[1]["conversations"][:3] and rows[3]["reference"] == "4"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"conversations": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        (
            {"conversations": [*RLAIF_ROWS[1]["conversations"], {"role": "user", "content": "and?"}]},
            "the last message must be the assistant's",
        ),
        ({**eval_rows(1)[0], "answer": 7}, '"answer" is a int, not a string'),
        ({**eval_rows(1)[0], "task": None}, '"task" is a NoneType, not a string'),
        (
            {"conversations": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": ""}]},
            "over max_prompt_length=64",
        ),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [*eval_rows(2), row])
    with pytest.raises(DataError, match=f"rows.jsonl:3: .*{message}"):
        load_grpo_dataset(path, load_tokenizer(TOKENIZER_DIR), max_prompt_length=64)
    skipped = load_grpo_dataset(path, load_tokenizer(TOKENIZER_DIR), max_prompt_length=64, skip_invalid=True)
    assert len(skipped) == 2 and sum(skipped.load_report.skipped.values()) == 1


def tiny_reward_model(directory: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=0,
    )
    LlamaForSequenceClassification(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(directory)
    return directory


def test_rewards_and_a_local_reward_model_are_logged(tmp_path):
    reward_model = tiny_reward_model(tmp_path / "rm")
    recipe = write_recipe(tmp_path, reward_model_name_or_path=str(reward_model), max_steps=2, save_steps=2)
    trainer = grpo.main(["--config", str(recipe)])
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logs) == 2
    for entry in logs:
        model_score = entry["rewards/rm/mean"]
        assert model_score != 0.0 and abs(model_score) < 100
        assert 0.0 <= entry["rewards/exact_match/mean"] <= 1.0
        assert entry["rewards/reasoning_tags/mean"] == 0.0
        total = model_score + entry["rewards/exact_match/mean"] + entry["rewards/reasoning_tags/mean"]
        # RLAIF rows have no answer: exact match skips them, so the total is not the plain sum of the means.
        assert entry["reward"] == pytest.approx(total, abs=1.0)
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_loss_is_the_originals_token_mean_then_sequence_mean_with_k3_kl(tmp_path):
    """`loss_type: grpo`: MiniMind's `((per_token_loss * mask).sum(1) / mask.sum(1)).mean()` with
    `per_token_loss = -(exp(logp - logp.detach()) * A - beta * (exp(ref - logp) - (ref - logp) - 1))`."""
    recipe = write_recipe(tmp_path, max_steps=2, save_steps=2, beta=0.5, learning_rate=0.05)
    seen = []

    def record(trainer):
        compute_loss = trainer.compute_loss

        def recording(model, inputs, *args, **kwargs):
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            n = inputs["completion_ids"].size(1)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=attention).logits[:, -n - 1 : -1]
                logps = logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
            loss = compute_loss(model, inputs, *args, **kwargs)
            seen.append((loss.detach(), logps, inputs))
            return loss

        trainer.compute_loss = recording

    grpo.main(["--config", str(recipe)], before_train=record)
    assert len(seen) == 2
    for loss, logps, inputs in seen:
        mask = inputs["completion_mask"].float()
        ref, advantages = inputs["ref_per_token_logps"], inputs["advantages"].unsqueeze(1)
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        per_token = -(advantages - 0.5 * kl)
        expected = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert seen[1][2]["ref_per_token_logps"].ne(seen[1][1]).any(), "after one update the policy left the reference"


def test_any_model_form_starts_and_is_the_reference(tmp_path):
    model = tiny_model(seed=3, vocab_size=2048)
    pth = save_pth(model, tmp_path / "start.pth")
    recipe = write_recipe(
        tmp_path,
        model_name_or_path=str(pth),
        config_overrides=TINY_RECIPE["config_overrides"] + ",vocab_size=2048",
        max_steps=1,
        save_steps=1,
    )
    references = []

    def keep_reference(trainer):
        references.append({k: v.clone() for k, v in trainer.ref_model.state_dict().items()})
        references.append(trainer.ref_model.config._name_or_path)

    grpo.main(["--config", str(recipe)], before_train=keep_reference)
    weights, path = references
    expected = model.state_dict()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert not Path(path).exists(), "the temporary reference directory is removed once loaded"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"reward_funcs": ["exact_matchh"]}, "reward_funcs: unknown reward 'exact_matchh'"),
        ({"reward_funcs": ["nowhere.reward"]}, "reward_funcs: reward 'nowhere.reward' cannot be imported"),
        ({"reward_model_name_or_path": "/nonexistent/rm"}, "reward_model_name_or_path /nonexistent/rm: no such"),
        ({"reward_funcs": [], "reward_model_name_or_path": None}, "no reward"),
        ({"max_prompt_lenght": 10}, "did you mean 'max_prompt_length'"),
    ],
)
def test_bad_recipes_fail_before_any_work(tmp_path, overrides, message):
    recipe = write_recipe(tmp_path, **overrides)
    with pytest.raises(RecipeError, match=message):
        grpo.main(["--config", str(recipe)])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_two_processes_then_resume(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=2, save_steps=1, per_device_train_batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    script = str(REPO_ROOT / "recipes" / "grpo.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, "--config", str(recipe)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # Each step saw 4 completions per process: 2 prompts x 4 generations over both ranks.
    assert [entry["num_tokens"] > 0 for entry in state["log_history"] if "reward" in entry] == [True, True]

    shutil.rmtree(out / "checkpoint-2")
    counter = StepCounter()
    trainer = grpo.main(["--config", str(recipe), "--resume_from_checkpoint", "true"], callbacks=[counter])
    assert trainer.state.global_step == 2 and counter.steps == 1, "resumed after step 1, not from the start"
    assert trainer.state.log_history[0] == state["log_history"][0], "the first step's log comes from the checkpoint"


@pytest.mark.parametrize("name", ["grpo.yaml", "demo/grpo.yaml"])
def test_shipped_recipes_parse(name):
    args, training_args = parse_recipe(
        (grpo.GRPO.arguments_class, grpo.GRPO.config_class),
        ["--config", str(REPO_ROOT / "recipes" / name)],
        grpo.GRPO.defaults,
    )
    assert training_args.num_generations == 8 and training_args.beta == 0.02 and training_args.loss_type == "grpo"
    assert training_args.generation_batch_size % training_args.num_generations == 0
    assert args.reward_funcs and not training_args.activation_checkpointing
