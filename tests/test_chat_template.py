"""The training chat template against the original MiniMind template: tools, tool calls, tool responses and
`enable_thinking`, rendered byte for byte alike, and the assistant masks around tool calls."""

import json
from itertools import groupby

import pytest
from transformers import AutoTokenizer

from minimind_hf.chat_templates import _EARLIER_TEMPLATES, CHAT_TEMPLATE
from minimind_hf.data import IGNORE_INDEX, encode_conversation
from minimind_hf.tokenizer import load_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "今天的天气 / the weather today",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "description": "the time", "parameters": {}}}

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
STRING_CALL = {"function": {"name": "now", "arguments": '{"tz": "UTC"}'}}
BARE_CALL = {"name": "now", "arguments": {}}

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Beijing?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 °C."},
    ],
    [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL, STRING_CALL, BARE_CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "12:00"},
        {"role": "tool", "content": "again"},
        {"role": "assistant", "content": "Sunny, noon."},
        {"role": "system", "content": "A system turn later on."},
        {"role": "user", "content": "<tool_response>x</tool_response>"},
        {"role": "assistant", "content": None},
    ],
    [
        {"role": "user", "content": "Think first: 3 + 4?"},
        {"role": "assistant", "content": "<think>\n3 + 4 = 7\n</think>\n<answer>\n7\n</answer>"},
    ],
]


@pytest.fixture(scope="module")
def original(shared_fixtures):
    """The original tokenizer with the original template (`AutoTokenizer` keeps it as saved)."""
    tokenizer = AutoTokenizer.from_pretrained(shared_fixtures / "minimind_tokenizer")
    assert "{% generation %}" not in tokenizer.chat_template and "tool_call" in tokenizer.chat_template
    return tokenizer


def render(tokenizer, messages, template=None, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template, **kwargs)


@pytest.mark.parametrize("tools", [None, [WEATHER], [WEATHER, CLOCK]], ids=["no_tools", "one_tool", "two_tools"])
@pytest.mark.parametrize("thinking", [None, True, False], ids=["thinking_unset", "thinking_on", "thinking_off"])
def test_renders_like_the_original(original, tools, thinking):
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    for messages in CONVERSATIONS:
        for end in range(1, len(messages) + 1):
            prompt = messages[:end]
            for generation_prompt in (False, True):
                expected = render(original, prompt, tools=tools, add_generation_prompt=generation_prompt, **kwargs)
                ours = render(
                    original, prompt, CHAT_TEMPLATE, tools=tools, add_generation_prompt=generation_prompt, **kwargs
                )
                assert ours == expected


def test_thinking_off_closes_an_empty_think_block(original):
    messages = [{"role": "user", "content": "3 + 4?"}]
    off = render(original, messages, CHAT_TEMPLATE, add_generation_prompt=True, enable_thinking=False)
    on = render(original, messages, CHAT_TEMPLATE, add_generation_prompt=True, enable_thinking=True)
    assert off == on + "<think>\n\n</think>\n\n" and on.endswith("<|im_start|>assistant\n")


def test_tools_render_in_the_system_turn(original):
    text = render(original, CONVERSATIONS[1], CHAT_TEMPLATE, tools=[WEATHER])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(WEATHER, ensure_ascii=False) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in text


def supervised_spans(tokenizer, messages, **kwargs) -> list[str]:
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True, **kwargs)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    return [
        tokenizer.decode([ids[i] for i in group])
        for marked, group in groupby(range(len(ids)), key=lambda i: mask[i])
        if marked
    ]


@pytest.mark.parametrize("source", ["original", "project"])
def test_masks_cover_replies_tool_calls_and_their_end(shared_fixtures, project_tokenizer_dir, source):
    path = shared_fixtures / "minimind_tokenizer" if source == "original" else project_tokenizer_dir
    tokenizer = load_tokenizer(path)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    spans = supervised_spans(tokenizer, CONVERSATIONS[1], tools=[WEATHER])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    assert spans == [call + "<|im_end|>\n", "21 °C.<|im_end|>\n"]
    spans = supervised_spans(tokenizer, CONVERSATIONS[2])
    assert spans[0].startswith("Let me check.\n<tool_call>\n") and spans[0].endswith("</tool_call><|im_end|>\n")
    assert spans[0].count("<tool_call>") == 3
    assert spans[1:] == ["Sunny, noon.<|im_end|>\n", "<|im_end|>\n"]
    # A reasoning reply is supervised whole, tags included.
    assert supervised_spans(tokenizer, CONVERSATIONS[3]) == [CONVERSATIONS[3][1]["content"] + "<|im_end|>\n"]


def test_plain_conversation_labels_are_unchanged_by_the_tool_branches(project_tokenizer_dir):
    """What SFT trains on: the new template gives the same ids and labels as the earlier plain one."""
    new = load_tokenizer(project_tokenizer_dir)
    old = load_tokenizer(project_tokenizer_dir)
    old.chat_template = _EARLIER_TEMPLATES[0]
    for messages in [CONVERSATIONS[0], CONVERSATIONS[3], [{"role": "system", "content": "s"}, *CONVERSATIONS[0]]]:
        assert encode_conversation(messages, new, None) == encode_conversation(messages, old, None)
        assert any(label != IGNORE_INDEX for label in encode_conversation(messages, new, None)["labels"])


def test_earlier_project_template_is_upgraded(tmp_path, project_tokenizer_dir):
    tokenizer = load_tokenizer(project_tokenizer_dir)
    tokenizer.chat_template = _EARLIER_TEMPLATES[0]
    tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).chat_template == CHAT_TEMPLATE
    # A template of the user's own, with generation markers, is kept.
    custom = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    tokenizer.chat_template = custom
    tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).chat_template == custom
