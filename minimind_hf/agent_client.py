"""An agent loop on the `openai` client: ask with tools, run the calls the server returns, send their results back,
until the model answers. It drives `python -m minimind_hf.serve` (or any OpenAI-compatible server) as a user's
program would; the demo uses it to check its agent model end to end.

    from openai import OpenAI
    api = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    answer, calls = run_with_tools(api, "out/demo/agent", [{"role": "user", "content": "What is 37 * 48?"}], tools)

The tools run here, in the client (`agent_tools.run_tool`: the registry's tools, errors returned as JSON, never
raised), as OpenAI's protocol has it: the server only says which to call.
"""

from __future__ import annotations

import json
from typing import Any

from .agent_tools import run_tool


def _streamed(api: Any, **request: Any) -> tuple[str, list[dict], str]:
    """(content, tool calls, finish reason) of a streamed completion, assembled from its deltas."""
    content, calls, finish = [], {}, None
    for chunk in api.chat.completions.create(stream=True, **request):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content.append(choice.delta.content or "")
        for call in choice.delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return "".join(content), [calls[i] for i in sorted(calls)], finish


def run_with_tools(
    api: Any,
    model: str,
    messages: list[dict],
    tools: list[dict],
    stream: bool = False,
    max_turns: int = 3,
    **request: Any,
) -> tuple[str, list[dict]]:
    """(the final answer, every call made) of a conversation: each reply's `tool_calls` are run and answered as
    `tool` messages, for at most `max_turns` replies. `request` goes to every completion (e.g. temperature)."""
    messages, made = list(messages), []
    for _ in range(max_turns):
        query = {"model": model, "messages": messages, "tools": tools, **request}
        if stream:
            content, calls, finish = _streamed(api, **query)
        else:
            choice = api.chat.completions.create(**query).choices[0]
            content, finish = choice.message.content or "", choice.finish_reason
            calls = [
                {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in choice.message.tool_calls or []
            ]
        if finish != "tool_calls" or not calls:
            return content, made
        messages.append(
            {
                "role": "assistant",
                "content": content or None,
                "tool_calls": [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in calls
                ],
            }
        )
        for call in calls:
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                arguments = {}
            made.append({"name": call["name"], "arguments": arguments})
            result = run_tool(call["name"], arguments if isinstance(arguments, dict) else {})
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return "", made
