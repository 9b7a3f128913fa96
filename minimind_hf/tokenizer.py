"""MiniMind's tokenizer and ChatML chat template, made ready for assistant-only SFT loss.

`CHAT_TEMPLATE` renders byte for byte what the original MiniMind template renders for system / user /
assistant conversations, and wraps what is supervised in `{% generation %}`: an assistant turn's content,
its `<|im_end|>` and the `\\n` after it. transformers turns those character spans into
`assistant_masks`, which is what TRL's `SFTTrainer(assistant_only_loss=True)` trains on.

One case needs more than the template. transformers marks every token that overlaps a generation span, but
byte-level BPE can merge the header's `\\n` with leading spaces of the content (`"assistant\\n  hi"` gives
the token `"\\n "`), and the original MiniMind never supervises the token right after
`<|im_start|>assistant`. `MiniMindTokenizer` therefore unmarks that token in `apply_chat_template`, so
TRL's own tokenization reproduces the original loss mask exactly (checked against the reference fixture).
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{{- content + '<|im_end|>\\n' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


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


def has_generation_markers(chat_template: str | None) -> bool:
    return bool(chat_template) and _GENERATION_MARKER.search(chat_template) is not None


def load_tokenizer(path: str | Path) -> MiniMindTokenizer:
    """Load a local tokenizer directory (a `tokenizer.json` and its config) for MiniMind training.

    A chat template without `{% generation %}` markers (the original MiniMind one) is replaced by
    `CHAT_TEMPLATE`, which renders identically for plain conversations (the original's tool-calling
    branch is dropped). The pad token is set to `<|endoftext|>`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"not a tokenizer directory (no tokenizer.json): {path}")
    tokenizer = MiniMindTokenizer.from_pretrained(str(path), local_files_only=True)
    if not has_generation_markers(tokenizer.chat_template):
        tokenizer.chat_template = CHAT_TEMPLATE
    if PAD_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"{path}: the vocabulary has no {PAD_TOKEN} token")
    tokenizer.pad_token = PAD_TOKEN
    return tokenizer
