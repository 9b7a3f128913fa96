"""MiniMind-3's SFT rows (`sft_t2t`): tool calls, tool replies, reasoning; its augmentations and its loss mask.

A message may carry, besides `role` and `content`:

- `reasoning_content` (assistant): the thinking, rendered inside the turn's `<think>` block;
- `tools` (the first message, a system message): the tool schemas, a JSON string as the original's files hold them,
  or a list of objects;
- `tool_calls` (assistant): a JSON string or a list of `{"name", "arguments"}` (arguments an object or a JSON
  string; OpenAI's `{"type": "function", "function": {...}}` wrapping is accepted too).

Tool results are `tool` messages, which must follow an assistant turn with tool calls (or another tool reply).
`validate_messages` checks all of it and returns the messages normalised (JSON strings parsed), or raises `Invalid`
with a one-line detail that the loaders turn into a `file:line` error.

`encode_rendered` reproduces the original `SFTDataset`: the conversation is rendered to text with the chat
template, empty think blocks may be deleted from the text (`empty_think_ratio`), the text is tokenized and cut to
`max_length`, and `original_labels` supervises every assistant turn from the token after `<|im_start|>assistant\\n`
through `<|im_end|>\\n`; everything else, tool replies included, is -100.

The augmentations are drawn per row from `row_draws(seed, file, line)`, a hash: the same seed gives the same rows
whichever worker process tokenizes them. The loaders tokenize once per run (the Arrow cache is keyed on the seed
and ratios), so a run draws once, not anew every epoch as the original does.
"""

from __future__ import annotations

import hashlib
import json

IGNORE_INDEX = -100
EMPTY_THINK = "<think>\n\n</think>\n\n"

# The original's ten system prompts (`pre_processing_chat` in its dataset/lm_dataset.py), in its order.
SYSTEM_PROMPTS = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "reasoning_content", "tools", "tool_calls")
_CALL_KEYS = {"name", "arguments", "id", "type", "function"}


class Invalid(Exception):
    """A row that breaks the rules: `problem` is a short kind, `detail` one line for the `file:line` error."""

    def __init__(self, problem: str, detail: str):
        super().__init__(detail)
        self.problem, self.detail = problem, detail


def uses_t2t(conversations: list) -> bool:
    """Whether a row uses anything beyond MiniMind2's `{role, content}` system/user/assistant messages."""
    return any(
        isinstance(m, dict) and (m.get("role") == "tool" or any(key not in ("role", "content") for key in m))
        for m in conversations
    )


def _json(value: object, i: int, key: str, problem: str) -> object:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise Invalid(problem, f"message {i} {key} is not valid JSON: {error}") from None


def _tools(value: object, i: int) -> list | None:
    tools = _json(value, i, "tools", "bad_tools")
    if tools is None or tools == "":
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise Invalid("bad_tools", f"message {i} tools is not a list of objects")
    return tools or None


def _tool_calls(value: object, i: int) -> list | None:
    calls = _json(value, i, "tool_calls", "bad_tool_calls")
    if calls is None or calls == "":
        return None
    if not isinstance(calls, list):
        raise Invalid("bad_tool_calls", f"message {i} tool_calls is a {type(calls).__name__}, not a list")
    normalised = []
    for j, call in enumerate(calls):
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]  # OpenAI's wrapping; the template unwraps it the same way
        if not isinstance(call, dict):
            raise Invalid("bad_tool_calls", f"message {i} tool call {j} is not an object")
        unknown = sorted(set(call) - _CALL_KEYS)
        if unknown:
            raise Invalid("bad_tool_calls", f"message {i} tool call {j} has unknown key {unknown[0]!r}")
        if not isinstance(call.get("name"), str) or not call["name"]:
            raise Invalid("bad_tool_calls", f"message {i} tool call {j} has no name")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            # Rendered verbatim by the template: it must be the JSON object a model would have to write.
            parsed = _json(arguments, i, f"tool call {j} arguments", "bad_tool_calls")
            if not isinstance(parsed, dict):
                raise Invalid("bad_tool_calls", f"message {i} tool call {j} arguments is not a JSON object")
        elif not isinstance(arguments, dict):
            raise Invalid("bad_tool_calls", f"message {i} tool call {j} arguments is not an object or JSON string")
        normalised.append({"name": call["name"], "arguments": arguments})
    return normalised or None


def validate_messages(conversations: list) -> list[dict]:
    """MiniMind-3's rules for a non-empty list of messages (see the module doc): the normalised messages."""
    messages = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise Invalid("bad_message", f"message {i} is not an object with role and content")
        unknown = [key for key in message if key not in MESSAGE_KEYS]
        if unknown:
            known = ", ".join(MESSAGE_KEYS)
            raise Invalid("unknown_key", f"message {i} has unknown key {unknown[0]!r} (known: {known})")
        role = message["role"]
        if role not in ROLES:
            raise Invalid("bad_role", f"message {i} has role {role!r}, not one of {ROLES}")
        content = message["content"]
        calls = _tool_calls(message.get("tool_calls"), i)
        if content is None and calls:
            content = ""  # OpenAI writes null content beside tool calls; the template renders it empty
        if not isinstance(content, str):
            raise Invalid("bad_content", f"message {i} content is of type {type(content).__name__}, not a string")
        out = {"role": role, "content": content}
        reasoning = message.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant":
                raise Invalid("bad_reasoning", f"message {i} is {role!r} and has reasoning_content")
            if not isinstance(reasoning, str):
                kind = type(reasoning).__name__
                raise Invalid("bad_reasoning", f"message {i} reasoning_content is of type {kind}, not a string")
            out["reasoning_content"] = reasoning
        if calls:
            if role != "assistant":
                raise Invalid("bad_tool_calls", f"message {i} is {role!r} and has tool_calls")
            out["tool_calls"] = calls
        tools = _tools(message.get("tools"), i)
        if tools:
            if role != "system" or i != 0:
                raise Invalid("bad_tools", f"message {i} has tools, which only the first (system) message may have")
            out["tools"] = tools
        messages.append(out)
    _check_order(messages)
    return messages


def _check_order(messages: list[dict]) -> None:
    """A system message may come first; then user, and after it an assistant; an assistant is followed by a user,
    or by tool replies when it called tools; tool replies are followed by more of them or by an assistant."""
    start = 1 if messages[0]["role"] == "system" else 0
    previous = None
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        if previous is None:
            expected = ("user",)
        elif previous["role"] == "user":
            expected = ("assistant",)
        elif previous["role"] == "assistant":
            expected = ("user", "tool") if previous.get("tool_calls") else ("user",)
        else:
            expected = ("tool", "assistant")
        if role not in expected:
            # A tool reply where none was called is a misplaced role ("bad_role", as before tool replies existed).
            if role == "tool":
                raise Invalid("bad_role", f"message {i} is a tool reply with no assistant tool call before it")
            wanted = " or ".join(repr(r) for r in expected)
            raise Invalid("bad_order", f"message {i} is {role!r} where {wanted} was expected")
        previous = messages[i]
    if not any(m["role"] == "assistant" for m in messages):
        raise Invalid("no_assistant", "no assistant turn")


def row_draws(seed: int, file: int, line: int) -> tuple[float, float, float]:
    """Three uniform draws in [0, 1) for one row, from a hash of (seed, file index, line): whether to add a system
    prompt, which one, and whether to keep empty think blocks. Independent of batching and worker processes."""
    digest = hashlib.blake2b(f"{seed}:{file}:{line}".encode(), digest_size=24).digest()
    return tuple(int.from_bytes(digest[k : k + 8], "little") / 2**64 for k in (0, 8, 16))


def add_system_prompt(messages: list[dict], ratio: float, draw: float, choice: float) -> list[dict]:
    """The original's `pre_processing_chat`: a row with no system message and no tools gets one of
    `SYSTEM_PROMPTS` (picked by `choice`) when `draw < ratio`."""
    if draw >= ratio or not messages or messages[0]["role"] == "system" or any(m.get("tools") for m in messages):
        return messages
    prompt = SYSTEM_PROMPTS[min(int(choice * len(SYSTEM_PROMPTS)), len(SYSTEM_PROMPTS) - 1)]
    return [{"role": "system", "content": prompt}, *messages]


def drop_empty_think(text: str, ratio: float, draw: float) -> str:
    """The original's `post_processing_chat`: every empty think block is deleted from the rendered text unless
    `draw < ratio`, so a `ratio` share of rows keeps (and supervises) them."""
    return text.replace(EMPTY_THINK, "") if draw >= ratio else text


def render(messages: list[dict], tokenizer) -> str:
    """The conversation as the original renders it: the first system message's tools go to the template."""
    tools = next((m["tools"] for m in messages if m["role"] == "system" and m.get("tools")), None)
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)


def original_labels(ids: list[int], header: list[int], end: list[int]) -> list[int]:
    """The original `SFTDataset.generate_labels`: after each `header` (`<|im_start|>assistant\\n`) every token is a
    target through the next `end` (`<|im_end|>\\n`), or through the last token when it was cut off."""
    labels = [IGNORE_INDEX] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i : i + len(header)] == header:
            start = i + len(header)
            stop = start
            while stop < len(ids) and ids[stop : stop + len(end)] != end:
                stop += 1
            for j in range(start, min(stop + len(end), len(ids))):
                labels[j] = ids[j]
            i = stop + len(end) if stop < len(ids) else len(ids)
        else:
            i += 1
    return labels


def encode_rendered(
    conversations: list[list[dict]],
    tokenizer,
    max_length: int | None,
    draws: list[tuple[float, float, float]] | None = None,
    *,
    add_system_ratio: float = 0.0,
    empty_think_ratio: float = 1.0,
) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each conversation as the original `SFTDataset` builds them, without its padding; `draws`
    (one `row_draws` per conversation) drive the augmentations, which are off at the default ratios."""
    header = tokenizer(f"{tokenizer.bos_token}assistant\n", add_special_tokens=False)["input_ids"]
    end = tokenizer(f"{tokenizer.eos_token}\n", add_special_tokens=False)["input_ids"]
    texts = []
    for k, messages in enumerate(conversations):
        system_draw, choice, think_draw = draws[k] if draws is not None else (1.0, 0.0, 0.0)
        text = render(add_system_prompt(messages, add_system_ratio, system_draw, choice), tokenizer)
        texts.append(drop_empty_think(text, empty_think_ratio, think_draw) if draws is not None else text)
    pairs = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = ids[:max_length]
        pairs.append((ids, original_labels(ids, header, end)))
    return pairs
