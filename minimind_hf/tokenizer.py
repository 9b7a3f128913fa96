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

from .chat_templates import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    training_template,
)

__all__ = ["BOS_TOKEN", "CHAT_TEMPLATE", "DEFAULT_SYSTEM_PROMPT", "EOS_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS"]


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
