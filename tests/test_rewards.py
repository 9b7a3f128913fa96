"""GRPO reward functions: MiniMind's reasoning rewards against its own regular expressions, exact match, the
registry, and replies no model should send (empty, huge, undecodable, without tags)."""

import itertools
import json
import random
import re
import time
from types import SimpleNamespace

import pytest

from minimind_hf.rewards import (
    REWARD_FUNCS,
    answer_match,
    exact_match,
    reasoning_format,
    reasoning_tags,
    resolve_reward_funcs,
)
from minimind_hf.rewards import main as reward_main

# MiniMind's train_grpo.py, reasoning_model_reward: its two patterns and mark_num, as written there.
PATTERNS = (
    r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$",
    r"^<think>\n.*?\n</think>\n\n<answer>\n.*?\n</answer>$",
)


def original_format(text: str) -> float:
    return 0.5 if any(re.match(p, text, re.S) for p in PATTERNS) else 0.0


def original_tags(text: str) -> float:
    return sum(0.25 for tag in ("<think>", "</think>", "<answer>", "</answer>") if text.count(tag) == 1)


def chat(text):
    return [{"role": "assistant", "content": text}]


def test_format_and_tags_equal_the_originals_on_random_replies():
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "\n", "\n\n", "x", "7", " ", "<", ">", "think"]
    rng = random.Random(0)
    replies = ["".join(rng.choices(pieces, k=rng.randint(0, 14))) for _ in range(20000)]
    # Well-formed replies and near misses, which random draws rarely hit.
    replies += [
        "<think>\nstep\n</think>\n<answer>\n5\n</answer>",
        "<think>\nstep\n</think>\n\n<answer>\n5\n</answer>",
        "<think>\nstep\n</think>\n<answer>\n5\n</answer>\n",
        "<think>\nstep\n</think>\n<answer>\n5\n</answer>\n\n",
        "<think>\n\n</think>\n<answer>\n\n</answer>",
        "<think>\n</think>\n<answer>\n</answer>",
        " <think>\nstep\n</think>\n<answer>\n5\n</answer>",
        "<think>\na\n</think>\n<answer>\nb\n</answer><think>\nc\n</think>\n<answer>\nd\n</answer>",
    ]
    for a, b, c in itertools.product(["", "\n", "x\n"], repeat=3):
        replies.append(f"<think>\n{a}\n</think>\n{b}<answer>\n{c}\n</answer>")
    ours_format = reasoning_format(replies)
    ours_tags = reasoning_tags([chat(r) for r in replies])
    for reply, fmt, tags in zip(replies, ours_format, ours_tags, strict=True):
        assert fmt == original_format(reply), reply
        assert tags == original_tags(reply), reply
    assert sum(ours_format) >= 10, "the well-formed replies should score"


def test_full_reasoning_reply_scores_what_the_original_gives():
    reply = "<think>\n3 + 4 = 7\n</think>\n<answer>\n7\n</answer>"
    assert reasoning_format([reply]) == [0.5]
    assert reasoning_tags([reply]) == [1.0]
    assert reasoning_format(["7"]) == [0.0] and reasoning_tags(["7"]) == [0.0]
    assert reasoning_tags(["<think><think></think>"]) == [0.25]


def test_exact_match_strips_and_skips_rows_without_an_answer():
    completions = [chat(" 7\n"), chat("7."), chat("偶数"), chat("anything")]
    assert exact_match(completions, answer=["7", "7", "偶数 ", None]) == [1.0, 0.0, 1.0, None]
    assert exact_match(["7"]) == [None]
    assert exact_match(["", " \n", "x"], answer=["", "", ""]) == [1.0, 1.0, 0.0]


HOSTILE = [
    "",
    "   \n\t ",
    "\ud800",  # a lone surrogate
    "abc\udfff<think>",
    b"\xff\xfe<think>\n\xc3\n</think>\n<answer>\n7\n</answer>",  # undecodable bytes
    "\ufffd\ufffd",
    "no tags at all, just a sentence.",
    "<|im_end|><|im_start|>assistant\n",
    None,
    [],
    [{"role": "assistant"}],
]


@pytest.mark.parametrize("reply", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_replies_get_a_score_not_an_exception(reply):
    for func in (reasoning_format, reasoning_tags):
        (score,) = func([reply])
        assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert exact_match([reply], answer=["7"]) == [0.0]


def test_undecodable_bytes_are_read_leniently():
    reply = b"<think>\n\xff\n</think>\n<answer>\n7\n</answer>"
    assert reasoning_format([reply]) == [0.5] and reasoning_tags([reply]) == [1.0]


def test_huge_replies_are_scored_in_linear_time():
    block = "<think>\nx\n</think>\n<answer>\n"
    huge = [
        "<think>\n" + block * 200_000 + "no end",  # the original pattern backtracks over every separator
        "x" * 5_000_000,
        "<think>\n" + "\n" * 3_000_000 + "</think>\n<answer>\n7\n</answer>",
    ]
    start = time.perf_counter()
    assert reasoning_format(huge) == [0.0, 0.0, 0.5]
    assert reasoning_tags(huge) == [0.0, 0.0, 1.0]
    assert exact_match(huge, answer=["7"] * 3) == [0.0, 0.0, 0.0]
    assert time.perf_counter() - start < 5


def test_registry_and_import_paths():
    args = SimpleNamespace(max_completion_length=100)
    funcs = resolve_reward_funcs(["exact_match", "reasoning_format", "reasoning_tags"], args)
    assert funcs == [exact_match, reasoning_format, reasoning_tags]
    assert resolve_reward_funcs(["minimind_hf.rewards.reasoning_tags"], args) == [reasoning_tags]
    (think,) = resolve_reward_funcs(["think_format_reward"], args)
    assert think([chat("<think>\nx\n</think>\n7")]) == [1.0]
    (overlong,) = resolve_reward_funcs(["soft_overlong_punishment"], args)
    assert overlong([[1] * 80, [1] * 90, [1] * 101]) == [0.0, -0.5, -1.0]
    (repetition,) = resolve_reward_funcs(["repetition_penalty"], args)
    assert repetition([[1, 2, 3, 4], [5] * 6]) == [0.0, -0.75]
    assert set(REWARD_FUNCS) >= {"exact_match", "reasoning_format", "reasoning_tags", "think_format_reward"}


@pytest.mark.parametrize(
    "name, message",
    [
        ("exact_matc", "unknown reward 'exact_matc'"),
        ("minimind_hf.rewards.nothing_here", "cannot be imported"),
        ("no_such_package.reward", "cannot be imported"),
        ("minimind_hf.rewards.REASONING_TAGS", "is not callable"),
    ],
)
def test_bad_reward_names_are_named(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_reward_funcs([name], SimpleNamespace(max_completion_length=8))


def test_answer_match_reads_the_answer_block():
    replies = [
        "<think>\n3 + 4 = 7\n</think>\n<answer>\n7\n</answer>",
        "<answer> 7 </answer> <answer>8</answer>",
        "<answer>\n8\n</answer>",
        "7",
        "<answer>\n7",
    ]
    assert answer_match(replies, answer=["7"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert answer_match(["<answer>7</answer>"], answer=[None]) == [None]


def test_scoring_cli_reports_means_per_task(tmp_path, capsys):
    from minimind_hf.testing import save_hf_dir, tiny_model, write_jsonl

    model_dir = save_hf_dir(tiny_model(vocab_size=2048), tmp_path / "model")
    rows = [
        {
            "conversations": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}],
            "task": "add" if i % 2 else "other",
            "answer": str(i + 1),
        }
        for i in range(4)
    ]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    out = tmp_path / "scores.json"
    report = reward_main(["--model", str(model_dir), "--data", str(data), "--max_new_tokens", "3", "--out", str(out)])
    assert set(report["mean"]) == {"add", "other", "overall"}
    assert set(report["mean"]["overall"]) == {"reasoning_format", "reasoning_tags", "answer_match"}
    assert len(report["samples"]) == 4 and json.loads(out.read_text())["mean"] == report["mean"]
    assert "overall" in capsys.readouterr().out
