"""Evaluation: exact-match scoring, row validation, the assistant-token loss, and the command end to end."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minimind_hf import MiniMindConfig, MiniMindForCausalLM
from minimind_hf.chat import load_model_and_tokenizer
from minimind_hf.data import IGNORE_INDEX, DataError, encode_conversation
from minimind_hf.evaluate import load_eval_rows, main, mean_loss, sample_rows, score
from minimind_hf.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
ROWS = [  # (task, question, answer)
    ("sound", "A duck goes what?", "quack"),
    ("sound", "A cat goes what?", "meow"),
    ("sound", "告诉我鸭子的叫声。", "嘎嘎"),
    ("sound", "A cow goes what?", "moo"),
    ("parity", "24: even or odd?", "even"),
    ("parity", "7: even or odd?", "odd"),
]


def conversation(question: str, answer: str, system: bool = False) -> list[dict]:
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return [{"role": "system", "content": "You are MiniMind."}, *turns] if system else turns


def write_eval(path: Path, rows=ROWS) -> Path:
    lines = []
    for i, (task, question, answer) in enumerate(rows):
        messages = conversation(question, answer, system=i % 2 == 1)
        if i == 2:  # a multi-turn row: the prompt keeps the earlier exchange
            messages = conversation("1 or 2: which is bigger?", "2") + messages
        lines.append(json.dumps({"conversations": messages, "task": task, "answer": answer}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n\n")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer_dir) -> Path:
    torch.manual_seed(0)
    # A wide initialisation, so that greedy predictions differ between rows (and batching could show).
    config = MiniMindConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2
    )
    out = tmp_path_factory.mktemp("tiny_eval")
    MiniMindForCausalLM(config).save_pretrained(out)
    load_tokenizer(tokenizer_dir).save_pretrained(out)
    return out


def test_rows_carry_their_prompt_before_the_last_assistant_message(tmp_path):
    rows = load_eval_rows(write_eval(tmp_path / "eval.jsonl"))
    assert len(rows) == len(ROWS)
    assert [m["content"] for m in rows[2]["prompt"]] == ["1 or 2: which is bigger?", "2", "告诉我鸭子的叫声。"]
    assert rows[1]["prompt"][0]["role"] == "system" and rows[1]["line"] == 2


def test_generation_prompt_is_the_trained_prefix_of_the_answer(tmp_path, tokenizer_dir):
    """The model is asked exactly as it was trained: the prompt's tokens, then the answer's supervised ones."""
    tokenizer = load_tokenizer(tokenizer_dir)
    for row in load_eval_rows(write_eval(tmp_path / "eval.jsonl")):
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=False)
        full = encode_conversation(row["conversations"], tokenizer, None)
        assert full["input_ids"][: len(prompt)] == prompt
        assert full["labels"][len(prompt)] != IGNORE_INDEX and full["labels"][len(prompt) - 1] == IGNORE_INDEX


def test_score_perfect_wrong_and_partial(tmp_path):
    rows = load_eval_rows(write_eval(tmp_path / "eval.jsonl"))
    perfect = score([f"  {row['answer']}\n" for row in rows], rows)
    assert perfect["overall"] == {"n": 6, "correct": 6, "exact_match": 1.0}
    assert perfect["tasks"] == {
        "parity": {"n": 2, "correct": 2, "exact_match": 1.0},
        "sound": {"n": 4, "correct": 4, "exact_match": 1.0},
    }
    wrong = score(["nope"] * len(rows), rows)
    assert wrong["overall"]["exact_match"] == 0.0
    assert all(task["exact_match"] == 0.0 for task in wrong["tasks"].values())
    # Right: quack, 嘎嘎, odd. A prediction that merely contains the answer is wrong.
    partial = score(["quack", "meow meow", "嘎嘎", "Moo", "even or odd", "odd"], rows)
    assert partial["tasks"]["sound"] == {"n": 4, "correct": 2, "exact_match": 0.5}
    assert partial["tasks"]["parity"] == {"n": 2, "correct": 1, "exact_match": 0.5}
    assert partial["overall"] == {"n": 6, "correct": 3, "exact_match": 0.5}
    with pytest.raises(ValueError, match="5 predictions for 6 rows"):
        score(["quack"] * 5, rows)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda row: row.pop("task"), r'bad.jsonl:3: no "task" string'),
        (lambda row: row.update(answer=7), r'bad.jsonl:3: no "answer" string'),
        (lambda row: row["conversations"].pop(), r"bad.jsonl:3: the last message is not the assistant's answer"),
        (lambda row: row["conversations"][0].update(role="bot"), r"bad.jsonl:3: message 0 has role 'bot'"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, change, message):
    lines = write_eval(tmp_path / "bad.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    change(row)
    lines[2] = json.dumps(row)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_eval_rows(tmp_path / "bad.jsonl")


def test_mean_loss_is_the_cross_entropy_per_supervised_token(tiny_dir, tmp_path):
    model, tokenizer = load_model_and_tokenizer(tiny_dir)
    conversations = [row["conversations"] for row in load_eval_rows(write_eval(tmp_path / "eval.jsonl"))]
    # 60 tokens cut the multi-turn row inside its second answer: the rows then differ in supervised tokens.
    losses = []
    for messages in conversations:
        encoded = encode_conversation(messages, tokenizer, 60)
        ids, labels = torch.tensor([encoded["input_ids"]]), torch.tensor(encoded["labels"][1:])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        losses.append(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")[labels >= 0])
    expected = torch.cat(losses).mean().item()
    for batch_size in (1, 4):
        assert mean_loss(model, tokenizer, conversations, 60, batch_size) == pytest.approx(expected, rel=1e-5)


def test_main_writes_results_and_batching_does_not_change_them(tiny_dir, tmp_path, capsys):
    data = write_eval(tmp_path / "eval.jsonl")
    argv = ["--model", str(tiny_dir), "--data", str(data), "--max_new_tokens", "6", "--samples", "3"]
    main([*argv, "--batch_size", "4", "--out", str(tmp_path / "results.json")])
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert set(results) >= {"overall", "tasks", "mean_loss", "samples"}
    assert results["overall"]["n"] == len(ROWS) and set(results["tasks"]) == {"sound", "parity"}
    assert math.isfinite(results["mean_loss"]) and results["mean_loss"] > 0
    assert [s["answer"] for s in results["samples"]] == ["quack", "meow", "嘎嘎"]
    assert {"prompt", "prediction", "task"} <= set(results["samples"][0])
    table = capsys.readouterr().out
    assert "overall" in table and "mean assistant-token loss" in table

    one_by_one = main([*argv, "--batch_size", "1", "--limit", "4"])
    assert [s["prediction"] for s in one_by_one["samples"]] == [s["prediction"] for s in results["samples"]]
    assert one_by_one["overall"]["n"] == 4


def test_main_reports_a_bad_file_and_exits(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", "--data", str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 1
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def write_sft(path: Path, n: int = 10) -> Path:
    """Plain SFT rows (no `answer`): every third without a `task`, one multi-turn."""
    lines = []
    for i in range(n):
        messages = conversation(f"What is {i} plus 1?", str(i + 1), system=i == 4)
        if i == 1:
            messages = conversation("Is 3 odd or even?", "odd") + messages
        row = {"conversations": messages} if i % 3 == 0 else {"conversations": messages, "task": "add"}
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sft_rows_are_answered_by_their_last_assistant_message(tmp_path):
    path = write_sft(tmp_path / "sft.jsonl")
    with pytest.raises(DataError, match=r'sft.jsonl:1: no "task" string'):
        load_eval_rows(path)  # without --sft an answer and a task are required
    rows = load_eval_rows(path, sft=True)
    assert [row["answer"] for row in rows] == [str(i + 1) for i in range(10)]
    assert [row["task"] for row in rows] == ["all" if i % 3 == 0 else "add" for i in range(10)]
    assert [m["content"] for m in rows[1]["prompt"]] == ["Is 3 odd or even?", "odd", "What is 1 plus 1?"]
    assert {row["task"] for row in load_eval_rows(path, sft=True, task="sum")} == {"sum"}
    assert {row["task"] for row in load_eval_rows(write_eval(tmp_path / "eval.jsonl"), task="t")} == {"t"}


def test_sample_is_seeded_without_repeats_in_file_order(tmp_path):
    rows = load_eval_rows(write_sft(tmp_path / "sft.jsonl"), sft=True)
    lines = [row["line"] for row in sample_rows(rows, 4, seed=3)]
    assert lines == [row["line"] for row in sample_rows(rows, 4, seed=3)]
    assert len(set(lines)) == 4 and lines == sorted(lines)
    assert any(lines != [row["line"] for row in sample_rows(rows, 4, seed=s)] for s in range(4, 8))
    assert sample_rows(rows, 50, seed=3) == rows


def test_score_per_held_out_kind(tmp_path):
    rows = load_eval_rows(write_eval(tmp_path / "eval.jsonl"))
    assert "held_out" not in score([""] * len(rows), rows)
    for i, row in enumerate(rows):
        row["held_out"] = "item" if i < 2 else "template"
    results = score([row["answer"] if i in (0, 3) else "no" for i, row in enumerate(rows)], rows)
    assert results["held_out"] == {
        "item": {"n": 2, "correct": 1, "exact_match": 0.5},
        "template": {"n": 4, "correct": 1, "exact_match": 0.25},
    }


def test_main_scores_a_seeded_sample_of_sft_data(tiny_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_dir), "--data", str(write_sft(tmp_path / "sft.jsonl")), "--max_new_tokens", "4"]
    results = main([*argv, "--sft", "--sample", "5", "--seed", "1", "--out", str(tmp_path / "fit.json")])
    record = json.loads((tmp_path / "fit.json").read_text())
    assert record["overall"]["n"] == 5 and (record["sample"], record["seed"]) == (5, 1)
    assert set(record["tasks"]) <= {"all", "add"} and record["overall"] == results["overall"]
    assert "overall" in capsys.readouterr().out


def test_t2t_rows_with_tools_are_prompted_with_their_tools(tmp_path):
    """MiniMind-3 rows (tools and calls as JSON strings, a tool reply): the prompt is rendered with the row's tools
    and parsed calls, as training renders it, and the loss is taken on the same text."""
    tokenizer = load_tokenizer(REPO / "data" / "tokenizer3")
    rows = [json.loads(line) for line in (REPO / "data" / "tool_sft.jsonl").read_text().splitlines()[:3]]
    path = tmp_path / "tool.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    loaded = load_eval_rows(path, sft=True)
    for row, original in zip(loaded, rows, strict=True):
        assert row["answer"] == original["conversations"][-1]["content"]
        assert [m["role"] for m in row["prompt"]] == ["system", "user", "assistant", "tool"]
        assert "tools" not in row["prompt"][0] and row["tools"][0]["type"] == "function"
        text = tokenizer.apply_chat_template(
            row["prompt"], tools=row["tools"], tokenize=False, add_generation_prompt=True
        )
        assert '"name": "calculate_math"' in text.split("<|im_start|>user")[0], "the schemas are in the system turn"
        assert '<tool_call>\n{"name": ' in text.split("<|im_start|>user")[1], "the call is rendered, parsed"
        assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
