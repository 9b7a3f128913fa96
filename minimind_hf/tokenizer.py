"""MiniMind's tokenizer and ChatML chat template, made ready for assistant-only SFT loss.

`CHAT_TEMPLATE` renders byte for byte what the original MiniMind template renders for every conversation it
accepts (system / user / assistant turns, tools and tool calls, `enable_thinking=False`), and wraps what is
supervised in `{% generation %}`: an assistant turn's content and tool calls, its `<|im_end|>` and the `\\n`
after it. transformers turns those character spans into
`assistant_masks`, which is what TRL's `SFTTrainer(assistant_only_loss=True)` trains on.

One case needs more than the template. transformers marks every token that overlaps a generation span, but
byte-level BPE can merge the header's `\\n` with leading spaces of the content (`"assistant\\n  hi"` gives
the token `"\\n "`), and the original MiniMind never supervises the token right after
`<|im_start|>assistant`. `MiniMindTokenizer` therefore unmarks that token in `apply_chat_template`, so
TRL's own tokenization reproduces the original loss mask exactly (checked against the reference fixture).
"""

from __future__ import annotations

from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .chat_templates import training_template

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


class MiniMindTokenizer(PreTrainedTokenizerFast):
    """A `PreTrainedTokenizerFast` whose assistant masks follow the original MiniMind rule.

    Saved directories name this class, which `AutoTokenizer` does not know and loads as the plain fast
    tokenizer: use `load_tokenizer` to get the exact masks back.
    """

    def apply_chat_template(self, conversation, *args, **kwargs):
        output = super().apply_chat_template(conversation, *args, **kwargs)
        if kwargs.get("return_assistant_tokens_mask"):
            header = self.encode(BOS_TOKEN + "assistant", add_special_tokens=False)
            batched = not isinstance(output["input_ids"][0], int)
            pairs = (output["input_ids"], output["assistant_masks"])
            rows = zip(*pairs, strict=True) if batched else [pairs]
            for ids, mask in rows:
                _unmask_after_header(_as_list(ids), mask, header)
        return output


def _as_list(ids) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def _unmask_after_header(ids: list[int], mask, header: list[int]) -> None:
    """Unmark, in place, the token right after each `<|im_start|>assistant`: it holds the header's newline."""
    n = len(header)
    for i in range(n, len(ids)):
        if ids[i - n : i] == header:
            mask[i] = 0


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> MiniMindTokenizer:
    """Load a local tokenizer directory (a `tokenizer.json` and its config) for MiniMind training.

    The original MiniMind2 template (or this project's earlier one) becomes `CHAT_TEMPLATE`, the original
    MiniMind-3 one `chat_templates.MINIMIND3_CHAT_TEMPLATE`: each renders identically to its original and marks
    what it supervises. A template with `{% generation %}` markers is kept, a missing one gets the template of
    the vocabulary's generation, and any other template is refused unless `chat_template` says what to do
    ("minimind2", "minimind3" or "keep"; see `chat_templates.training_template`). The pad token is set to
    `<|endoftext|>`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"not a tokenizer directory (no tokenizer.json): {path}")
    tokenizer = MiniMindTokenizer.from_pretrained(str(path), local_files_only=True)
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    tokenizer.chat_template = training_template(tokenizer.chat_template, chat_template, added, str(path))
    if PAD_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"{path}: the vocabulary has no {PAD_TOKEN} token")
    tokenizer.pad_token = PAD_TOKEN
    return tokenizer


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """How a trained model generates by default: until `<|im_end|>`, sampling as MiniMind's chat does."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.85,
        top_p=0.85,
        max_new_tokens=512,
    )
