"""MiniMind-3's marked chat template against the original's (the reference fixture), and load_tokenizer's choice."""

import json
import random
import shutil

import pytest
from transformers import PreTrainedTokenizerFast

from minimind_hf.chat_templates import MINIMIND3_CHAT_TEMPLATE, original_template_name
from minimind_hf.data import IGNORE_INDEX, encode_conversation
from minimind_hf.tokenizer import CHAT_TEMPLATE, load_tokenizer


@pytest.fixture(scope="module")
def reference(shared_fixtures):
    return shared_fixtures / "minimind3_reference"


@pytest.fixture(scope="module")
def original(reference):
    """The original's tokenizer with its own (unmarked) template, loaded without this project's code."""
    return PreTrainedTokenizerFast.from_pretrained(str(reference / "tokenizer"))


@pytest.fixture(scope="module")
def ours(reference):
    return load_tokenizer(reference / "tokenizer")


def _as_original_feeds(conversation: list[dict]) -> tuple[list[dict], list | None]:
    """What the original `SFTDataset.create_chat_prompt` hands its template: JSON strings parsed, tools apart."""
    messages, tools = [], None
    for message in conversation:
        message = dict(message)
        if message.get("role") == "system" and message.get("tools"):
            tools = json.loads(message["tools"]) if isinstance(message["tools"], str) else message["tools"]
        if isinstance(message.get("tool_calls"), str):
            message["tool_calls"] = json.loads(message["tool_calls"])
        messages.append(message)
    return messages, tools


def _tool(rng: random.Random, k: int) -> dict:
    return {
        "type": "function",
        "function": {
            "name": f"tool_{k}",
            "description": rng.choice(["Weather", "查询天气", "Adds numbers"]),
            "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
        },
    }


def _conversations(seed: int, count: int) -> list[list[dict]]:
    """A variety: with and without system, 1-3 tools, several calls as list or JSON string, arguments as object or
    string, runs of tool replies, reasoning as a field or inside content, empty content, several turns."""
    rng = random.Random(seed)
    texts = ["hi", "你好！", "", "  leading spaces", "line\nbreak", "\n\nnewlines", "2+3=5"]
    out = []
    for _ in range(count):
        messages = []
        tools = [_tool(rng, k) for k in range(rng.randint(1, 3))] if rng.random() < 0.4 else None
        if tools or rng.random() < 0.5:
            system = {"role": "system", "content": rng.choice(["You are terse.", "", "系统"])}
            if tools:
                system["tools"] = json.dumps(tools, ensure_ascii=False) if rng.random() < 0.5 else tools
            messages.append(system)
        for _turn in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": rng.choice(texts)})
            reply = {"role": "assistant", "content": rng.choice(texts)}
            form = rng.random()
            if form < 0.3:
                reply["reasoning_content"] = rng.choice(["think", "\nsteps\n", ""])
            elif form < 0.5:
                reply["content"] = f"<think>\n{rng.choice(texts)}\n</think>\n\n{reply['content']}"
            if tools and rng.random() < 0.6:
                calls = [
                    {"name": f"tool_{rng.randrange(len(tools))}", "arguments": rng.choice([{"x": "Oslo"}, '{"x": 1}'])}
                    for _ in range(rng.randint(1, 3))
                ]
                reply["tool_calls"] = json.dumps(calls) if rng.random() < 0.5 else calls
                messages.append(reply)
                for _ in range(rng.randint(1, 3)):
                    messages.append({"role": "tool", "content": rng.choice(['{"temp": -3}', "ok", ""])})
                messages.append({"role": "assistant", "content": rng.choice(texts)})
            else:
                messages.append(reply)
        out.append(messages)
    return out


def test_the_original_templates_are_recognised(reference, original, shared_fixtures):
    assert original_template_name(original.chat_template) == "minimind3"
    minimind2 = json.loads((shared_fixtures / "minimind_tokenizer" / "tokenizer_config.json").read_text())
    assert original_template_name(minimind2["chat_template"]) == "minimind2"
    # Whitespace between tags does not matter, a changed byte inside a string does.
    assert original_template_name("  " + original.chat_template.replace("\n", "\n  ")) == "minimind3"
    assert original_template_name(original.chat_template.replace("# Tools", "# tools")) is None


def test_load_tokenizer_gives_the_original_minimind3_template_its_marked_twin(ours, original):
    assert ours.chat_template == MINIMIND3_CHAT_TEMPLATE
    assert ours.convert_ids_to_tokens([0, 1, 2, 21, 25, 35]) == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<tool_call>",
        "<think>",
        "<|buffer9|>",
    ]


def test_marked_template_renders_byte_identically(reference, original):
    fixture = [json.loads(line)["conversations"] for line in (reference / "t2t_convs.jsonl").open()]
    conversations = fixture + _conversations(seed=0, count=300)
    for conversation in conversations:
        messages, tools = _as_original_feeds(conversation)
        for prompt, kwargs in [(messages, {}), (messages[:1] if messages[0]["role"] == "user" else messages[:2], {})]:
            for generation in [{}, {"add_generation_prompt": True}]:
                for thinking in [{}, {"open_thinking": True}, {"open_thinking": False}]:
                    options = {**kwargs, **generation, **thinking, "tools": tools, "tokenize": False}
                    expected = original.apply_chat_template(prompt, **options)
                    got = original.apply_chat_template(prompt, chat_template=MINIMIND3_CHAT_TEMPLATE, **options)
                    assert got == expected, (prompt, options)


def test_generation_prompt_thinking_switches(ours):
    messages = [{"role": "user", "content": "hi"}]
    render = lambda **kw: ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)  # noqa: E731
    closed, opened = "<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|im_start|>assistant\n<think>\n"
    assert render().endswith(closed) and render(open_thinking=False).endswith(closed)
    assert render(open_thinking=True).endswith(opened) and not render(open_thinking=True).endswith(closed)
    # `enable_thinking` is read as an alias only when `open_thinking` is not given.
    assert render(enable_thinking=True).endswith(opened) and render(enable_thinking=False).endswith(closed)
    assert render(open_thinking=False, enable_thinking=True).endswith(closed)


def test_ids_and_labels_equal_the_original_sft_dataset(reference, ours):
    """Row for row: the fixture's ids and labels (padded to 340) from both of our ways of building them."""
    conversations = [json.loads(line)["conversations"] for line in (reference / "t2t_convs.jsonl").open()]
    rows = [json.loads(line) for line in (reference / "t2t_masks.jsonl").open()]
    from minimind_hf.data import conversation_messages

    for conversation, row in zip(conversations, rows, strict=True):
        messages = conversation_messages(conversation)
        encoded = encode_conversation(messages, ours, row["max_length"])
        n = len(encoded["input_ids"])
        assert encoded["input_ids"] == row["input_ids"][:n] and encoded["labels"] == row["labels"][:n]
        assert set(row["labels"][n:]) <= {IGNORE_INDEX} and set(row["input_ids"][n:]) <= {0}
        # TRL's way: the template's assistant mask.
        feeds, tools = _as_original_feeds(conversation)
        masked = ours.apply_chat_template(feeds, tools=tools, return_dict=True, return_assistant_tokens_mask=True)
        labels = [t if m else IGNORE_INDEX for t, m in zip(masked["input_ids"], masked["assistant_masks"], strict=True)]
        assert masked["input_ids"] == encoded["input_ids"] and labels == encoded["labels"]
    # The tool reply is not supervised, the tool call is.
    text = ours.decode([t for t in encoded["labels"] if t != IGNORE_INDEX])
    assert '"get_weather"' in text and "temp" not in text


def test_marked_mask_equals_the_original_rule_on_generated_conversations(ours):
    from minimind_hf.t2t import original_labels

    header = ours.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = ours.encode("<|im_end|>\n", add_special_tokens=False)
    for conversation in _conversations(seed=1, count=150):
        feeds, tools = _as_original_feeds(conversation)
        masked = ours.apply_chat_template(feeds, tools=tools, return_dict=True, return_assistant_tokens_mask=True)
        ids = masked["input_ids"]
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, masked["assistant_masks"], strict=True)]
        assert labels == original_labels(ids, header, end)


def _copy(reference, tmp_path, template: str | None):
    target = tmp_path / "tok"
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference / "tokenizer" / name, target / name)
    if template is not None:
        (target / "chat_template.jinja").write_text(template)
    return target


def test_load_tokenizer_refuses_an_unknown_template_unless_told(reference, tmp_path):
    path = _copy(reference, tmp_path, "{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ValueError, match=r"neither MiniMind2's nor MiniMind-3's original .* chat_template: "):
        load_tokenizer(path)
    assert load_tokenizer(path, chat_template="minimind3").chat_template == MINIMIND3_CHAT_TEMPLATE
    assert load_tokenizer(path, chat_template="minimind2").chat_template == CHAT_TEMPLATE
    assert load_tokenizer(path, chat_template="keep").chat_template.startswith("{% for m in messages %}")
    with pytest.raises(ValueError, match="chat_template must be one of"):
        load_tokenizer(path, chat_template="qwen")


def test_a_minimind3_vocabulary_without_template_gets_minimind3s(reference, tmp_path):
    assert load_tokenizer(_copy(reference, tmp_path, None)).chat_template == MINIMIND3_CHAT_TEMPLATE
