"""MiniMind-3's agent reward (`train_agent.py`'s `calculate_rewards`) on trajectories written for the test, each
worked out by hand in its comment, hostile ones included: unbalanced tags, invalid JSON, unknown tools, empty."""

import json

import pytest

from minimind_hf.agent_tools import TOOLS
from minimind_hf.rewards import (
    REWARD_FUNCS,
    agent_repetition_penalty,
    agent_reward,
    agent_trajectory_reward,
    gt_found,
    resolve_reward_funcs,
)

ROW_TOOLS = {"calculate_math", "unit_converter"}


def valid(name: str, arguments: dict) -> bool:
    return name in ROW_TOOLS and TOOLS[name].valid_arguments(arguments)


def call(name: str, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


MATH = call("calculate_math", expression="12*7")


@pytest.mark.parametrize(
    "turns, gt, unfinished, expected",
    [
        # One valid call for one gt item: gap 0, +0.5; "84" in the answer, +2.5; no repeated 3-gram. 3.0.
        ([MATH, "The answer is 84."], ["84"], False, 3.0),
        # The same with a wrong answer: +0.5 only.
        ([MATH, "The answer is 85."], ["84"], False, 0.5),
        # Two gt items, one found: +0.5 + 2.5 * 1/2.
        (
            [MATH, call("unit_converter", value=5, from_unit="km", to_unit="miles"), "84 and 3.1"],
            ["84", "3.1069"],
            False,
            1.75,
        ),
        # Unknown tool: 0 valid, 1 invalid: gap |0 - 1| + 1 = 2, -1.0; the answer holds 84, +2.5. 1.5.
        ([call("launch_rockets"), "done: 84"], ["84"], False, 1.5),
        # A required argument missing (from_unit) is invalid; value 0 is there: gap |1 - 1| + 1 = 1, -0.5; +2.5.
        (
            [
                call("unit_converter", value=5, to_unit="miles"),
                call("unit_converter", value=0, from_unit="km", to_unit="miles"),
                "84",
            ],
            ["84"],
            False,
            2.0,
        ),
        # A tool the row does not offer is invalid even though the registry has it: like the unknown tool.
        ([call("get_current_time"), "done: 84"], ["84"], False, 1.5),
        # Unfinished after three calling turns: 3 valid for 1 gt item, gap 2, -1.0; no final answer; -0.5; the
        # repetition penalty of the last turn's text, which repeats the trigram `" : "` once in 30: 1/30.
        ([MATH, MATH, MATH], ["84"], True, -1.5 - 1 / 30),
        # The final answer is what follows the last `</tool_call>` of the last turn: "84" there counts.
        ([MATH + " so 84"], ["84"], False, 3.0),
        # Numbers match within 1e-6 with thousands commas ignored: "1,000.0000001" is 1000 (gt given as a number).
        ([MATH, "It costs 1,000.0000001 yuan"], [1000], False, 3.0),
        # Without any tool call the last turn is scored like MiniMind-3's GRPO reply (5-800 characters): +0.5;
        # 36 characters of thinking, +1.0; one `</think>`, +0.25. 1.75.
        (["I should add twelve and seven now ok</think>\n\n19"], ["19"], False, 1.75),
        # Empty replies: no call, 0 characters: -0.5 (an empty trajectory too).
        ([""], ["84"], False, -0.5),
        ([], ["84"], False, -0.5),
        # Unbalanced tags: two opened, none closed, -1.0; no call parses; 29 characters, +0.5; tokens
        # `< tool_call > < tool_call > hello` repeat one trigram of five: -0.5 * 2 * 1/5. -0.7.
        (["<tool_call> <tool_call> hello"], ["84"], False, -0.7),
        # Invalid JSON in balanced tags is no call at all (the original drops it): scored as a plain reply, +0.5.
        (['<tool_call>{"name": bad}</tool_call> 84'], ["84"], False, 0.5),
        # JSON that is not an object is an invalid call: gap |0 - 1| + 1 = 2, -1.0; +2.5 for the answer. 1.5.
        (["<tool_call>[1, 2]</tool_call>", "84"], ["84"], False, 1.5),
        # Ten unclosed tags: -5.0 + 0.5 - 0.5 (the penalty's cap) = -5.0, clipped to -3.
        (["<tool_call>" * 10], ["84"], False, -3.0),
    ],
)
def test_agent_reward_by_hand(turns, gt, unfinished, expected):
    assert agent_trajectory_reward(turns, gt, valid, unfinished) == pytest.approx(expected)


def test_repetition_penalty_counts_punctuation_and_cjk_tokens():
    # `a b a b a b`: 4 trigrams, 2 distinct: min(0.5, 2 * 0.5 * 2 / 4) = 0.5.
    assert agent_repetition_penalty("a b a b a b") == 0.5
    assert agent_repetition_penalty("one two") == 0.0
    # Lower-cased: "A B C a b c" has 4 trigrams, (a, b, c) twice: 1 * 1 / 4.
    assert agent_repetition_penalty("A B C a b c") == pytest.approx(0.25)


def test_gt_found_substring_or_number():
    assert gt_found("It is 12°C in Tokyo", ["12°C", "tokyo", "Paris"]) == {"12°C", "tokyo"}
    assert gt_found("rate 7.21", [7.21, "7.2100000001", 7.3]) == {"7.21", "7.2100000001"}
    assert gt_found("", ["", "x"]) == set()


def schemas(*names: str) -> list[str]:
    return [json.dumps(TOOLS[name].schema) for name in names]


def test_trl_trajectories_are_scored_from_their_messages():
    """TRL's completion of a tool-calling rollout: assistant turns with parsed `tool_calls`, tool replies between."""
    prompt = [{"role": "system", "content": "", "tools": schemas("calculate_math")}, {"role": "user", "content": "?"}]
    asked = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "calculate_math", "arguments": {"expression": "12*7"}}}
        ],
    }
    replied = {"role": "tool", "name": "calculate_math", "content": '{"result": "84"}'}
    done = [asked, replied, {"role": "assistant", "content": "The answer is 84."}]
    cut = [asked, replied, asked, replied, asked]  # the turn limit: the last turn's call is never answered
    thinking = [{"role": "assistant", "reasoning_content": "I should add twelve and seven now ok", "content": "19"}]
    rewards = agent_reward([done, cut, thinking, done], gt=[["84"], ["84"], ["19"], None], prompts=[prompt] * 4)
    # done: 3.0 (above); cut: 3 valid calls for 1 item, -1.0, unfinished -0.5, penalty 1/30; thinking: 1.75; a row
    # without gt is not an agent row: None.
    assert rewards[0] == 3.0 and rewards[2] == pytest.approx(1.75) and rewards[3] is None
    assert rewards[1] == pytest.approx(-1.5 - 1 / 30)


def test_agent_reward_is_a_named_reward():
    assert "agent_reward" in REWARD_FUNCS and resolve_reward_funcs(["agent_reward"]) == [agent_reward]
