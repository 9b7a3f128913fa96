"""Train a MiniMind tokenizer: byte-level BPE on the `text` fields and conversation contents of JSON Lines.

    python recipes/tokenizer.py --config recipes/tokenizer.yaml [--files a.jsonl b.jsonl] [--vocab_size 6400]

Writes a `PreTrainedTokenizerFast` directory with the ChatML training template of `minimind_hf.tokenizer`:
`<|endoftext|>` = 0 (pad, unk), `<|im_start|>` = 1 (bos), `<|im_end|>` = 2 (eos), nothing added by plain
encoding. The vocabulary can come out smaller than `vocab_size` on a small corpus.

`style: minimind3` makes a MiniMind-3 style tokenizer instead: its 21 special tokens at ids 0-20 (the three above,
then Qwen-style placeholders), `<tool_call>`, `</tool_call>`, `<tool_response>`, `</tool_response>`, `<think>`,
`</think>` at 21-26 and `<|buffer1|>`..`<|buffer9|>` at 27-35 as added tokens that are not special (decoding with
`skip_special_tokens` keeps them), and MiniMind-3's marked chat template.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minimind_hf.chat_templates import (
    MINIMIND3_BUFFER_TOKENS,
    MINIMIND3_CHAT_TEMPLATE,
    MINIMIND3_SPECIAL_TOKENS,
    MINIMIND3_TAG_TOKENS,
)
from minimind_hf.checks import check_value_types
from minimind_hf.data import iter_texts
from minimind_hf.errors import MiniMindError, RecipeError
from minimind_hf.tokenizer import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
from minimind_hf.training import parse_recipe, run_cli

# Byte-level BPE starts from the 256 byte symbols; the special tokens come on top.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

STYLES = ("minimind2", "minimind3")


@dataclass
class TokenizerArguments:
    files: list[str] = field(default_factory=list, metadata={"help": "JSON Lines corpora"})
    output_dir: str = field(default="data/tokenizer", metadata={"help": "where to save the tokenizer"})
    vocab_size: int = field(default=6400, metadata={"help": "vocabulary size, special tokens included"})
    style: str = field(
        default="minimind2",
        metadata={"help": "minimind2 (3 special tokens, ChatML) or minimind3 (its 36 added tokens and template)"},
    )


def check(args: TokenizerArguments) -> None:
    """Every value, before the corpus is read: a bad one would otherwise fail after training, or inside the Rust
    trainer with a traceback."""
    check_value_types(args)
    if not args.files:
        raise RecipeError("files: no corpus given; name at least one JSON Lines file")
    for name in args.files:
        if not Path(name).is_file():
            raise RecipeError(f"files: {name}: {'is a directory' if Path(name).is_dir() else 'no such file'}")
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise RecipeError(
            f"vocab_size: must be at least {MIN_VOCAB_SIZE} (256 bytes and {len(SPECIAL_TOKENS)} special tokens), "
            f"got {args.vocab_size}"
        )
    out = Path(args.output_dir)
    if not args.output_dir.strip() or (out.exists() and not out.is_dir()):
        raise RecipeError(f"output_dir: {args.output_dir!r} is not a directory one can write to")
    if args.style not in STYLES:
        raise RecipeError(f"style: must be one of {', '.join(STYLES)}, got {args.style!r}")


def train(args: TokenizerArguments) -> PreTrainedTokenizerFast:
    check(args)
    minimind3 = args.style == "minimind3"
    # The trainer gives its special tokens the first ids, in order, and never merges across them.
    added = MINIMIND3_SPECIAL_TOKENS + MINIMIND3_TAG_TOKENS + MINIMIND3_BUFFER_TOKENS if minimind3 else SPECIAL_TOKENS
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(iter_texts(args.files), trainer=trainer)
    if minimind3:
        # The trainer marks all of them special; MiniMind-3's tags and buffers are not (as in its tokenizer.json).
        state = json.loads(backend.to_str())
        for token in state["added_tokens"]:
            token["special"] = token["content"] in MINIMIND3_SPECIAL_TOKENS
        backend = Tokenizer.from_str(json.dumps(state))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        chat_template=MINIMIND3_CHAT_TEMPLATE if minimind3 else CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        **({"extra_special_tokens": MINIMIND3_SPECIAL_TOKENS[3:]} if minimind3 else {}),
    )
    tokenizer.save_pretrained(args.output_dir)
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    # The recipes' parser: unknown and duplicate keys are errors naming them, as in the training recipes.
    (args,) = parse_recipe((TokenizerArguments,), argv)
    try:
        tokenizer = train(args)
    except MiniMindError:
        raise
    except (OSError, ValueError) as err:  # a corpus line that is not JSON, an unwritable output_dir, ...
        raise RecipeError(str(err)) from err
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.output_dir}")


if __name__ == "__main__":
    run_cli(main)
