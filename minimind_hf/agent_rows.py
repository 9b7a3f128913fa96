"""Agent RL rows (the original's `agent_rl.jsonl`), validated like SFT data: the `"agent"` format of `load_records`.

A row is a t2t conversation (`minimind_hf.t2t`) whose first message is a system message with the tool schemas
(`tools`, a JSON string or a list), whose last assistant turn is left out (the original's `messages[:-1]`; a row
that already ends on a user or tool message is taken whole), and `gt`, the expected answers (strings or numbers,
kept as `str()` of each, which is what the original compares). A row breaking a rule raises `InvalidRecord`, which
the loaders turn into a `file:line` error. The parsed row is `prompt` (messages; the system message holds its tool
schemas as one JSON string each, the way the chat template prints them) and `gt`.
"""

from __future__ import annotations

import json

from datasets import Features, List, Value

from . import t2t
from .data import InvalidRecord, register_format

MESSAGE = {
    "role": Value("string"),
    "content": Value("string"),
    "reasoning_content": Value("string"),
    # The system message's tool schemas, one JSON string each (as the template prints them).
    "tools": List(Value("string")),
    "tool_calls": List({"name": Value("string"), "arguments": Value("string")}),
    "open_thinking": Value("bool"),
}
EMPTY_ANSWER = {"role": "assistant", "content": ""}
AGENT_FEATURES = Features({"prompt": List(MESSAGE), "gt": List(Value("string"))})


def _gt(record: dict) -> list[str]:
    if "gt" not in record:
        raise InvalidRecord("missing_gt", 'no "gt" field (the list of expected answers)')
    gt = record["gt"]
    if not isinstance(gt, list) or not all(isinstance(g, str | int | float) and not isinstance(g, bool) for g in gt):
        raise InvalidRecord("bad_gt", '"gt" is not a list of strings or numbers')
    # str() is what the original compares with (`str(g)`), so numbers keep their meaning.
    return [str(g) for g in gt]


def _agent_row(record: dict) -> dict:
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise InvalidRecord("bad_conversations", '"conversations" is not a non-empty list')
    answered = isinstance(conversations[-1], dict) and conversations[-1].get("role") == "assistant"
    try:
        # A row without the left-out turn is checked as if it had it (t2t's rules want an assistant turn).
        messages = t2t.validate_messages(conversations if answered else [*conversations, EMPTY_ANSWER])
    except t2t.Invalid as invalid:
        raise InvalidRecord(invalid.problem, invalid.detail) from None
    if messages[0]["role"] != "system" or not messages[0].get("tools"):
        raise InvalidRecord("no_tools", "the first message must be a system message with tools")
    gt = _gt(record)
    messages = messages[:-1]  # the original's `messages[:-1]`: the turn the model is to write
    if messages[-1]["role"] not in ("user", "tool"):
        raise InvalidRecord("bad_order", "the conversation must end on a user or tool message (before the answer)")
    prompt = []
    for message in messages:
        out = {"role": message["role"], "content": message["content"]}
        if message.get("reasoning_content") is not None:
            out["reasoning_content"] = message["reasoning_content"]
        if message.get("tools"):
            out["tools"] = [json.dumps(tool, ensure_ascii=False) for tool in message["tools"]]
        if message.get("tool_calls"):
            out["tool_calls"] = [
                {
                    "name": call["name"],
                    "arguments": call["arguments"]
                    if isinstance(call["arguments"], str)
                    else json.dumps(call["arguments"], ensure_ascii=False),
                }
                for call in message["tool_calls"]
            ]
        prompt.append(out)
    return {"prompt": prompt, "gt": gt}


register_format("agent", _agent_row, AGENT_FEATURES)


def tool_names(row: dict) -> list[str]:
    """The names of the tools on a row's system message."""
    names = []
    for text in row["prompt"][0].get("tools") or []:
        schema = json.loads(text)
        names.append(schema.get("function", schema).get("name"))
    return names
