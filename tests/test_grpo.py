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


# --- MiniMind-3: CISPO by default, the original's per-sequence averaging, thinking_ratio, both reward-model kinds


def minimind3_recipe(shared_fixtures, tmp_path: Path, use_moe: bool = True, **overrides) -> Path:
    from minimind_hf.testing import save_minimind3_dir, tiny_minimind3_model

    tokenizer_dir = shared_fixtures / "minimind3_reference" / "tokenizer"
    model = save_minimind3_dir(tiny_minimind3_model(use_moe=use_moe), tmp_path / "policy", tokenizer_dir)
    return write_recipe(
        tmp_path,
        tokenizer_name_or_path=str(tokenizer_dir),
        model_name_or_path=str(model),
        config_overrides="",
        max_prompt_length=128,
        max_completion_length=8,
        reward_funcs=["minimind3_reward", "exact_match"],
        **overrides,
    )


def recorder(seen: list):
    """`before_train`: record each loss with the policy's own per-token log-probs (temperature-scaled, as TRL
    scores them) and, for a MoE policy, its balance loss on the same forward."""

    def record(trainer):
        compute_loss = trainer.compute_loss

        def recording(model, inputs, *args, **kwargs):
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            n = inputs["completion_ids"].size(1)
            with torch.no_grad():
                outputs = model(input_ids=ids, attention_mask=attention)
                logits = outputs.logits[:, -n - 1 : -1] / trainer.temperature
                logps = logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
            loss = compute_loss(model, inputs, *args, **kwargs)
            seen.append((loss.detach(), logps, outputs.aux_loss, inputs))
            return loss

        trainer.compute_loss = recording

    return record


@pytest.mark.parametrize("loss_type", ["cispo", "grpo"])
def test_minimind3_loss_is_the_originals_per_sequence_formula(shared_fixtures, tmp_path, loss_type):
    """Spec section 8: per-token grpo/cispo with the k3 KL, averaged over each sequence's completion tokens, then
    over sequences, plus the MoE balance loss; MiniMind-3's defaults where the recipe is silent."""
    overrides = {} if loss_type == "cispo" else {"loss_type": "grpo"}
    recipe = minimind3_recipe(shared_fixtures, tmp_path, max_steps=2, save_steps=2, learning_rate=0.05, **overrides)
    seen = []
    trainer = grpo.main(["--config", str(recipe)], before_train=recorder(seen))
    assert trainer.args.loss_type == loss_type and trainer.args.beta == 0.1
    assert trainer.epsilon_high == (5.0 if loss_type == "cispo" else 0.2)
    assert len(seen) == 2
    for loss, logps, aux, inputs in seen:
        mask = inputs["completion_mask"].float()
        ref, advantages = inputs["ref_per_token_logps"], inputs["advantages"].unsqueeze(1)
        old = inputs.get("old_per_token_logps")
        old = logps if old is None else old
        ratio = torch.exp(logps - old)
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        if loss_type == "cispo":
            per_token = -(torch.clamp(ratio, max=5.0) * advantages * logps - 0.1 * kl)
        else:
            per_token = -(torch.min(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages) - 0.1 * kl)
        expected = ((per_token * mask).sum(1) / mask.sum(1)).mean() + aux
        assert aux > 0
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert "aux_loss" in logged[0] and "rewards/minimind3_reward/mean" in logged[0]


def test_thinking_ratio_renders_open_thinking_per_row_with_the_seed(shared_fixtures, tmp_path):
    tokenizer = load_tokenizer(shared_fixtures / "minimind3_reference" / "tokenizer")
    path = write_jsonl(tmp_path / "grpo.jsonl", eval_rows(40))
    dataset = load_grpo_dataset(path, tokenizer, max_prompt_length=None)
    rendered = grpo.render_prompts(dataset, tokenizer, 0.5, seed=42)
    again = grpo.render_prompts(dataset, tokenizer, 0.5, seed=42)
    assert rendered["open_thinking"] == again["open_thinking"] and 5 < sum(rendered["open_thinking"]) < 35
    for row in rendered:
        closed = row["prompt"].endswith("<think>\n\n</think>\n\n")
        assert row["prompt"].endswith("assistant\n<think>\n") != closed and closed != row["open_thinking"]
        assert row["prompt_messages"][-1]["role"] == "user"
    assert all(grpo.render_prompts(dataset, tokenizer, 1.0, seed=0)["open_thinking"])


def test_minimind3_reward_follows_the_originals_numbers():
    from minimind_hf.rewards import minimind3_reward, word_repetition_penalty

    thinking = "Let me add the two numbers."  # 27 characters
    answer = "The sum of three and four is seven."
    assert minimind3_reward([answer]) == [0.5]  # 20-800 characters, no thinking, no repeats
    assert minimind3_reward(["short"]) == [-0.5]
    assert minimind3_reward([f"{thinking}</think>{answer}"]) == [0.5 + 1.0 + 0.25]
    assert minimind3_reward([f"hmm</think>{answer}"]) == [0.5 - 0.5 + 0.25]
    assert minimind3_reward([f"{thinking}</think>{answer}</think>"]) == [0.5 + 1.0 - 0.25]
    assert word_repetition_penalty("a b c a b c") == pytest.approx(min(0.5, 1 * 0.5 * 2 / 4))
    assert word_repetition_penalty("go " * 50) == 0.5
    repeated = "the cat sat " * 4
    assert minimind3_reward([repeated]) == [pytest.approx(0.5 - word_repetition_penalty(repeated))]


REMOTE_CODE = """
import torch
from transformers import PretrainedConfig, PreTrainedModel


class TinyRewardConfig(PretrainedConfig):
    model_type = "tiny_reward"


class TinyRewardModel(PreTrainedModel):
    config_class = TinyRewardConfig

    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.post_init()

    def get_score(self, tokenizer, messages):
        # Deterministic and readable: the answer's length in characters, scaled.
        return float(self.scale) * len(messages[-1]["content"])
"""


def tiny_remote_code_reward_model(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "tiny_reward.py").write_text(REMOTE_CODE)
    config = {
        "model_type": "tiny_reward",
        "architectures": ["TinyRewardModel"],
        "auto_map": {"AutoConfig": "tiny_reward.TinyRewardConfig", "AutoModel": "tiny_reward.TinyRewardModel"},
    }
    (directory / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"scale": torch.tensor(1.0)}, str(directory / "model.safetensors"))
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(directory)
    return directory


def test_reward_models_of_both_kinds_score_the_answer_clipped(tmp_path):
    from minimind_hf.rewards import RewardModelScore

    prompts = [[{"role": "user", "content": "Hi"}]] * 3
    completions = ["thinking here</think>ok", "a" * 10, "b" * 100]
    remote = RewardModelScore(str(tiny_remote_code_reward_model(tmp_path / "remote_rm")), clip=3.0)
    assert remote(prompts, completions) == [2.0, 3.0, 3.0]  # len("ok") = 2; 10 and 100 clipped to 3
    assert RewardModelScore(str(tmp_path / "remote_rm"), clip=None)(prompts, completions) == [2.0, 10.0, 100.0]
    classifier = RewardModelScore(str(tiny_reward_model(tmp_path / "rm")), clip=0.01)
    scores = classifier(prompts, completions)
    assert all(abs(score) <= 0.01 for score in scores) and classifier.__name__ == "rm"
    # The same answer after different thinking gets the same score: only the answer is scored.
    alone = classifier(prompts[:1], ["same"])[0]
    assert classifier(prompts[:2], ["x</think>same", "y y y</think>same"]) == [alone, alone]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"thinking_ratio": 1.5}, "thinking_ratio must be between 0 and 1"),
        ({"grpo_loss_averaging": "batch"}, "grpo_loss_averaging must be sequence, trl or null"),
        ({"loss_type": "dapo", "grpo_loss_averaging": "sequence"}, "applies to loss_type grpo and cispo, not dapo"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile: 0.5 is not implemented"),
        ({"reward_model_clip": 0}, "reward_model_clip must be > 0"),
    ],
)
def test_bad_new_keys_are_one_line_errors(tmp_path, overrides, message):
    recipe = write_recipe(tmp_path, **overrides)
    with pytest.raises(RecipeError, match=message):
        grpo.main(["--config", str(recipe)])
    assert not (tmp_path / "out").exists()


def test_thinking_ratio_needs_minimind3s_template(tmp_path):
    recipe = write_recipe(tmp_path, thinking_ratio=0.5)
    with pytest.raises(RecipeError, match="thinking_ratio needs a chat template with open_thinking"):
        grpo.main(["--config", str(recipe)])


def test_dense_minimind3_with_the_config_sft_saves_trains(shared_fixtures, tmp_path):
    """TRL's SFTTrainer saves `output_router_logits` into every config, dense ones too; TRL's GRPOTrainer then runs
    Mixtral's balance loss on a dense model's empty router logits and fails. The stage leaves that loss to itself."""
    recipe = minimind3_recipe(shared_fixtures, tmp_path, use_moe=False, max_steps=1, save_steps=1)
    config = tmp_path / "policy" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "output_router_logits": True}))
    trainer = grpo.main(["--config", str(recipe)])
    assert trainer.state.global_step == 1 and trainer.args.router_aux_loss_coef == 0.0
