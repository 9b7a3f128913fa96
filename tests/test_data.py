"""Loading and validating JSON Lines, the tokenized views TRL trains on, and the sample data generator."""

import json
import logging
import os
import re
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from datasets import Dataset, IterableDataset
from datasets.exceptions import DatasetGenerationError
from transformers import LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

import minimind_hf.data as data_module
from minimind_hf.data import (
    IGNORE_INDEX,
    DataError,
    encode_conversation,
    load_pretrain_dataset,
    load_pretrain_tokenized,
    load_sft_dataset,
    load_sft_tokenized,
    main,
)
from minimind_hf.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("datasets_cache")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data"
TASKS = {"capital", "colour", "sound", "parity", "compare", "add", "convert", "count"}


def chat(*contents: str, system: str | None = None) -> dict:
    roles = ["user", "assistant"] * len(contents)
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)]
    return {"conversations": ([{"role": "system", "content": system}] if system else []) + messages}


GOOD = [chat("hi", "hello"), chat("2+2?", "4", "and 3+3?", "6", system="Be brief."), chat("x", "")]


def jsonl(*rows) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tokenizer(project_tokenizer_dir):
    return load_tokenizer(project_tokenizer_dir)


BAD_SFT_LINES = {
    "not_json": b'{"conversations": [',
    "not_object": b"[1, 2]",
    "missing_field": json.dumps({"messages": GOOD[0]["conversations"]}).encode(),
    "bad_conversations": json.dumps({"conversations": []}).encode(),
    "bad_message": json.dumps({"conversations": ["hi"]}).encode(),
    "bad_role": json.dumps({"conversations": [{"role": "tool", "content": "x"}]}).encode(),
    "bad_content": json.dumps({"conversations": [{"role": "user", "content": ["x"]}]}).encode(),
    "bad_order": json.dumps(
        {"conversations": [*GOOD[0]["conversations"], {"role": "system", "content": "s"}]}
    ).encode(),
    "no_assistant": json.dumps(chat("only a question")).encode(),
    "invalid_utf8": b'{"conversations": "\xff\xfe"}',
    # Half of a UTF-16 pair spelled as a JSON escape, as scraped text often has it.
    "lone_surrogate": json.dumps(chat("hi \ud83d", "x")).encode(),
}


@pytest.mark.parametrize("problem", sorted(BAD_SFT_LINES))
def test_bad_sft_line_names_file_line_and_problem(tmp_path, tokenizer, problem):
    path = write(tmp_path / "sft.jsonl", jsonl(GOOD[0], GOOD[1], BAD_SFT_LINES[problem], GOOD[2]))
    for load in (load_sft_dataset, lambda *a, **k: load_sft_tokenized(*a, tokenizer=tokenizer, max_length=64, **k)):
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: ") as error:
            load(path)
        assert (error.value.path, error.value.line, error.value.problem) == (str(path), 3, problem)

        dataset = load([path], skip_invalid=True)
        assert dataset.load_report.skipped == {problem: 1}
        assert dataset.load_report.skipped_lines == {str(path): [3]}
        assert len(dataset) == len(GOOD)
    assert [row["messages"] for row in load_sft_dataset(path, skip_invalid=True)] == [g["conversations"] for g in GOOD]
    expected = [encode_conversation(good["conversations"], tokenizer, 64) for good in GOOD]
    assert load_sft_tokenized(path, tokenizer, 64, skip_invalid=True).to_list() == expected


def test_lone_surrogate_is_a_bad_line_and_a_surrogate_pair_is_text(tmp_path, tokenizer):
    """`"\\ud83d"` alone is half of an emoji: a named bad line (not a tokenizer traceback); `"\\ud83d\\ude00"` is 😀."""
    lone = b'{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok \\ud83d!"}]}'
    pair = b'{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\ud83d\\ude00"}]}'
    path = write(tmp_path / "sft.jsonl", jsonl(pair, lone))
    message = rf"^{re.escape(str(path))}:2: lone surrogate \\ud83d in message 1 content at character 3 \(half of"
    with pytest.raises(DataError, match=message):
        load_sft_tokenized(path, tokenizer, 64)
    dataset = load_sft_tokenized(path, tokenizer, 64, skip_invalid=True)
    assert dataset.load_report.skipped == {"lone_surrogate": 1} and len(dataset) == 1
    assert "😀" in tokenizer.decode(dataset[0]["input_ids"])

    texts = write(tmp_path / "pretrain.jsonl", jsonl({"text": "fine"}, b'{"text": "\\udc00 tail"}'))
    with pytest.raises(DataError, match=r"pretrain.jsonl:2: lone surrogate \\udc00 in text at character 0"):
        load_pretrain_dataset(texts)
    assert load_pretrain_tokenized(texts, tokenizer, 16, skip_invalid=True).load_report.skipped == {"lone_surrogate": 1}


@pytest.mark.parametrize(
    "roles",
    [["assistant", "user"], ["user", "user", "assistant"], ["user", "assistant", "assistant"], ["system"]],
)
def test_roles_out_of_order(tmp_path, roles):
    row = {"conversations": [{"role": r, "content": "x"} for r in roles]}
    path = write(tmp_path / "sft.jsonl", jsonl(GOOD[0], row))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: "):
        load_sft_dataset(path)


def test_truncated_last_line_is_told_apart(tmp_path):
    path = write(tmp_path / "sft.jsonl", jsonl(*GOOD) + json.dumps(GOOD[0]).encode()[:-5])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: truncated last line"):
        load_sft_dataset(path)
    assert load_sft_dataset(path, skip_invalid=True).load_report.skipped == {"truncated": 1}
    complete = write(tmp_path / "complete.jsonl", jsonl(*GOOD)[:-1])
    assert len(load_sft_dataset(complete)) == 3


@pytest.mark.parametrize("problem", ["missing_field", "bad_content", "not_json"])
def test_bad_pretrain_line(tmp_path, problem):
    bad = {"missing_field": b'{"txt": "a"}', "bad_content": b'{"text": 3}', "not_json": b"text"}[problem]
    path = write(tmp_path / "pretrain.jsonl", jsonl({"text": "a"}, bad, {"text": "b"}))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: ") as error:
        load_pretrain_dataset(path)
    assert error.value.problem == problem
    dataset = load_pretrain_dataset(path, skip_invalid=True)
    assert dataset["text"] == ["a", "b"] and dataset.load_report.skipped == {problem: 1}


def test_bad_paths_always_raise(tmp_path):
    good = write(tmp_path / "good.jsonl", jsonl(*GOOD))
    empty = write(tmp_path / "empty.jsonl", b"\n\n")
    for path, problem in [(tmp_path / "missing.jsonl", "missing"), (tmp_path, "directory"), (empty, "empty_file")]:
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: ") as error:
            load_sft_dataset([good, path], skip_invalid=True)
        assert error.value.problem == problem and error.value.line is None


def test_errors_come_before_streaming_starts(tmp_path):
    path = write(tmp_path / "sft.jsonl", jsonl(*GOOD, b"{", GOOD[0]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: "):
        load_sft_dataset(path, streaming=True)
    streamed = load_sft_dataset([path, path], streaming=True, skip_invalid=True)
    assert isinstance(streamed, IterableDataset) and streamed.load_report.skipped == {"not_json": 2}
    assert [row["messages"] for row in streamed] == [row["conversations"] for row in GOOD + [GOOD[0]]] * 2


def test_changed_file_is_reloaded(tmp_path, tokenizer):
    path = write(tmp_path / "sft.jsonl", jsonl(*GOOD))
    assert len(load_sft_dataset(path)) == 3 and len(load_sft_tokenized(path, tokenizer, 64)) == 3
    time.sleep(0.01)
    write(path, jsonl(*GOOD, GOOD[0]))
    assert len(load_sft_dataset(path)) == 4 and len(load_sft_tokenized(path, tokenizer, 64)) == 4


def test_an_edit_that_keeps_size_and_mtime_is_not_served_stale(tmp_path, tokenizer):
    """An editor or a script may rewrite a file in place and restore its mtime (`os.utime`); same size too here."""
    before, after = chat("2+2?", "4"), chat("2+2?", "5")
    path = write(tmp_path / "sft.jsonl", jsonl(before))
    stat = path.stat()
    assert load_sft_dataset(path)[0]["messages"][1]["content"] == "4"
    assert load_sft_tokenized(path, tokenizer, 64)[0] == encode_conversation(before["conversations"], tokenizer, 64)
    write(path, jsonl(after))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert load_sft_dataset(path)[0]["messages"][1]["content"] == "5"
    assert load_sft_tokenized(path, tokenizer, 64)[0] == encode_conversation(after["conversations"], tokenizer, 64)
    texts = write(tmp_path / "pretrain.jsonl", jsonl({"text": "cat"}))
    stat = texts.stat()
    assert load_pretrain_dataset(texts)["text"] == ["cat"] and len(load_pretrain_tokenized(texts, tokenizer, 8)) == 1
    write(texts, jsonl({"text": "dog"}))
    os.utime(texts, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_pretrain_dataset(texts)["text"] == ["dog"]
    assert load_pretrain_tokenized(texts, tokenizer, 8)[0]["input_ids"] == [1, *tokenizer.encode("dog"), 2]


def test_a_second_load_opens_the_cache_without_tokenizing(tmp_path, tokenizer, monkeypatch):
    path = write(tmp_path / "sft.jsonl", jsonl(*GOOD))
    first = load_sft_tokenized(path, tokenizer, 64).to_list()

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_module, "_encode_conversations", refuse)
    assert load_sft_tokenized(path, tokenizer, 64).to_list() == first
    with pytest.raises(DatasetGenerationError) as error:
        load_sft_tokenized(path, tokenizer, 65)
    assert "tokenized again" in str(error.value.__cause__), "another max_length is another dataset"


LONG_PROMPT = chat("word " * 200, "short answer")


def test_sample_that_would_train_on_nothing_is_dropped_and_named(tmp_path, tokenizer, caplog):
    path = write(tmp_path / "sft.jsonl", jsonl(GOOD[0], LONG_PROMPT, GOOD[1], LONG_PROMPT))
    with caplog.at_level(logging.WARNING, logger="minimind_hf.data"):
        dataset = load_sft_tokenized(path, tokenizer, 64)
    assert len(dataset) == 2 and dataset.load_report.skipped == {"unsupervised": 2}
    assert dataset.load_report.skipped_lines == {str(path): [2, 4]}
    assert "dropped 2 of 4 conversations with no supervised token within max_length=64" in caplog.text
    assert f"{path}:2, {path}:4" in caplog.text
    assert dataset[1] == encode_conversation(GOOD[1]["conversations"], tokenizer, 64)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: no supervised token within max_length=64$"):
        load_sft_tokenized(path, tokenizer, 64, error_on_unsupervised=True)
    assert len(load_sft_tokenized(path, tokenizer, 512)) == 4
    # The messages view leaves out the same conversations when given the tokenizer.
    assert len(load_sft_dataset(path)) == 4 and len(load_sft_dataset(path, tokenizer=tokenizer, max_length=64)) == 2


def test_every_line_left_out_is_an_error(tmp_path, tokenizer):
    path = write(tmp_path / "sft.jsonl", jsonl(b"{", LONG_PROMPT))
    with pytest.raises(DataError, match=r"no usable records: all 2 lines were left out"):
        load_sft_tokenized(path, tokenizer, 64, skip_invalid=True)


@pytest.mark.parametrize("which", ["project", "original"])
def test_dropped_exactly_where_truncation_leaves_no_supervised_token(tmp_path, request, which):
    """A conversation is dropped at `max_length` L exactly when its first supervised token lies at L or later; the
    original tokenizer merges the header's newline with leading whitespace of a reply."""
    if which == "project":
        tokenizer = load_tokenizer(request.getfixturevalue("project_tokenizer_dir"))
    else:
        tokenizer = load_tokenizer(request.getfixturevalue("shared_fixtures") / "minimind_tokenizer")
    rows = [GOOD[1], chat("  spaced question", "   spaced reply"), chat("你好" * 12, "\t tab", system="短")]
    path = write(tmp_path / "sft.jsonl", jsonl(*rows))
    first = [encode_conversation(r["conversations"], tokenizer, None)["labels"] for r in rows]
    first = [next(i for i, label in enumerate(labels) if label != IGNORE_INDEX) for labels in first]
    for max_length in sorted({n + d for n in first for d in (0, 1)}):
        expected = {i for i, n in enumerate(first) if n >= max_length}
        if len(expected) == len(rows):
            with pytest.raises(DataError, match="no usable records"):
                load_sft_tokenized(path, tokenizer, max_length)
            continue
        report = load_sft_tokenized(path, tokenizer, max_length).load_report
        assert {line - 1 for line in report.skipped_lines.get(str(path), [])} == expected, max_length


def test_tokenize_pretrain(tmp_path, tokenizer):
    texts = ["The sky is blue.", "3 plus 4 is 7. " * 20]
    dataset = load_pretrain_tokenized(write(tmp_path / "p.jsonl", jsonl(*[{"text": t} for t in texts])), tokenizer, 16)
    short, long = dataset["input_ids"]
    assert dataset.column_names == ["input_ids", "labels"] and dataset["labels"] == dataset["input_ids"]
    assert short == [1] + tokenizer.encode(texts[0]) + [2]
    assert long == ([1] + tokenizer.encode(texts[1]))[:16]
    assert str(dataset.features["input_ids"].feature.dtype) == "uint16"


def test_worker_processes_keep_order_and_line_numbers(tmp_path, tokenizer, monkeypatch, caplog):
    """Files cut into byte ranges for several processes give the rows and the file:line of one process."""
    rows = [chat(f"{i} + {i}?", str(2 * i)) for i in range(120)]
    for i in (7, 64, 118):
        rows[i] = LONG_PROMPT
    first = write(tmp_path / "a.jsonl", jsonl(*rows[:70]))
    second = write(tmp_path / "b.jsonl", jsonl(*rows[70:]) + b"\n\n")
    single = load_sft_tokenized([first, second], tokenizer, 64, num_proc=1)
    monkeypatch.setattr(data_module, "BYTES_PER_PROCESS", 1000)
    runs = data_module._byte_ranges([first, second], data_module._processes([first, second], 3))
    assert len(runs) == 3 and sum(len(run) for run in runs) == 4, "three runs, one of them across both files"
    # A new cache entry (another max_length), built by three processes.
    with caplog.at_level(logging.WARNING, logger="minimind_hf.data"):
        parallel = load_sft_tokenized([first, second], tokenizer, 65, num_proc=3)
    assert f"{first}:8, {first}:65, {second}:49" in caplog.text
    assert parallel.load_report.skipped_lines == {str(first): [8, 65], str(second): [49]}
    kept = [r["conversations"] for i, r in enumerate(rows) if i not in (7, 64, 118)]
    assert parallel.to_list() == [encode_conversation(c, tokenizer, 65) for c in kept]
    assert single.load_report.skipped_lines == parallel.load_report.skipped_lines


def sft_trainer(tokenizer, train_dataset, max_length: int, tmp_path: Path, packing: bool = False) -> SFTTrainer:
    """TRL's trainer on `messages` (it tokenizes them with the assistant mask) or on tokenized rows (as they are)."""
    config = LlamaConfig(
        vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        assistant_only_loss="messages" in train_dataset.column_names,
        max_length=max_length,
        packing=packing,
        per_device_train_batch_size=len(train_dataset),
        gradient_checkpointing=False,
    )
    return SFTTrainer(
        model=LlamaForCausalLM(config), args=args, train_dataset=train_dataset, processing_class=tokenizer
    )


def sft_trainer_labels(tokenizer, conversations: list, max_length: int, tmp_path: Path) -> list[list[int]]:
    path = write(tmp_path / "sft.jsonl", jsonl(*[{"conversations": c} for c in conversations]))
    trainer = sft_trainer(tokenizer, load_sft_dataset(path), max_length, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert isinstance(batch["labels"], torch.Tensor)
    return [row[mask.bool()].tolist() for row, mask in zip(batch["labels"], batch["attention_mask"], strict=True)]


def supervised_within(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """The rows that keep a supervised token within `max_length` (the others are dropped, by TRL too)."""
    return [r for r in rows if set(encode_conversation(r["conversations"], tokenizer, max_length)["labels"]) != {-100}]


def sample_rows(tokenizer, max_length: int, n: int) -> list[dict]:
    """`n` rows of the shipped data that train on something within `max_length`, plus edge cases."""
    lines = (DATA / "sft.jsonl").read_text(encoding="utf-8").splitlines()[: 2 * n]
    rows = supervised_within([json.loads(line) for line in lines], tokenizer, max_length)[:n]
    return rows + GOOD + [chat("Leading spaces?", "   yes", "Tab?", "\tyes")]


def test_encode_conversation_is_what_sft_trainer_trains_on(tmp_path, tokenizer):
    conversations = [row["conversations"] for row in sample_rows(tokenizer, 48, 6)]
    labels = sft_trainer_labels(tokenizer, conversations, 48, tmp_path)
    assert labels == [encode_conversation(c, tokenizer, 48)["labels"] for c in conversations]
    assert any(len(row) == 48 for row in labels)


@pytest.mark.parametrize("packing", [False, True])
def test_tokenized_dataset_is_what_sft_trainer_makes_of_the_messages(tmp_path, tokenizer, packing):
    """TRL tokenizing the `messages` itself and TRL given `load_sft_tokenized`'s rows end with the same rows (packed:
    the same rows of samples, ids, labels and sample lengths), so the recipes train on exactly what TRL would."""
    rows = sample_rows(tokenizer, 48, 40)
    path = write(tmp_path / "sft.jsonl", jsonl(*rows))
    tokenized = load_sft_tokenized(path, tokenizer, 48)
    assert tokenized.load_report.skipped == {} and len(tokenized) == len(rows)
    assert {str(f.feature.dtype) for f in tokenized.features.values()} == {"uint16", "int16"}
    theirs = sft_trainer(tokenizer, load_sft_dataset(path), 48, tmp_path / "a", packing).train_dataset
    ours = sft_trainer(tokenizer, tokenized, 48, tmp_path / "b", packing).train_dataset
    columns = ["input_ids", "labels", "seq_lengths"] if packing else ["input_ids", "labels"]
    assert ours.select_columns(columns).to_list() == theirs.select_columns(columns).to_list()
    assert any(IGNORE_INDEX in row and len(set(row)) > 1 for row in ours["labels"])


def test_sft_trainer_reproduces_the_original_masks(tmp_path, shared_fixtures):
    tokenizer = load_tokenizer(shared_fixtures / "minimind_tokenizer")
    lines = (shared_fixtures / "minimind_reference" / "sft_loss_mask.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    labels = sft_trainer_labels(tokenizer, [row["conversations"] for row in rows[:16]], 256, tmp_path)
    path = write(tmp_path / "reference.jsonl", jsonl(*[{"conversations": row["conversations"]} for row in rows]))
    tokenized = load_sft_tokenized(path, tokenizer, 256)["labels"]
    assert tokenized[:16] == labels and len(tokenized) == len(rows)
    for row, row_labels in zip(rows, tokenized, strict=True):
        assert [i for i, label in enumerate(row_labels) if label != IGNORE_INDEX] == row["supervised_token_indices"]


def test_show_marks_supervised_text(capsys, project_tokenizer_dir):
    main(["show", str(DATA / "sft.jsonl"), "--tokenizer", str(project_tokenizer_dir), "--line", "2"])
    out = capsys.readouterr().out
    messages = json.loads((DATA / "sft.jsonl").read_text(encoding="utf-8").splitlines()[1])["conversations"]
    for message in messages:
        marked = f"[[{message['content']}<|im_end|>\n]]"
        assert (marked in out) == (message["role"] == "assistant")


def check_eval_set(path: Path, sft_path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    sft = load_sft_dataset(sft_path)
    seen = {m["content"] for messages in sft["messages"] for m in messages if m["role"] == "user"}
    for row in rows:
        assert row["task"] in TASKS and row["held_out"] in ("template", "item")
        assert row["answer"] == row["conversations"][-1]["content"] and row["conversations"][-1]["role"] == "assistant"
        assert row["answer"] and row["answer"] == row["answer"].strip()
        assert row["conversations"][-2]["content"] not in seen
    assert {row["task"] for row in rows} == TASKS
    assert len(load_sft_dataset(path)) == len(rows)


def test_repository_data(project_tokenizer_dir):
    sizes = {p.name: p.stat().st_size for p in DATA.glob("*.jsonl")}
    # Under 10 MB: the tool tasks (tool schemas in every row) added about 3.6 MB to the 5.8 of the question tasks.
    assert sum(sizes.values()) + sum(p.stat().st_size for p in project_tokenizer_dir.iterdir()) < 10_000_000
    assert len(load_pretrain_dataset(DATA / "pretrain.jsonl")) == 20_000
    assert isinstance(load_sft_dataset(DATA / "sft.jsonl"), Dataset)
    check_eval_set(DATA / "eval.jsonl", DATA / "sft.jsonl")


@pytest.mark.slow
def test_memory_stays_flat_on_a_large_file(tmp_path):
    path = tmp_path / "large.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f'{{"text": "line {i} of a large pretraining file"}}\n' for i in range(200_000))
    load_pretrain_dataset(write(tmp_path / "warmup.jsonl", jsonl({"text": "a"})))
    tracemalloc.start()
    dataset = load_pretrain_dataset(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    size = path.stat().st_size
    print(f"\nloading {len(dataset)} lines ({size / 1e6:.1f} MB): peak Python allocations {peak / 1e6:.2f} MB")
    assert len(dataset) == 200_000
    assert peak < size / 4
