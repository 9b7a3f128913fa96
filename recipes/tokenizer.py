"""Train a MiniMind tokenizer: byte-level BPE on the `text` fields and conversation contents of JSON Lines.

    python recipes/tokenizer.py --config recipes/tokenizer.yaml [--files a.jsonl b.jsonl] [--vocab_size 6400]

Writes a `PreTrainedTokenizerFast` directory with the ChatML training template of `minimind_hf.tokenizer`:
`<|endoftext|>` = 0 (pad, unk), `<|im_start|>` = 1 (bos), `<|im_end|>` = 2 (eos), nothing added by plain
encoding. The vocabulary can come out smaller than `vocab_size` on a small corpus.
"""

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minimind_hf.checks import check_value_types
from minimind_hf.data import iter_texts
from minimind_hf.errors import MiniMindError, RecipeError
from minimind_hf.tokenizer import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
from minimind_hf.training import parse_recipe, run_cli

# Byte-level BPE starts from the 256 byte symbols; the special tokens come on top.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@dataclass
class TokenizerArguments:
    files: list[str] = field(default_factory=list, metadata={"help": "JSON Lines corpora"})
    output_dir: str = field(default="data/tokenizer", metadata={"help": "where to save the tokenizer"})
    vocab_size: int = field(default=6400, metadata={"help": "vocabulary size, special tokens included"})


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


def train(args: TokenizerArguments) -> PreTrainedTokenizerFast:
    check(args)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(iter_texts(args.files), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
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
