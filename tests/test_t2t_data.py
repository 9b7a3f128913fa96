"""MiniMind-3's t2t rows: validation with file:line errors, its augmentations, loading, the pretraining EOS rule."""

import json
import re

import pytest

from minimind_hf import t2t
from minimind_hf.data import DataError, load_pretrain_tokenized, load_sft_tokenized, scan
from minimind_hf.tokenizer import load_tokenizer

USER = {"role": "user", "content": "Weather in Oslo?"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": json.dumps([{"name": "get_weather", "arguments": {}}])}
TOOL_ROW = [
    {"role": "system", "content": "s", "tools": json.dumps(TOOLS)},
    USER,
    CALL,
    {"role": "tool", "content": "-3"},
    {"role": "tool", "content": "-4"},
    {"role": "assistant", "content": "Cold."},
]


def _write(path, rows):
    path.write_text("".join(json.dumps({"conversations": r}, ensure_ascii=False) + "\n" for r in rows))
    return path


BAD = {
    "bad_tools": [{"role": "system", "content": "s", "tools": "[{"}, USER, {"role": "assistant", "content": "x"}],
    "bad_tool_calls": [USER, {"role": "assistant", "content": "", "tool_calls": '[{"arguments": {}}]'}],
    "bad_role": [USER, {"role": "assistant", "content": "x"}, {"role": "tool", "content": "r"}],
    "unknown_key": [USER, {"role": "assistant", "content": "x", "thinking": "t"}],
    "bad_reasoning": [USER, {"role": "assistant", "content": "x", "reasoning_content": 3}],
    "tool_after_user": [USER, CALL, {"role": "user", "content": "again"}, {"role": "tool", "content": "r"}],
}
DETAILS = {
    "bad_tools": "message 0 tools is not valid JSON",
    "bad_tool_calls": "message 1 tool call 0 has no name",
    "bad_role": "message 2 is a tool reply with no assistant tool call before it",
    "unknown_key": "message 1 has unknown key 'thinking'",
    "bad_reasoning": "message 1 reasoning_content is of type int, not a string",
    "tool_after_user": "message 3 is a tool reply with no assistant tool call before it",
}


@pytest.mark.parametrize("problem", sorted(BAD))
def test_bad_t2t_rows_name_file_line_and_problem(tmp_path, problem):
    path = _write(tmp_path / "t2t.jsonl", [TOOL_ROW, BAD[problem]])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {re.escape(DETAILS[problem])}") as error:
        scan(path, "sft")
    assert error.value.problem == ("bad_role" if problem == "tool_after_user" else problem)
    assert "\n" not in str(error.value)


def test_tool_row_is_normalised():
    messages = t2t.validate_messages(TOOL_ROW)
    assert messages[0]["tools"] == TOOLS
    assert messages[2]["tool_calls"] == [{"name": "get_weather", "arguments": {}}]
    wrapped = [USER, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]
    assert t2t.validate_messages(wrapped)[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "f", "arguments": {}}],
    }
    with pytest.raises(t2t.Invalid, match="arguments is not a JSON object"):
        call = {"name": "f", "arguments": "1"}
        t2t.validate_messages([USER, {"role": "assistant", "content": "", "tool_calls": [call]}])


def test_augmentation_shares_follow_the_ratios_and_the_seed():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = "<|im_start|>assistant\n" + t2t.EMPTY_THINK + "yo<|im_end|>\n"

    def shares(seed: int, system_ratio: float, think_ratio: float):
        added, kept, rows = 0, 0, []
        for line in range(10_000):
            system_draw, choice, think_draw = t2t.row_draws(seed, 0, line)
            out = t2t.add_system_prompt(messages, system_ratio, system_draw, choice)
            added += out is not messages
            kept += t2t.drop_empty_think(text, think_ratio, think_draw) == text
            rows.append((out[0]["content"], kept))
        return added / 10_000, kept / 10_000, rows

    for system_ratio, think_ratio in [(0.2, 0.2), (0.5, 0.9), (0.0, 1.0)]:
        added, kept, _ = shares(7, system_ratio, think_ratio)
        assert abs(added - system_ratio) < 0.02 and abs(kept - think_ratio) < 0.02
    assert shares(7, 0.2, 0.2)[2] == shares(7, 0.2, 0.2)[2]
    assert shares(7, 0.2, 0.2)[2] != shares(8, 0.2, 0.2)[2]
    # All ten prompts are drawn; rows with tools never get one.
    assert {row[0] for row in shares(7, 1.0, 0.2)[2]} == set(t2t.SYSTEM_PROMPTS)
    with_tools = [{"role": "system", "content": "", "tools": TOOLS}, *messages]
    assert t2t.add_system_prompt(with_tools, 1.0, 0.0, 0.0) is with_tools


@pytest.fixture(scope="module")
def m3_tokenizer(shared_fixtures):
    return load_tokenizer(shared_fixtures / "minimind3_reference" / "tokenizer")


def test_load_sft_tokenized_matches_the_original_and_augments_by_seed(
    tmp_path, shared_fixtures, m3_tokenizer, datasets_cache
):
    reference = shared_fixtures / "minimind3_reference"
    convs = [json.loads(line)["conversations"] for line in (reference / "t2t_convs.jsonl").open()]
    path = _write(tmp_path / "t2t.jsonl", convs)
    expected = [json.loads(line) for line in (reference / "t2t_masks.jsonl").open()]
    dataset = load_sft_tokenized(path, m3_tokenizer, 340, num_proc=1)
    for row, want in zip(dataset, expected, strict=True):
        n = len(row["input_ids"])
        assert row["input_ids"] == want["input_ids"][:n] and row["labels"] == want["labels"][:n]

    # Every row loses its empty think blocks at ratio 0, and gets a system prompt at ratio 1 unless it has one.
    augmented = load_sft_tokenized(path, m3_tokenizer, 340, num_proc=1, add_system_ratio=1.0, empty_think_ratio=0.0)
    texts = [m3_tokenizer.decode(row["input_ids"]) for row in augmented]
    assert all(t2t.EMPTY_THINK not in text for text in texts)
    assert texts[0].startswith("<|im_start|>system\n") and texts[4].startswith("<|im_start|>system\nYou can use")
    assert "<think>\n9 = 3 x 3" in texts[2]  # a think block with reasoning stays
    # The supervised part of a row without think block starts right after the header, as in the original.
    first = augmented[0]
    supervised = [t for t in first["labels"] if t != -100]
    assert m3_tokenizer.decode(supervised) == "5<|im_end|>\n"
    again = load_sft_tokenized(path, m3_tokenizer, 340, num_proc=1, add_system_ratio=1.0, empty_think_ratio=0.0)
    assert again["input_ids"] == augmented["input_ids"]


def test_augmentations_need_the_minimind3_template(tmp_path, project_tokenizer_dir, datasets_cache):
    path = _write(tmp_path / "sft.jsonl", [[USER, {"role": "assistant", "content": "x"}]])
    with pytest.raises(ValueError, match="MiniMind-3's augmentations"):
        load_sft_tokenized(path, load_tokenizer(project_tokenizer_dir), 64, add_system_ratio=0.2)


def test_minimind3_pretraining_keeps_eos_when_a_text_is_cut(tmp_path, m3_tokenizer, datasets_cache):
    path = tmp_path / "pretrain.jsonl"
    path.write_text(json.dumps({"text": "one two three four five six seven eight nine ten"}) + "\n")
    full = m3_tokenizer("one two three four five six seven eight nine ten", add_special_tokens=False)["input_ids"]
    bos, eos = m3_tokenizer.bos_token_id, m3_tokenizer.eos_token_id
    cut = load_pretrain_tokenized(path, m3_tokenizer, 6, keep_eos_when_cut=True, num_proc=1)[0]["input_ids"]
    assert cut == [bos, *full[:4], eos]
    minimind2_rule = load_pretrain_tokenized(path, m3_tokenizer, 6, num_proc=1)[0]["input_ids"]
    assert minimind2_rule == [bos, *full[:5]]
    whole = load_pretrain_tokenized(path, m3_tokenizer, 100, keep_eos_when_cut=True, num_proc=1)[0]["input_ids"]
    assert whole == [bos, *full, eos]
