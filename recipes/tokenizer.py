"""Train a MiniMind tokenizer: byte-level BPE on the `text` fields and conversation contents of JSON Lines.

    python recipes/tokenizer.py --config recipes/tokenizer.yaml [--files a.jsonl b.jsonl] [--vocab_size 6400]

Writes a `PreTrainedTokenizerFast` directory with the ChatML training template of `minimind_hf.tokenizer`:
`<|endoftext|>` = 0 (pad, unk), `<|im_start|>` = 1 (bos), `<|im_end|>` = 2 (eos), nothing added by plain
encoding. The vocabulary can come out smaller than `vocab_size` on a small corpus.
"""

from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from trl import TrlParser

from minimind_hf.data import iter_texts
from minimind_hf.tokenizer import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS


@dataclass
class TokenizerArguments:
    files: list[str] = field(default_factory=list, metadata={"help": "JSON Lines corpora"})
    output_dir: str = field(default="data/tokenizer", metadata={"help": "where to save the tokenizer"})
    vocab_size: int = field(default=6400, metadata={"help": "vocabulary size, special tokens included"})


def train(args: TokenizerArguments) -> PreTrainedTokenizerFast:
    if not args.files:
        raise ValueError("no corpus given: set `files`")
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


def main() -> None:
    (args,) = TrlParser(TokenizerArguments).parse_args_and_config()
    tokenizer = train(args)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.output_dir}")


if __name__ == "__main__":
    main()
