"""What a model's reply holds: reasoning, the answer, and tool calls, parsed from the text it generated.

Both generations write the same markup (MiniMind-3 as trained, MiniMind2 where its template offered tools):

    <think>\\n...reasoning...\\n</think>\\n\\n answer <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>

`split_reply` takes a whole reply apart; `ReplyStream` does the same incrementally for a streamed reply, holding
back only what could still turn out to be markup (a partial `</think>` or `<tool_call>`), so a client sees the
reasoning and the answer as they are written and the calls once they are complete. transformers' own response
parsers are keyed by model type and do not know MiniMind's, so this small parser is written here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MARKERS = (THINK_OPEN, THINK_CLOSE, CALL_OPEN)
_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass
class Reply:
    content: str
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def _split_thinking(text: str, thinking_open: bool) -> tuple[str | None, str]:
    """(reasoning, rest). `thinking_open`: the prompt ended inside `<think>`, so the reply starts with reasoning."""
    stripped = text.lstrip()
    if not thinking_open and stripped.startswith(THINK_OPEN):
        thinking_open, text = True, stripped[len(THINK_OPEN) :]
    if not thinking_open or THINK_CLOSE not in text:
        return (text.strip() if thinking_open else None), ("" if thinking_open else text)
    reasoning, rest = text.split(THINK_CLOSE, 1)
    return reasoning.strip(), rest.lstrip("\n")


def parse_tool_call(block: str) -> dict[str, Any] | None:
    """`{"name": str, "arguments": dict}` from the JSON inside one `<tool_call>` block, or None when it is not one."""
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": call["name"], "arguments": arguments}


def _split_calls(text: str) -> tuple[str, list[dict[str, Any]]] | None:
    """(content before the first call, calls) when every `<tool_call>` block in `text` parses, else None."""
    head, _, tail = text.partition(CALL_OPEN)
    calls = []
    for part in (CALL_OPEN + tail).split(CALL_OPEN)[1:]:
        block, closed, after = part.partition(CALL_CLOSE)
        call = parse_tool_call(block.strip()) if closed else None
        if call is None or after.strip():
            return None
        calls.append(call)
    return head.rstrip(), calls


def split_reply(text: str, thinking_open: bool = False, tools: bool = True) -> Reply:
    """A whole reply taken apart. Calls are parsed only when `tools` were offered; a reply whose call blocks do not
    all parse stays plain content, so nothing the model wrote is lost."""
    reasoning, rest = _split_thinking(text, thinking_open)
    if tools and CALL_OPEN in rest:
        parsed = _split_calls(rest)
        if parsed is not None:
            return Reply(parsed[0], reasoning, parsed[1])
    return Reply(rest, reasoning)


def _partial_marker(text: str) -> int:
    """How many characters at the end of `text` could be the start of a marker."""
    for size in range(max(map(len, MARKERS)) - 1, 0, -1):
        if len(text) >= size and any(marker.startswith(text[-size:]) for marker in MARKERS):
            return size
    return 0


def drop_partial_character(text: str) -> str:
    """`text` without the U+FFFD that decoding leaves for a multi-byte character cut off by the token limit."""
    return text.rstrip("\ufffd")


class ReplyStream:
    """`split_reply` for a reply still being written: `feed` it the text decoded so far and get the reasoning and
    content that can be sent now. What is sent is always a prefix of what `split_reply` finally says, because
    everything that could still change is held back: a partial character or marker, trailing whitespace (which the
    final split may strip) and, when tools were offered, everything from `<tool_call>` on (calls are sent whole by
    `finish`, or as content if they do not parse)."""

    def __init__(self, thinking_open: bool = False, tools: bool = True):
        self.thinking_open, self.tools = thinking_open, tools
        self.sent = ["", ""]  # reasoning, content

    def feed(self, text: str) -> tuple[str, str]:
        text = drop_partial_character(text)
        text = text[: len(text) - _partial_marker(text)]
        reasoning, rest = _split_thinking(text, self.thinking_open)
        if self.tools and CALL_OPEN in rest:
            rest = rest.split(CALL_OPEN, 1)[0]
        return self._delta((reasoning or "").rstrip(), rest.rstrip())

    def finish(self, text: str) -> tuple[str, str, list[dict[str, Any]]]:
        """The last pieces and the calls of the whole reply."""
        reply = split_reply(text, self.thinking_open, self.tools)
        return (*self._delta(reply.reasoning or "", reply.content), reply.tool_calls)

    def _delta(self, *now: str) -> tuple[str, str]:
        new = []
        for i, text in enumerate(now):
            piece = text[len(self.sent[i]) :] if text.startswith(self.sent[i]) else ""
            self.sent[i] += piece
            new.append(piece)
        return new[0], new[1]


def gt_found(text: str, gt: Sequence[Any]) -> set[str]:
    """The `gt` items (as strings) found in `text`: as a case-insensitive substring, or, for a number, as any number
    in the text within 1e-6 (thousands commas ignored). The original's `validate_gt_in_text`."""
    text = str(text)
    numbers = [float(x) for x in _NUMBER_IN_TEXT.findall(text.replace(",", ""))]
    found = set()
    for item in gt:
        item = str(item).strip()
        if item and item.lower() in text.lower():
            found.add(item)
        elif _NUMBER.fullmatch(item.replace(",", "")):
            value = float(item.replace(",", ""))
            if any(abs(value - n) < 1e-6 for n in numbers):
                found.add(item)
    return found


def parse_call_blocks(text: str) -> list[Any]:
    """The JSON of every `<tool_call>...</tool_call>` block; a block that is not JSON is left out, as the original's
    `parse_tool_calls` does (so it costs nothing beyond an unbalanced tag)."""
    calls = []
    for block in _CALL_BLOCK.findall(text):
        try:
            calls.append(json.loads(block.strip()))
        except ValueError:
            continue
    return calls
