"""The chat templates of both generations, with `{% generation %}` markers, and recognition of the originals.

`CHAT_TEMPLATE` is MiniMind2's (see the comment above it). `MINIMIND3_CHAT_TEMPLATE` is the original MiniMind-3
template (its `chat_template.jinja`) with three changes that change no rendered byte: the assistant header `<|im_start|>assistant\\n` is printed on its own, `{% generation %}`
wraps what the original's `SFTDataset` supervises (the think block, the content, the tool calls, `<|im_end|>` and
the `\\n` after it), and the generation prompt also reads `enable_thinking` (this project's and Qwen3's name for
the original's `open_thinking`) when `open_thinking` is not given. Every assistant turn starts with `<think>`, an
added token, so the header's `\\n` never merges with the reply and the marked characters are exactly the
original's supervised tokens.

`known_template(text)` names a template by its whitespace-normalised text: `load_tokenizer` gives a known original
its marked twin and refuses a template it does not know instead of replacing it silently.
"""

# The template below is the original's text line for line (so that the two can be diffed); some lines are long.
# ruff: noqa: E501

from __future__ import annotations

import hashlib

# MiniMind2

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"

# The original MiniMind template (its tokenizer_config.json), verbatim but for three things: the default system
# prompt comes from DEFAULT_SYSTEM_PROMPT, the assistant header is printed on its own, and `{% generation %}` wraps
# what MiniMind supervises (the reply, its tool calls, `<|im_end|>` and the `\n` after it). The tool-calling
# branch and `enable_thinking` (an empty `<think>` block after the generation prompt) are the original's. The
# `ns` loop computes a value the original never prints; it is kept so that the two can be compared line by line.
CHAT_TEMPLATE = (
    """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with \
function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- else %}
 {%- if messages[0]['role'] == 'system' -%}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else -%}
        {{- '<|im_start|>system\\n"""
    + DEFAULT_SYSTEM_PROMPT
    + """<|im_end|>\\n' }}
 {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and \
not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}
        {{- content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
        {%- endgeneration %}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
)

# This project's earlier template (plain conversations only), saved in tokenizer directories written before the
# tool-calling and thinking branches came back: such a directory gets `CHAT_TEMPLATE` instead.
_EARLIER_TEMPLATES = (
    "{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\\n"
    + DEFAULT_SYSTEM_PROMPT
    + "<|im_end|>\\n' -}}{%- endif -%}{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}{%- generation -%}{{- "
    "content + '<|im_end|>\\n' -}}{%- endgeneration -%}{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + "
    "content + '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- "
    "'<|im_start|>assistant\\n' -}}{%- endif -%}",
)


# MiniMind-3

# The original's text, verbatim but for the changes the module doc lists.
MINIMIND3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if true %}
            {{- '<|im_start|>' + message.role + '\n' }}
        {%- endif %}
        {%- generation %}
        {{- '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
        {%- endgeneration %}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if open_thinking is defined %}
        {%- set thinking = open_thinking %}
    {%- else %}
        {%- set thinking = enable_thinking is defined and enable_thinking %}
    {%- endif %}
    {%- if thinking is true %}
        {{- '<think>\n' }}
    {%- else %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


def template_digest(template: str) -> str:
    """SHA-256 of a template with each line stripped and blank lines dropped: indentation and line ends between
    Jinja tags are what copies of a template differ in (tokenizer_config.json vs chat_template.jinja, editors),
    and with `{%-` / `{{-` they render nothing."""
    lines = (line.strip() for line in template.splitlines())
    return hashlib.sha256("\n".join(line for line in lines if line).encode()).hexdigest()


# The original MiniMind's templates, by `template_digest`: MiniMind2's (the `chat_template` of its
# tokenizer_config.json) and MiniMind-3's (its chat_template.jinja).
ORIGINAL_TEMPLATES = {
    "ba4e55367164dc29c4d5b220afc865487abecdc0d229ed612d8f9e51a8be362f": "minimind2",
    "1ace320c419c7e94b3514f4ff9e36bd82649d4ccf67b43e35a191eb20ce6675e": "minimind3",
}


def original_template_name(template: str | None) -> str | None:
    """ "minimind2" or "minimind3" when `template` is that original template (whitespace aside), else None."""
    return None if not template else ORIGINAL_TEMPLATES.get(template_digest(template))


# MiniMind-3's vocabulary head (its tokenizer.json): ids 0-20 special, then tags that are added but not special
# (so that `skip_special_tokens` keeps them in decoded replies), then nine spare buffer tokens.
MINIMIND3_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
]
MINIMIND3_TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
MINIMIND3_BUFFER_TOKENS = [f"<|buffer{i}|>" for i in range(1, 10)]

# What `load_tokenizer(chat_template=...)` accepts besides None (decide from the tokenizer).
TEMPLATE_CHOICES = ("minimind2", "minimind3", "keep")


def has_minimind3_vocabulary(added_tokens: set[str]) -> bool:
    """Whether a tokenizer's added tokens are MiniMind-3's (its tool and think tags), for one with no template."""
    return set(MINIMIND3_TAG_TOKENS) <= added_tokens


def training_template(own: str | None, choice: str | None, added_tokens: set[str], where: str) -> str | None:
    """The chat template `load_tokenizer` gives a tokenizer whose own template is `own`.

    `choice` "minimind2" / "minimind3" names the marked template to use whatever the tokenizer holds; "keep" keeps
    its own. With None: a marked template of this project (or the user's own with `{% generation %}` markers) is
    kept; the original MiniMind2 or MiniMind-3 template, or this project's earlier one, gets its marked twin; no
    template at all gets MiniMind2's, or MiniMind-3's for a MiniMind-3 vocabulary. Any other template is refused:
    replacing it would train on a format the tokenizer's owner never chose.
    """
    from trl.chat_template_utils import has_generation_markers  # TRL only when a template is chosen

    marked = {"minimind2": CHAT_TEMPLATE, "minimind3": MINIMIND3_CHAT_TEMPLATE}
    if choice == "keep":
        return own
    if choice is not None:
        if choice not in marked:
            raise ValueError(f"chat_template must be one of {TEMPLATE_CHOICES} or None, got {choice!r}")
        return marked[choice]
    if own in marked.values():
        return own
    if own in _EARLIER_TEMPLATES:
        return CHAT_TEMPLATE
    if not own:
        return marked["minimind3" if has_minimind3_vocabulary(added_tokens) else "minimind2"]
    name = original_template_name(own)
    if name is not None:
        return marked[name]
    if has_generation_markers(own):
        return own
    raise ValueError(
        f"{where}: its chat template is neither MiniMind2's nor MiniMind-3's original and has no "
        "{% generation %} markers to train on; choose one with chat_template: minimind2, minimind3 or keep"
    )
