"""MiniMind's JSON Lines data, validated and loaded with `datasets` without reading files into memory.

Formats (one JSON object per line, UTF-8):

- SFT: `{"conversations": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`; an optional
  system message comes first, then user and assistant alternate starting with user, and at least one
  assistant turn is required. Loaded as a single column `messages`, the conversational format that TRL's
  `SFTTrainer` consumes.
- Pretraining: `{"text": "..."}`, loaded as a column `text`.

Loading first scans every file line by line (constant memory) and raises a `DataError` naming the file,
the 1-based line and the problem, before any Arrow file is written or any training starts. With
`skip_invalid=True` bad lines are skipped instead, and the counts per problem are logged and attached to
the returned dataset as `dataset.load_report`. Problems with a path itself (missing, a directory, no
records) always raise. The records are then produced by a generator through `Dataset.from_generator`
(cached as Arrow, keyed by each file's path, size and mtime) or `IterableDataset.from_generator`.

SFT samples whose supervised tokens all fall past `max_length` would train on nothing (TRL silently drops
them). `load_sft_dataset` finds them at load time when given `tokenizer` and `max_length`: the check needs
the tokenizer, and doing it there keeps every data problem in one report with its file and line.

Debug a loss mask from the command line:

    python -m minimind_hf.data show data/sft.jsonl --tokenizer data/tokenizer --line 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, Features, IterableDataset, List, Value
from transformers import PreTrainedTokenizerBase

from .tokenizer import has_generation_markers, load_tokenizer

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
SFT_FEATURES = Features({"messages": List({"role": Value("string"), "content": Value("string")})})
PRETRAIN_FEATURES = Features({"text": Value("string")})

PathLike = str | os.PathLike
Paths = PathLike | Sequence[PathLike]


class DataError(ValueError):
    """A data file or line that cannot be used; `problem` is a short kind such as `"not_json"`."""

    def __init__(self, path: PathLike, line: int | None, problem: str, detail: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {detail}")


class _Invalid(Exception):
    def __init__(self, problem: str, detail: str):
        super().__init__(detail)
        self.problem, self.detail = problem, detail


@dataclass
class LoadReport:
    """What loading found: `skipped` counts lines per problem kind, `skipped_lines` lists them per file."""

    lines: int = 0
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_lines: dict[str, list[int]] = field(default_factory=dict)


def _conversation(record: dict) -> dict:
    conversations = record.get("conversations")
    if conversations is None:
        raise _Invalid("missing_field", 'no "conversations" field')
    if not isinstance(conversations, list) or not conversations:
        raise _Invalid("bad_conversations", '"conversations" is not a non-empty list')
    for i, message in enumerate(conversations):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _Invalid("bad_message", f"message {i} is not an object with role and content")
        if message["role"] not in ROLES:
            raise _Invalid("bad_role", f"message {i} has role {message['role']!r}, not one of {ROLES}")
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            raise _Invalid("bad_content", f"message {i} content is of type {kind}, not a string")
    roles = [message["role"] for message in conversations]
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != expected:
            raise _Invalid("bad_order", f"message {i} is {roles[i]!r} where {expected!r} was expected")
    if "assistant" not in roles:
        raise _Invalid("no_assistant", "no assistant turn")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in conversations]}


def _text(record: dict) -> dict:
    if "text" not in record:
        raise _Invalid("missing_field", 'no "text" field')
    if not isinstance(record["text"], str):
        raise _Invalid("bad_content", f'"text" is a {type(record["text"]).__name__}, not a string')
    return {"text": record["text"]}


_PARSERS: dict[str, Callable[[dict], dict]] = {
    "sft": _conversation,
    "pretrain": _text,
    "any": lambda record: _conversation(record) if "conversations" in record else _text(record),
}
_FEATURES: dict[str, Features] = {"sft": SFT_FEATURES, "pretrain": PRETRAIN_FEATURES}

# The public name of the per-line problem a parser registered with `register_format` raises.
InvalidRecord = _Invalid


def register_format(kind: str, parse: Callable[[dict], dict], features: Features) -> None:
    """Another kind of JSON Lines row (DPO pairs: `minimind_hf/dpo.py`), validated and loaded like SFT data by
    `load_records`: `parse(record)` returns the row or raises `InvalidRecord(problem, detail)`, which becomes a
    `file:line` error, or a counted skip with `skip_invalid`."""
    _PARSERS[kind] = parse
    _FEATURES[kind] = features


def conversation_messages(conversations: object) -> list[dict]:
    """The SFT rules for a list of messages (roles, order, an assistant turn): the messages, or `InvalidRecord`."""
    return _conversation({"conversations": conversations})["messages"]


def _parse(raw: bytes, last_without_newline: bool, kind: str) -> dict:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Invalid("invalid_utf8", f"invalid UTF-8 at byte {error.start} of the line") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        if last_without_newline:
            raise _Invalid("truncated", f"truncated last line (no newline at end of file): {error}") from None
        raise _Invalid("not_json", f"not JSON: {error}") from None
    if not isinstance(record, dict):
        raise _Invalid("not_object", f"a JSON {type(record).__name__}, not an object")
    return _PARSERS[kind](record)


def _lines(path: str) -> Iterator[tuple[int, bytes, bool]]:
    """(1-based number, bytes, is the unterminated last line) of each non-blank line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw, not raw.endswith(b"\n")


def _as_paths(paths: Paths) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("no data files given")
    paths = [Path(item) for item in items]
    for path in paths:
        if not path.exists():
            raise DataError(path, None, "missing", "no such file")
        if path.is_dir():
            raise DataError(path, None, "directory", "is a directory, not a JSON Lines file")
    return paths


def encode_conversation(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int | None
) -> dict[str, list[int]]:
    """Token ids and labels (-100 where not supervised) of one conversation, as TRL's `SFTTrainer` with
    `assistant_only_loss=True` and this `max_length` builds them: the whole conversation is tokenized with
    the tokenizer's chat template and assistant mask, then cut to `max_length`."""
    if not has_generation_markers(tokenizer.chat_template):
        raise ValueError("the tokenizer's chat template has no {% generation %} markers: load it with load_tokenizer")
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(encoded["input_ids"])
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, encoded["assistant_masks"], strict=True)]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _supervision_check(tokenizer: PreTrainedTokenizerBase, max_length: int) -> Callable[[dict], None]:
    def check(record: dict) -> None:
        messages = record["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reply = messages[first]["content"]
        prompt = tokenizer.apply_chat_template(messages[:first], tokenize=False, add_generation_prompt=True)
        # A token covers at least one byte, so a short prompt (plus the reply's leading whitespace, which
        # can merge into the header's last token) cannot push the first supervised token past max_length:
        # rendering without tokenizing is much cheaper than the exact check below.
        if len((prompt + reply[: len(reply) - len(reply.lstrip())]).encode()) < max_length:
            return
        # Up to the first assistant turn is enough: its tokens are a prefix of the whole conversation's.
        labels = encode_conversation(messages[: first + 1], tokenizer, max_length)["labels"]
        if all(label == IGNORE_INDEX for label in labels):
            raise _Invalid("unsupervised", f"no supervised token within max_length={max_length}")

    return check


def _read(paths: list[Path], kind: str, check=None) -> Iterator[tuple[Path, int, dict | _Invalid]]:
    for path in paths:
        empty = True
        for number, raw, unterminated in _lines(str(path)):
            empty = False
            try:
                record = _parse(raw, unterminated, kind)
                if check is not None:
                    check(record)
            except _Invalid as invalid:
                record = invalid
            yield path, number, record
        if empty:
            raise DataError(path, None, "empty_file", "empty file (no records)")


def scan(
    paths: Paths,
    kind: str,
    *,
    skip_invalid: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    check: Callable[[dict], None] | None = None,
) -> LoadReport:
    """Validate every line of `paths` as `kind` ("sft" or "pretrain"), streaming; see the module doc. `check(row)`
    may reject a parsed row by raising `InvalidRecord` (the SFT supervision check when given tokenizer and
    max_length)."""
    if (tokenizer is None) != (max_length is None):
        raise ValueError("the supervision check needs both tokenizer and max_length")
    check = _supervision_check(tokenizer, max_length) if tokenizer is not None else check
    report = LoadReport()
    for path, number, record in _read(_as_paths(paths), kind, check):
        report.lines += 1
        if not isinstance(record, _Invalid):
            report.loaded += 1
        elif skip_invalid:
            report.skipped[record.problem] += 1
            report.skipped_lines.setdefault(str(path), []).append(number)
        else:
            raise DataError(path, number, record.problem, record.detail)
    if report.skipped:
        logger.warning(
            "skipped %d of %d lines: %s",
            sum(report.skipped.values()),
            report.lines,
            ", ".join(f"{n} {problem}" for problem, n in report.skipped.most_common()),
        )
    return report


def iter_texts(paths: Paths) -> Iterator[str]:
    """Each `text` and each message content of JSON Lines files of either kind (a tokenizer corpus)."""
    for path, number, record in _read(_as_paths(paths), "any"):
        if isinstance(record, _Invalid):
            raise DataError(path, number, record.problem, record.detail)
        if "text" in record:
            yield record["text"]
        else:
            yield from (message["content"] for message in record["messages"])


def _generate(files: list[tuple[str, int, int]], skips: list[tuple[int, ...]], kind: str) -> Iterator[dict]:
    for (path, _size, _mtime), skip in zip(files, skips, strict=True):
        skip = set(skip)
        for number, raw, unterminated in _lines(path):
            if number not in skip:
                yield _parse(raw, unterminated, kind)


def _load(paths: Paths, kind: str, streaming: bool, **scan_kwargs) -> Dataset | IterableDataset:
    paths = _as_paths(paths)
    report = scan(paths, kind, **scan_kwargs)
    files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    skips = [tuple(report.skipped_lines.get(str(p), ())) for p in paths]
    features = _FEATURES[kind]
    # Size and mtime are in the generator's kwargs, which datasets hashes into the cache key.
    gen_kwargs = {"files": files, "skips": skips, "kind": kind}
    if streaming:
        dataset = IterableDataset.from_generator(_generate, features=features, gen_kwargs=gen_kwargs)
    else:
        dataset = Dataset.from_generator(_generate, features=features, gen_kwargs=gen_kwargs)
    dataset.load_report = report
    return dataset


def load_sft_dataset(
    paths: Paths,
    *,
    skip_invalid: bool = False,
    streaming: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
) -> Dataset | IterableDataset:
    """SFT conversations from one or many `.jsonl` files as a `messages` column; see the module doc.

    With `tokenizer` and `max_length`, a conversation with no supervised token within `max_length` is an
    error too (problem `"unsupervised"`), or is skipped and counted with `skip_invalid`.
    """
    return _load(paths, "sft", streaming, skip_invalid=skip_invalid, tokenizer=tokenizer, max_length=max_length)


def load_pretrain_dataset(
    paths: Paths, *, skip_invalid: bool = False, streaming: bool = False
) -> Dataset | IterableDataset:
    """Pretraining texts from one or many `.jsonl` files as a `text` column; see the module doc."""
    return _load(paths, "pretrain", streaming, skip_invalid=skip_invalid)


def load_records(
    paths: Paths,
    kind: str,
    *,
    skip_invalid: bool = False,
    streaming: bool = False,
    check: Callable[[dict], None] | None = None,
) -> Dataset | IterableDataset:
    """Rows of a format added with `register_format`, validated (and `check`ed) line by line like SFT data."""
    return _load(paths, kind, streaming, skip_invalid=skip_invalid, check=check)


def _tokenize_texts(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    texts = tokenizer(batch["text"], add_special_tokens=False, truncation=True, max_length=max_length)
    return {"input_ids": [([bos] + ids + [eos])[:max_length] for ids in texts["input_ids"]]}


def tokenize_pretrain(
    dataset: Dataset | IterableDataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Dataset | IterableDataset:
    """`input_ids` = `<|im_start|>` + text tokens + `<|im_end|>`, cut to `max_length` (the end token is
    kept only when the text fits). Every token is a training target."""
    return dataset.map(
        _tokenize_texts,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=["text"],
    )


def _show(args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer(args.tokenizer)
    with open(args.file, "rb") as f:
        raw = next(itertools.islice(f, args.line - 1, None), None)
    if raw is None:
        raise DataError(args.file, args.line, "missing_line", "no such line")
    try:
        messages = _parse(raw, not raw.endswith(b"\n"), "sft")["messages"]
    except _Invalid as invalid:
        raise DataError(args.file, args.line, invalid.problem, invalid.detail) from None
    total = len(encode_conversation(messages, tokenizer, None)["input_ids"])
    encoded = encode_conversation(messages, tokenizer, args.max_length)
    tokens = list(zip(encoded["input_ids"], encoded["labels"], strict=True))
    opening, closing = ("\033[1;32m", "\033[0m") if sys.stdout.isatty() else ("[[", "]]")
    print(
        f"{args.file}:{args.line}: {total} tokens, {len(tokens)} within max_length={args.max_length}, "
        f"{sum(label != IGNORE_INDEX for _, label in tokens)} supervised ({opening}marked{closing})"
    )
    for supervised, group in itertools.groupby(tokens, key=lambda token: token[1] != IGNORE_INDEX):
        text = tokenizer.decode([token_id for token_id, _ in group], skip_special_tokens=False)
        print(f"{opening}{text}{closing}" if supervised else text, end="")
    print(f"\n... {total - len(tokens)} more tokens cut by max_length" if total > len(tokens) else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimind_hf.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print one conversation with its supervised tokens marked")
    show.add_argument("file")
    show.add_argument("--tokenizer", required=True, help="tokenizer directory")
    show.add_argument("--line", type=int, default=1, help="1-based line number (default 1)")
    show.add_argument("--max_length", type=int, default=None, help="truncation length (default: none)")
    args = parser.parse_args(argv)
    if args.line < 1:
        parser.error("--line counts from 1")
    try:
        _show(args)
    except (OSError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
