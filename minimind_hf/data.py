"""MiniMind's JSON Lines data: validated line by line, tokenized once, loaded with `datasets` without reading files
into memory.

Formats (one JSON object per line, UTF-8):

- SFT: `{"conversations": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`; an optional
  system message comes first, then user and assistant alternate starting with user, and at least one
  assistant turn is required.
- Pretraining: `{"text": "..."}`.

What the recipes train on comes from `load_sft_tokenized` / `load_pretrain_tokenized`: one pass over the files
(`datasets` worker processes over line-aligned byte ranges, `num_proc`) parses, validates and tokenizes each line
into compact Arrow columns `input_ids` and `labels` (-100 where not supervised), cut to `max_length`, exactly as
TRL's `SFTTrainer` would tokenize the same conversations (chat template and assistant mask). `SFTTrainer` takes
such a dataset as already processed and only packs it. Each row keeps its file and line until loading is done, so
every problem is named as `file:line`. `load_sft_dataset` / `load_pretrain_dataset` give the raw `messages` /
`text` columns instead (evaluation, tools, TRL's own tokenization).

A bad line (not JSON, truncated, invalid UTF-8, a lone UTF-16 surrogate, the wrong schema) is a `DataError` naming
the file, the 1-based line and the problem, raised before anything is tokenized; with `skip_invalid=True` bad
lines are skipped, counted per problem and logged. Problems with a path itself (missing, a directory, no records)
always raise. An SFT conversation with no supervised token within `max_length` (a prompt that fills it) would
train on nothing: it is dropped, and the log counts such conversations and names the first few; with
`error_on_unsupervised=True` it is an error. What loading found is `dataset.load_report`.

Arrow caches are keyed on each file's path, size, mtime, ctime and inode (an edit that keeps the size and the
mtime still moves the ctime, which no user tool can set back), on the tokenizer and on `max_length`; a second run
on the same inputs opens its cache without reading the files.

Debug a loss mask from the command line:

    python -m minimind_hf.data show data/sft.jsonl --tokenizer data/tokenizer --line 3
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import transformers
from datasets import Dataset, Features, IterableDataset, List, Value
from datasets.io.generator import GeneratorDatasetInputStream
from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import has_generation_markers

from . import t2t
from .chat_templates import MINIMIND3_CHAT_TEMPLATE
from .errors import DataError
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
SFT_FEATURES = Features({"messages": List({"role": Value("string"), "content": Value("string")})})
PRETRAIN_FEATURES = Features({"text": Value("string")})
# Conversations per tokenizer call: one batched call is about 1.5x faster than one call per conversation.
ENCODE_BATCH = 256
# Input bytes below which another worker process costs more to start than it saves.
BYTES_PER_PROCESS = 4 << 20
# How many dropped or skipped lines the log names.
NAMED_IN_LOG = 5

PathLike = str | os.PathLike
Paths = PathLike | Sequence[PathLike]

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Invalid(Exception):
    def __init__(self, problem: str, detail: str):
        super().__init__(detail)
        self.problem, self.detail = problem, detail


@dataclass
class LoadReport:
    """What loading found: `skipped` counts the lines left out per problem kind (`"unsupervised"` for conversations
    dropped for having no supervised token within `max_length`), `skipped_lines` lists them per file."""

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
    if t2t.uses_t2t(conversations):
        # Tool calls, tool replies, reasoning (MiniMind-3's rows); plain rows keep MiniMind2's rules below.
        try:
            return {"messages": t2t.validate_messages(conversations)}
        except t2t.Invalid as invalid:
            raise _Invalid(invalid.problem, invalid.detail) from None
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


def _lone_surrogate(value: object, where: tuple = ()) -> tuple[tuple, str, int] | None:
    """(where, the character, its index) of the first lone UTF-16 surrogate in a parsed row's strings, or None."""
    if isinstance(value, str):
        match = _SURROGATE.search(value)
        return (where, match.group(), match.start()) if match else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, (*where, key))
        if found is not None:
            return found
    return None


def _describe(where: tuple) -> str:
    if len(where) == 3 and where[0] == "messages":
        return f"message {where[1]} {where[2]}"
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in where).lstrip(".")


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
    row = _PARSERS[kind](record)
    # JSON may spell half of a UTF-16 pair (`"\ud83d"`, common in scraped text); Python keeps it in the string, but
    # it is not text: the tokenizer and Arrow both refuse it. Only a line with such an escape can hold one.
    if _SURROGATE_ESCAPE.search(line):
        found = _lone_surrogate(row)
        if found is not None:
            where, char, index = found
            raise _Invalid(
                "lone_surrogate",
                f"lone surrogate \\u{ord(char):04x} in {_describe(where)} at character {index} "
                "(half of a UTF-16 pair, not text)",
            )
    return row


def _count_lines_before(f, offset: int) -> int:
    f.seek(0)
    count, left = 0, offset
    while left > 0:
        chunk = f.read(min(left, 1 << 22))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def _lines(path: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes, bool]]:
    """(1-based number, bytes, is the unterminated last line) of each non-blank line starting in [start, end)."""
    with open(path, "rb") as f:
        first = _count_lines_before(f, start) + 1 if start else 1
        f.seek(start)
        position = start
        for number, raw in enumerate(f, start=first):
            if end is not None and position >= end:
                break
            position += len(raw)
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


def _check_not_empty(path: Path) -> None:
    """A file of nothing but whitespace is an error even with `skip_invalid` (read up to its first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return
    raise DataError(path, None, "empty_file", "empty file (no records)")


def _encode_conversations(
    conversations: list[list[dict]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    draws: list[tuple[float, float, float]] | None = None,
    augment: dict | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each conversation, as TRL's `SFTTrainer` with `assistant_only_loss=True` builds them; with
    MiniMind-3's template, as the original's `SFTDataset` does (with `augment`'s ratios, drawn by `draws`)."""
    if tokenizer.chat_template == MINIMIND3_CHAT_TEMPLATE:
        # Rendered text, then tokens: the original's empty-think augmentation edits the text. Its labels equal the
        # template's assistant mask (tests/test_minimind3_template.py), augmentation aside.
        return t2t.encode_rendered(conversations, tokenizer, max_length, draws, **(augment or {}))
    if any(m.get("tools") for messages in conversations for m in messages):
        # `tools` is one argument for a whole batch: conversations with their own go one by one.
        return [pair for messages in conversations for pair in _encode_batch([messages], tokenizer, max_length)]
    return _encode_batch(conversations, tokenizer, max_length)


def _encode_batch(
    conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase, max_length: int | None
) -> list[tuple[list[int], list[int]]]:
    tools = next((m["tools"] for m in conversations[0] if m.get("tools")), None) if len(conversations) == 1 else None
    encoded = tokenizer.apply_chat_template(
        conversations, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    pairs = []
    for ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True):
        ids = list(ids[:max_length])
        pairs.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=False)]))
    return pairs


def encode_conversation(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int | None
) -> dict[str, list[int]]:
    """Token ids and labels (-100 where not supervised) of one conversation, as TRL's `SFTTrainer` with
    `assistant_only_loss=True` and this `max_length` builds them: the whole conversation is tokenized with
    the tokenizer's chat template and assistant mask, then cut to `max_length`. The recipes' datasets are
    made by the same function."""
    _check_template(tokenizer)
    ids, labels = _encode_conversations([messages], tokenizer, max_length)[0]
    return {"input_ids": ids, "labels": labels}


def _encode_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int | None, keep_eos_when_cut: bool = False
) -> list[list[int]]:
    """`<|im_start|>` + text tokens + `<|im_end|>`, cut to `max_length`: MiniMind2 keeps the end token only when
    the text fits; MiniMind-3 (`keep_eos_when_cut`) cuts the text to `max_length - 2` tokens and always ends it."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if keep_eos_when_cut and max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the begin and end tokens, got {max_length}")
        return [[bos, *ids[: max_length - 2], eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    # Cut here rather than with the tokenizer's `truncation`, which it would keep as state after the call.
    return [
        ([bos] + ids[:max_length] + [eos])[:max_length]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]


def _check_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not has_generation_markers(tokenizer.chat_template or ""):
        raise ValueError("the tokenizer's chat template has no {% generation %} markers: load it with load_tokenizer")


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
    check: Callable[[dict], None] | None = None,
) -> LoadReport:
    """Validate every line of `paths` as `kind` ("sft" or "pretrain"), streaming; see the module doc. `check(row)`
    may reject a parsed row by raising `InvalidRecord`."""
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
            for message in record["messages"]:
                yield message["content"]
                # MiniMind-3 rows: the thinking is text the tokenizer should learn too.
                if message.get("reasoning_content"):
                    yield message["reasoning_content"]


def _generate(files: list[tuple], skips: list[tuple[int, ...]], kind: str) -> Iterator[dict]:
    for (path, *_identity), skip in zip(files, skips, strict=True):
        skip = set(skip)
        for number, raw, unterminated in _lines(path):
            if number not in skip:
                row = _parse(raw, unterminated, kind)
                if kind == "sft" and any(set(m) - {"role", "content"} for m in row["messages"]):
                    raise DataError(
                        path,
                        number,
                        "t2t_fields",
                        "tools, tool_calls and reasoning_content are only loaded tokenized (load_sft_tokenized); "
                        "the messages column holds role and content",
                    )
                yield row


def _file_identity(path: Path) -> tuple:
    """What the caches are keyed on: an edit that keeps the size and the mtime (`os.utime`) still moves the ctime,
    which no user tool can set back, and a file replaced by another (rename, copy) has another inode."""
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)


def _load(
    paths: Paths, kind: str, streaming: bool, report: LoadReport | None = None, **scan_kwargs
) -> Dataset | IterableDataset:
    paths = _as_paths(paths)
    report = scan(paths, kind, **scan_kwargs) if report is None else report
    files = [_file_identity(p) for p in paths]
    skips = [tuple(report.skipped_lines.get(str(p), ())) for p in paths]
    # The files' identities are in the generator's kwargs, which datasets hashes into the cache key.
    gen_kwargs = {"files": files, "skips": skips, "kind": kind}
    if streaming:
        dataset = IterableDataset.from_generator(_generate, features=_FEATURES[kind], gen_kwargs=gen_kwargs)
    else:
        dataset = Dataset.from_generator(_generate, features=_FEATURES[kind], gen_kwargs=gen_kwargs)
    dataset.load_report = report
    return dataset


def load_sft_dataset(
    paths: Paths,
    *,
    skip_invalid: bool = False,
    streaming: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    error_on_unsupervised: bool = False,
) -> Dataset | IterableDataset:
    """SFT conversations from one or many `.jsonl` files as a `messages` column (TRL's conversational format);
    see the module doc.

    With `tokenizer` and `max_length`, the conversations `load_sft_tokenized` drops (no supervised token within
    `max_length`) are left out too, or are an error with `error_on_unsupervised`.
    """
    if (tokenizer is None) != (max_length is None):
        raise ValueError("leaving out unsupervised conversations needs both tokenizer and max_length")
    report = None
    if tokenizer is not None:
        report = load_sft_tokenized(
            paths, tokenizer, max_length, skip_invalid=skip_invalid, error_on_unsupervised=error_on_unsupervised
        ).load_report
    return _load(paths, "sft", streaming, report, skip_invalid=skip_invalid)


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


def _token_features(tokenizer: PreTrainedTokenizerBase) -> Features:
    """The narrowest integer types that hold every id (uint16 up to 65,536 tokens) and every label (int16 up to
    32,768, with -100): a quarter of the int64 lists a `map` would write."""
    vocab = len(tokenizer)
    ids = "uint16" if vocab <= 1 << 16 else "int32"
    labels = "int16" if vocab <= 1 << 15 else "int32"
    return Features(
        {
            "input_ids": List(Value(ids)),
            "labels": List(Value(labels)),
            "file": Value("int32"),
            "line": Value("int64"),
            "problem": Value("string"),
            "detail": Value("string"),
        }
    )


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return datasets.fingerprint.Hasher.hash(tokenizer)
    state = json.loads(backend.to_str())
    # Settings of the last call that the Rust tokenizer keeps; they do not change what the loaders encode.
    state.pop("truncation", None)
    state.pop("padding", None)
    # The tokenizer class's module holds code that decides masks (MiniMindTokenizer's rule after the header).
    module = Path(getattr(sys.modules[type(tokenizer).__module__], "__file__", "") or os.devnull)
    code = hashlib.sha256(module.read_bytes()).hexdigest()
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)]
    return json.dumps([state, tokenizer.chat_template, type(tokenizer).__qualname__, code, special], sort_keys=True)


def _fingerprint(paths: list[Path], kind: str, tokenizer: PreTrainedTokenizerBase, settings: list) -> str:
    digest = hashlib.sha256()
    # This module's code and t2t's decide the rows; transformers' renders the template and computes the masks.
    code = Path(__file__).read_bytes() + Path(t2t.__file__).read_bytes()
    for part in (code, transformers.__version__, kind, repr(settings)):
        digest.update(part if isinstance(part, bytes) else part.encode())
    digest.update(_tokenizer_identity(tokenizer).encode())
    digest.update(repr([_file_identity(p) for p in paths]).encode())
    return digest.hexdigest()[:32]


def _processes(paths: list[Path], num_proc: int | None) -> int:
    """`num_proc` worker processes (default: one per CPU), fewer where the input is too small to be worth them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = cpus if num_proc is None else max(1, num_proc)
    worth = -(-sum(p.stat().st_size for p in paths) // BYTES_PER_PROCESS)
    return max(1, min(wanted, worth))


def _line_start(path: Path, offset: int) -> int:
    """The first line start at or after `offset`."""
    if offset == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        f.readline()
        return f.tell()


def _byte_ranges(paths: list[Path], parts: int) -> list[list[tuple[str, int, int, int]]]:
    """The files cut into at most `parts` runs of about equal bytes, each a list of (path, file index, start, end)
    and every cut at a line start, in order: one run per worker process."""
    sizes = [p.stat().st_size for p in paths]
    total = sum(sizes)
    cuts = set()
    for k in range(1, parts):
        target, i = total * k // parts, 0
        while target >= sizes[i]:
            target -= sizes[i]
            i += 1
        offset = _line_start(paths[i], target)
        if offset >= sizes[i]:
            i, offset = i + 1, 0
        if i < len(paths) and (i, offset) != (0, 0):
            cuts.add((i, offset))
    bounds = [(0, 0), *sorted(cuts), (len(paths), 0)]
    runs = []
    for (first, start), (last, stop) in itertools.pairwise(bounds):
        run = []
        for i in range(first, min(last, len(paths) - 1) + 1):
            begin, end = (start if i == first else 0), (stop if i == last else sizes[i])
            if end > begin:
                run.append((str(paths[i]), i, begin, end))
        if run:
            runs.append(run)
    return runs


def _encoded_rows(
    pending: list, file: int, kind: str, tokenizer, max_length, assistant_only: bool, options: dict
) -> Iterator[dict]:
    parsed = [(number, record) for number, record in pending if not isinstance(record, _Invalid)]
    if not parsed:
        encoded = iter(())
    elif kind == "pretrain":
        texts = [r["text"] for _, r in parsed]
        encoded = ((ids, ids) for ids in _encode_texts(texts, tokenizer, max_length, options["keep_eos_when_cut"]))
    else:
        augment = options["augment"]
        draws = [t2t.row_draws(options["seed"], file, number) for number, _ in parsed] if augment else None
        conversations = [r["messages"] for _, r in parsed]
        encoded = iter(_encode_conversations(conversations, tokenizer, max_length, draws, augment))
    for number, record in pending:
        row = {"input_ids": [], "labels": [], "file": file, "line": number, "problem": None, "detail": None}
        if isinstance(record, _Invalid):
            row.update(problem=record.problem, detail=record.detail)
        else:
            ids, labels = next(encoded)
            if not assistant_only:
                labels = ids
            if all(label == IGNORE_INDEX for label in labels):
                row.update(problem="unsupervised", detail=f"no supervised token within max_length={max_length}")
            else:
                row.update(input_ids=ids, labels=labels)
        yield row


def _tokenized_rows(
    runs: list[list[tuple[str, int, int, int]]],
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    assistant_only: bool,
    options: dict,
) -> Iterator[dict]:
    """One row per line of each run, in order: its tokens, or the problem that keeps it out (with file and line)."""
    for run in runs:
        for path, file, start, end in run:
            pending = []
            for number, raw, unterminated in _lines(path, start, end):
                try:
                    pending.append((number, _parse(raw, unterminated, kind)))
                except _Invalid as invalid:
                    pending.append((number, invalid))
                if len(pending) == ENCODE_BATCH:
                    yield from _encoded_rows(pending, file, kind, tokenizer, max_length, assistant_only, options)
                    pending = []
            yield from _encoded_rows(pending, file, kind, tokenizer, max_length, assistant_only, options)


def _named(rows: list[dict], paths: list[Path]) -> str:
    named = ", ".join(f"{paths[row['file']]}:{row['line']}" for row in rows[:NAMED_IN_LOG])
    return named + (f" and {len(rows) - NAMED_IN_LOG} more" if len(rows) > NAMED_IN_LOG else "")


def _tokenized(
    paths: Paths,
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    *,
    skip_invalid: bool,
    error_on_unsupervised: bool,
    num_proc: int | None,
    assistant_only: bool = True,
    options: dict | None = None,
) -> Dataset:
    paths = _as_paths(paths)
    for path in paths:
        _check_not_empty(path)
    if kind == "sft" and assistant_only:
        _check_template(tokenizer)
    options = {"augment": None, "seed": 0, "keep_eos_when_cut": False, **(options or {})}
    if options["augment"] and tokenizer.chat_template != MINIMIND3_CHAT_TEMPLATE:
        raise ValueError(
            "add_system_ratio and empty_think_ratio are MiniMind-3's augmentations: they need its chat template"
        )
    runs = _byte_ranges(paths, _processes(paths, num_proc))
    stream = GeneratorDatasetInputStream(
        generator=_tokenized_rows,
        features=_token_features(tokenizer),
        gen_kwargs={
            "runs": runs,
            "kind": kind,
            "tokenizer": tokenizer,
            "max_length": max_length,
            "assistant_only": assistant_only,
            "options": options,
        },
        num_proc=len(runs) if len(runs) > 1 else None,
        fingerprint=_fingerprint(paths, kind, tokenizer, [max_length, assistant_only, sorted(options.items())]),
    )
    # Malformed lines are reported before anything is tokenized, by a scan that only parses (about 1/20 of the
    # cost of tokenizing). A cached dataset already holds every line's problem, and needs no scan.
    if not skip_invalid and not Path(stream.builder.cache_dir, datasets.config.DATASET_INFO_FILENAME).is_file():
        scan(paths, kind)
    dataset = stream.read()

    problems = dataset.with_format("arrow")["problem"]
    bad = np.flatnonzero(problems.is_valid().to_numpy(zero_copy_only=False))
    report = LoadReport(lines=len(dataset), loaded=len(dataset) - len(bad))
    columns = ["file", "line", "problem", "detail"]
    rows = dataset.with_format("arrow")[bad.tolist()].select(columns).to_pylist() if len(bad) else []
    for row in rows:
        if (row["problem"] == "unsupervised" and error_on_unsupervised) or (
            row["problem"] != "unsupervised" and not skip_invalid
        ):
            raise DataError(paths[row["file"]], row["line"], row["problem"], row["detail"])
        report.skipped[row["problem"]] += 1
        report.skipped_lines.setdefault(str(paths[row["file"]]), []).append(row["line"])
    invalid = [row for row in rows if row["problem"] != "unsupervised"]
    dropped = [row for row in rows if row["problem"] == "unsupervised"]
    if invalid:
        kinds = ", ".join(f"{n} {problem}" for problem, n in Counter(r["problem"] for r in invalid).most_common())
        logger.warning(
            "skipped %d invalid lines of %d (%s): %s", len(invalid), len(dataset), kinds, _named(invalid, paths)
        )
    if dropped:
        logger.warning(
            "dropped %d of %d conversations with no supervised token within max_length=%s (the prompt fills it; "
            "error_on_unsupervised: true makes this an error): %s",
            len(dropped),
            len(dataset),
            max_length,
            _named(dropped, paths),
        )
    if report.loaded == 0:
        where = ", ".join(str(p) for p in paths)
        raise DataError(where, None, "no_records", f"no usable records: all {len(dataset)} lines were left out")
    if len(bad):
        dataset = dataset.select(np.setdiff1d(np.arange(len(dataset)), bad))
    dataset = dataset.select_columns(["input_ids", "labels"])
    dataset.load_report = report
    return dataset


def load_sft_tokenized(
    paths: Paths,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    *,
    skip_invalid: bool = False,
    error_on_unsupervised: bool = False,
    num_proc: int | None = None,
    assistant_only_loss: bool = True,
    add_system_ratio: float = 0.0,
    empty_think_ratio: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """SFT conversations as `input_ids` and `labels`, tokenized once as TRL's `SFTTrainer` tokenizes them (the
    chat template, the assistant mask, cut to `max_length`), ready for `SFTTrainer` to pack; see the module doc.

    A conversation with no supervised token within `max_length` is dropped and named in the log, or is a
    `DataError` with `error_on_unsupervised`. `num_proc` worker processes tokenize (default: one per CPU, fewer
    for small files). Without `assistant_only_loss` every token is a target.

    With MiniMind-3's chat template, rows are built as the original's `SFTDataset` builds them (`t2t`), and its
    augmentations can be switched on: `add_system_ratio` (a share of rows with no system message and no tools
    gets one of its ten system prompts; the original trains with 0.2) and `empty_think_ratio` (the share of rows
    that keep their empty think blocks; 0.2 in the original, 1.0 keeps all). Rows draw from a hash of `seed`,
    file and line, once per run: the same seed gives the same rows.
    """
    for name, ratio in (("add_system_ratio", add_system_ratio), ("empty_think_ratio", empty_think_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {ratio}")
    augment = None
    if add_system_ratio > 0 or empty_think_ratio < 1:
        augment = {"add_system_ratio": add_system_ratio, "empty_think_ratio": empty_think_ratio}
    return _tokenized(
        paths,
        "sft",
        tokenizer,
        max_length,
        skip_invalid=skip_invalid,
        error_on_unsupervised=error_on_unsupervised,
        num_proc=num_proc,
        assistant_only=assistant_only_loss,
        options={"augment": augment, "seed": seed},
    )


def load_pretrain_tokenized(
    paths: Paths,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    *,
    skip_invalid: bool = False,
    num_proc: int | None = None,
    keep_eos_when_cut: bool = False,
) -> Dataset:
    """Pretraining texts as `input_ids` = `<|im_start|>` + text tokens + `<|im_end|>`, cut to `max_length`, and
    `labels` equal to them: every token is a target. One pass, like `load_sft_tokenized`. MiniMind2 keeps the end
    token only when the text fits; MiniMind-3 (`keep_eos_when_cut=True`) keeps it always, after at most
    `max_length - 2` text tokens."""
    return _tokenized(
        paths,
        "pretrain",
        tokenizer,
        max_length,
        skip_invalid=skip_invalid,
        error_on_unsupervised=False,
        num_proc=num_proc,
        assistant_only=False,
        options={"keep_eos_when_cut": keep_eos_when_cut},
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
    if args.max_length is not None and args.max_length < 1:
        parser.error(f"--max_length must be positive, got {args.max_length}")
    try:
        _show(args)
    except (OSError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
