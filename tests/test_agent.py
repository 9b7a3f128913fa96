"""The agent RL stage on a tiny MiniMind-3 model with the original's tokenizer: rows in the original's format and
their refusals, the prompt as the original renders it, a rollout that calls tools (TRL's), the original's loss
over the model's own tokens only, tool-use evaluation, DDP and exact resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from minimind_hf.agent_tools import BUILTIN_TOOLS, TOOLS
from minimind_hf.errors import DataError, RecipeError
from minimind_hf.evaluate import evaluate_agent, is_agent_file, load_agent_rows
from minimind_hf.stages import agent
from minimind_hf.testing import (
    REPO_ROOT,
    TINY_RECIPE,
    StepCounter,
    agent_rows,
    final_weights,
    max_abs_diff,
    save_minimind3_dir,
    tiny_minimind3_model,
    write_jsonl,
)
from minimind_hf.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("datasets_cache")


@pytest.fixture(scope="module")
def tokenizer_dir(shared_fixtures) -> Path:
    return shared_fixtures / "minimind3_reference" / "tokenizer"


def math_row() -> dict:
    schemas = json.dumps([TOOLS["calculate_math"].schema])
    system = {"role": "system", "content": "Use the tools.", "tools": schemas}
    user = {"role": "user", "content": "What is 12 * 7?"}
    return {"conversations": [system, user, {"role": "assistant", "content": ""}], "gt": ["84"]}


def math_trajectory() -> list[dict]:
    """The row answered as a tool-calling model should: call, read the result, answer."""
    system, user, _ = math_row()["conversations"]
    call = {"name": "calculate_math", "arguments": {"expression": "12*7"}}
    return [
        {"role": "system", "content": system["content"]},
        user,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"result": "84"}'},
        {"role": "assistant", "content": "The answer is 84."},
    ]


@pytest.fixture(scope="module")
def tool_caller(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny MiniMind-3 model that learned the math trajectory by heart (one thread, ~10 s), saved."""
    tokenizer = load_tokenizer(tokenizer_dir)
    text = tokenizer.apply_chat_template(math_trajectory(), tools=[TOOLS["calculate_math"].schema], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    model = tiny_minimind3_model(hidden_size=64, intermediate_size=128)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(150):
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return save_minimind3_dir(model.eval(), tmp_path_factory.mktemp("caller") / "model", tokenizer_dir)


def write_recipe(tmp_path: Path, tokenizer_dir: Path, model_dir: Path | None = None, rows=None, **overrides) -> Path:
    if model_dir is None:
        model_dir = save_minimind3_dir(tiny_minimind3_model(), tmp_path / "policy", tokenizer_dir)
    data = write_jsonl(tmp_path / "agent.jsonl", agent_rows(8) if rows is None else rows)
    recipe = {
        **{k: v for k, v in TINY_RECIPE.items() if k != "max_length"},
        "tokenizer_name_or_path": str(tokenizer_dir),
        "model_name_or_path": str(model_dir),
        "config_overrides": "",
        "data_path": str(data),
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 24,
        "temperature": 1.0,
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def with_conversation(**changes) -> dict:
    row = agent_rows(1)[0]
    return {**row, **changes}


@pytest.mark.parametrize(
    "row, message",
    [
        (with_conversation(conversations=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]),
         "the first message must be a system message with tools"),
        ({k: v for k, v in agent_rows(1)[0].items() if k != "gt"}, 'no "gt" field'),
        (with_conversation(gt="84"), '"gt" is not a list'),
        (with_conversation(gt=[True]), '"gt" is not a list'),
        (with_conversation(conversations=[{"role": "system", "content": "", "tools": json.dumps(
            [{"type": "function", "function": {"name": "launch_rockets", "parameters": {}}}])},
            {"role": "user", "content": "go"}]), "tool 'launch_rockets' is not among the recipe's"),
        (with_conversation(conversations=[{"role": "system", "content": "", "tools": "[{not json"},
                                          {"role": "user", "content": "go"}]), "message 0 tools is not"),
    ],
)  # fmt: skip
def test_bad_rows_are_refused_with_file_and_line_before_any_work(tmp_path, tokenizer_dir, row, message):
    recipe = write_recipe(tmp_path, tokenizer_dir, rows=[*agent_rows(2), row])
    with pytest.raises(DataError) as error:
        agent.main(["--config", str(recipe)])
    assert str(error.value).startswith(f"{tmp_path / 'agent.jsonl'}:3: ") and message in str(error.value)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tools": ["nope"]}, "tools: unknown tool 'nope'"),
        ({"max_turns": 0}, "max_turns must be >= 1"),
        ({"max_tool_calling_iterations": 5}, "contradicts max_turns 3"),
        ({"reward_funcs": ["nope"]}, "reward_funcs: unknown reward 'nope'"),
    ],
)
def test_bad_recipes_fail_before_any_work(tmp_path, tokenizer_dir, overrides, message):
    recipe = write_recipe(tmp_path, tokenizer_dir, **overrides)
    with pytest.raises(RecipeError, match=message):
        agent.main(["--config", str(recipe)])
    assert not (tmp_path / "out").exists()


def test_prompt_shows_the_rows_own_schemas_and_thinking_draw(tmp_path, tokenizer_dir):
    """The training template prints the row's schemas exactly as the original renders them (`tools=` the row's),
    whatever TRL passes as `tools`, and opens the think block when the row drew `open_thinking`."""
    tokenizer = load_tokenizer(tokenizer_dir)
    row = agent_rows(1)[0]
    schemas = json.loads(row["conversations"][0]["tools"])
    original = tokenizer.apply_chat_template(row["conversations"][:-1], tools=schemas, tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    dataset = agent.load_records(write_jsonl(tmp_path / "a.jsonl", [row]), "agent")
    template = agent.agent_chat_template(tokenizer.chat_template)
    trl_tools = [tool.callable_for_trl() for tool in TOOLS.values()]
    prompt = [{k: v for k, v in m.items() if v is not None} for m in dataset[0]["prompt"]]
    rendered = tokenizer.apply_chat_template(prompt, tools=trl_tools, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    assert rendered == original and rendered.endswith("<think>\n\n</think>\n\n")
    prompt[0]["open_thinking"] = True
    opened = tokenizer.apply_chat_template(prompt, tools=trl_tools, chat_template=template, tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    assert opened.endswith("assistant\n<think>\n")
    drawn = agent.draw_open_thinking(agent.load_records(write_jsonl(tmp_path / "b.jsonl", agent_rows(40)), "agent"),
                                     0.1, seed=42)  # fmt: skip
    assert 0 < sum(row["prompt"][0]["open_thinking"] for row in drawn) < 12


@pytest.mark.slow
def test_trains_on_tool_calling_trajectories_with_tool_replies_masked(tmp_path, tokenizer_dir, tool_caller):
    """The rollout is TRL's: the model's call runs, its result comes back, the model answers; the loss is the
    original's per-sequence cispo over the model's own tokens (tool replies and their template tokens masked)."""
    settings = {"max_completion_length": 96, "thinking_ratio": 0.0, "temperature": 0.3, "max_steps": 2}
    recipe = write_recipe(tmp_path, tokenizer_dir, tool_caller, rows=[math_row()] * 4, hidden_size=64, **settings)
    seen = []

    def record(trainer):
        compute_loss = trainer.compute_loss

        def recording(model, inputs, *args, **kwargs):
            loss = compute_loss(model, inputs, *args, **kwargs)
            seen.append((loss.detach(), inputs))
            return loss

        trainer.compute_loss = recording

    trainer = agent.main(["--config", str(recipe)], before_train=record)
    assert trainer.args.loss_type == "cispo" and trainer.args.beta == 0.1 and trainer.epsilon_high == 5.0
    assert trainer.max_tool_calling_iterations == 2
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert logged[0]["tools/call_frequency"] > 0, "the model's calls were run"
    assert max(entry["rewards/agent_reward/mean"] for entry in logged) > 2.0, "solved trajectories score high"
    tokenizer = trainer.processing_class
    for _, inputs in seen:
        masked = inputs["completion_mask"] * inputs["tool_mask"]
        assert (inputs["tool_mask"] == 0).any(), "tool replies are in the trajectories, masked"
        for ids, tool_mask in zip(inputs["completion_ids"], inputs["tool_mask"], strict=True):
            replies = tokenizer.decode(ids[tool_mask == 0])
            if replies:
                assert "<tool_response>" in replies and '"result": "84"' in replies
                assert "<tool_response>" not in tokenizer.decode(ids[tool_mask == 1])
        assert masked.sum() < inputs["completion_mask"].sum()
    # The final model is saved with the tokenizer's own template (the training copy stays with the trainer).
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()).get("chat_template")
    assert saved is None or "messages[0].tools" not in saved
    assert "messages[0].tools" not in load_tokenizer(tmp_path / "out").chat_template, "it loads as a known template"


def test_evaluation_counts_a_solved_row(tmp_path, tool_caller):
    from minimind_hf.loading import load_model

    path = write_jsonl(tmp_path / "agent_eval.jsonl", [math_row(), agent_rows(2)[1]])
    assert is_agent_file(path)
    model = load_model(str(tool_caller)).eval()
    tokenizer = load_tokenizer(tool_caller)
    rows = load_agent_rows(path)
    results = evaluate_agent(model, tokenizer, rows[:1], max_turns=3, max_new_tokens=40)
    assert results["solved"] == 1 and results["unfinished_share"] == 0.0
    assert results["valid_call_share"] == 0.5, "two replies: the call, then the answer"
    assert results["tools"]["calculate_math"] == {"rows": 1, "solved": 1, "calls": 1, "valid_calls": 1, "errors": 0,
                                                  "solved_rate": 1.0}  # fmt: skip
    assert results["samples"][0]["turns"][-1].strip().endswith("The answer is 84.")


def test_evaluation_refuses_bad_agent_rows(tmp_path):
    tools = json.dumps([{"type": "function", "function": {"name": "launch_rockets"}}])
    system = {"role": "system", "content": "", "tools": tools}
    bad = with_conversation(conversations=[system, {"role": "user", "content": "go"}])
    path = write_jsonl(tmp_path / "agent_eval.jsonl", [math_row(), bad])
    with pytest.raises(DataError, match=r"agent_eval.jsonl:2: .*launch_rockets"):
        load_agent_rows(path)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, tokenizer_dir):
    recipe = write_recipe(tmp_path, tokenizer_dir, max_steps=2, save_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    script = str(REPO_ROOT / "recipes" / "agent.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, "--config", str(recipe)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert [("rewards/agent_reward/mean" in entry) for entry in state["log_history"] if "reward" in entry] == [True] * 2


@pytest.mark.slow
def test_resume_after_an_interruption_is_exact(tmp_path, tokenizer_dir):
    """Four steps straight, against two steps, checkpoint-4 lost, and a resume: the same weights, bit for bit
    (sampling, tool runs and rewards replay from the checkpoint's RNG state)."""
    policy = save_minimind3_dir(tiny_minimind3_model(), tmp_path / "policy", tokenizer_dir)
    common = {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-2}
    straight = write_recipe(tmp_path, tokenizer_dir, policy, output_dir=str(tmp_path / "straight"), **common)
    agent.main(["--config", str(straight)])
    interrupted = write_recipe(tmp_path, tokenizer_dir, policy, output_dir=str(tmp_path / "interrupted"), **common)
    agent.main(["--config", str(interrupted)])
    out = tmp_path / "interrupted"
    shutil.rmtree(out / "checkpoint-4")
    for lost in ["model.safetensors", "config.json"]:
        (out / lost).unlink()
    counter = StepCounter()
    agent.main(["--config", str(interrupted), "--resume_from_checkpoint", "true"], callbacks=[counter])
    assert counter.steps == 2, "resumed after step 2"
    assert max_abs_diff(final_weights(tmp_path / "straight"), final_weights(policy)) > 0, "the steps trained"
    diff = max_abs_diff(final_weights(tmp_path / "straight"), final_weights(out))
    assert diff == 0.0


def test_shipped_recipe_parses_with_the_originals_defaults():
    from minimind_hf.training import parse_recipe

    stage = agent.AGENT
    config = ["--config", str(REPO_ROOT / "recipes" / "agent.yaml")]
    args, training_args = parse_recipe((stage.arguments_class, stage.config_class), config, stage.defaults)
    assert (args.max_turns, args.thinking_ratio, args.reward_funcs) == (3, 0.1, ["agent_reward"])
    assert training_args.num_generations == 4 and training_args.loss_type == "cispo"
    assert (training_args.beta, training_args.epsilon, training_args.epsilon_high) == (0.1, 0.2, 5.0)
    assert args.tools == list(BUILTIN_TOOLS) and training_args.learning_rate == 3e-7
    # The stage's own defaults are the original's too, for a recipe that names none of them.
    bare = ["--output_dir", "x"]
    args, training_args = parse_recipe((stage.arguments_class, stage.config_class), bare, stage.defaults)
    assert (args.max_turns, training_args.num_generations, training_args.loss_type, training_args.beta) == (
        3, 4, "cispo", 0.1,
    )  # fmt: skip


def test_demo_recipe_takes_every_shipped_agent_row(monkeypatch):
    """recipes/demo/agent.yaml on data/agent_rl.jsonl with the demo's tokenizer: every row passes the stage's checks
    (its tools among the recipe's, its prompt within max_prompt_length), and thinking stays closed."""
    from minimind_hf.training import parse_recipe

    stage = agent.AGENT
    config = ["--config", str(REPO_ROOT / "recipes" / "demo" / "agent.yaml")]
    config += ["--tokenizer_name_or_path", str(REPO_ROOT / "data" / "tokenizer3")]
    args, training_args = parse_recipe((stage.arguments_class, stage.config_class), config, stage.defaults)
    assert training_args.loss_type == "cispo" and args.reward_funcs == ["agent_reward"]
    tokenizer = load_tokenizer(REPO_ROOT / "data" / "tokenizer3")
    monkeypatch.chdir(REPO_ROOT)  # the recipe's paths are the repository's
    train, _ = agent.load_datasets(args, training_args, tokenizer)
    shipped = (REPO_ROOT / "data" / "agent_rl.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(train) == len(shipped) and not any(row["prompt"][0]["open_thinking"] for row in train)
