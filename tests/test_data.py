"""Loading and validating JSON Lines, the tokenized views TRL trains on, and the sample data generator."""

import json
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from minimind_hf.data import (
    IGNORE_INDEX,
    DataError,
    encode_conversation,
    load_pretrain_dataset,
    load_sft_dataset,
    main,
    scan,
    tokenize_pretrain,
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
}


@pytest.mark.parametrize("problem", sorted(BAD_SFT_LINES))
def test_bad_sft_line_names_file_line_and_problem(tmp_path, problem):
    path = write(tmp_path / "sft.jsonl", jsonl(GOOD[0], GOOD[1], BAD_SFT_LINES[problem], GOOD[2]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: ") as error:
        load_sft_dataset(path)
    assert (error.value.path, error.value.line, error.value.problem) == (str(path), 3, problem)

    dataset = load_sft_dataset([path], skip_invalid=True)
    assert dataset.load_report.skipped == {problem: 1}
    assert dataset.load_report.skipped_lines == {str(path): [3]}
    assert [row["messages"] for row in dataset] == [good["conversations"] for good in GOOD]


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


def test_changed_file_is_reloaded(tmp_path):
    path = write(tmp_path / "sft.jsonl", jsonl(*GOOD))
    assert len(load_sft_dataset(path)) == 3
    time.sleep(0.01)
    write(path, jsonl(*GOOD, GOOD[0]))
    assert len(load_sft_dataset(path)) == 4


def test_sample_that_would_train_on_nothing(tmp_path, tokenizer):
    long_question = chat("word " * 200, "short answer")
    path = write(tmp_path / "sft.jsonl", jsonl(GOOD[0], long_question, GOOD[1]))
    assert len(load_sft_dataset(path)) == 3
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: no supervised token within max_length=64"):
        load_sft_dataset(path, tokenizer=tokenizer, max_length=64)
    dataset = load_sft_dataset(path, tokenizer=tokenizer, max_length=64, skip_invalid=True)
    assert len(dataset) == 2 and dataset.load_report.skipped == {"unsupervised": 1}
    assert len(load_sft_dataset(path, tokenizer=tokenizer, max_length=512)) == 3


@pytest.mark.parametrize("which", ["project", "original"])
def test_load_time_check_agrees_with_truncated_labels(tmp_path, request, which):
    """Loading flags exactly the samples that truncation leaves without a supervised token; the original
    tokenizer merges the header's newline with leading whitespace of a reply."""
    if which == "project":
        tokenizer = load_tokenizer(request.getfixturevalue("project_tokenizer_dir"))
    else:
        tokenizer = load_tokenizer(request.getfixturevalue("shared_fixtures") / "minimind_tokenizer")
    rows = [GOOD[1], chat("  spaced question", "   spaced reply"), chat("你好" * 12, "\t tab", system="短")]
    path = write(tmp_path / "sft.jsonl", jsonl(*rows))
    for max_length in range(16, 200):
        report = scan(path, "sft", skip_invalid=True, tokenizer=tokenizer, max_length=max_length)
        flagged = {line - 1 for line in report.skipped_lines.get(str(path), [])}
        dead = {
            i
            for i, row in enumerate(rows)
            if all(
                label == IGNORE_INDEX
                for label in encode_conversation(row["conversations"], tokenizer, max_length)["labels"]
            )
        }
        assert flagged == dead, max_length


def test_tokenize_pretrain(tmp_path, tokenizer):
    texts = ["The sky is blue.", "3 plus 4 is 7. " * 20]
    dataset = tokenize_pretrain(
        load_pretrain_dataset(write(tmp_path / "p.jsonl", jsonl(*[{"text": t} for t in texts]))), tokenizer, 16
    )
    short, long = dataset["input_ids"]
    assert dataset.column_names == ["input_ids"]
    assert short == [1] + tokenizer.encode(texts[0]) + [2]
    assert long == ([1] + tokenizer.encode(texts[1]))[:16]


def sft_trainer_labels(tokenizer, conversations: list, max_length: int, tmp_path: Path) -> list[list[int]]:
    config = LlamaConfig(
        vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        assistant_only_loss=True,
        max_length=max_length,
        per_device_train_batch_size=len(conversations),
        gradient_checkpointing=False,
    )
    path = write(tmp_path / "sft.jsonl", jsonl(*[{"conversations": c} for c in conversations]))
    trainer = SFTTrainer(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=load_sft_dataset(path),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert isinstance(batch["labels"], torch.Tensor)
    return [row[mask.bool()].tolist() for row, mask in zip(batch["labels"], batch["attention_mask"], strict=True)]


def test_encode_conversation_is_what_sft_trainer_trains_on(tmp_path, tokenizer):
    lines = (DATA / "sft.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    conversations = [json.loads(line)["conversations"] for line in lines] + [c["conversations"] for c in GOOD]
    conversations.append(chat("Leading spaces?", "   yes", "Tab?", "\tyes")["conversations"])
    labels = sft_trainer_labels(tokenizer, conversations, 48, tmp_path)
    assert labels == [encode_conversation(c, tokenizer, 48)["labels"] for c in conversations]
    assert any(len(row) == 48 for row in labels)


def test_sft_trainer_reproduces_the_original_masks(tmp_path, shared_fixtures):
    tokenizer = load_tokenizer(shared_fixtures / "minimind_tokenizer")
    lines = (shared_fixtures / "minimind_reference" / "sft_loss_mask.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:16]]
    labels = sft_trainer_labels(tokenizer, [row["conversations"] for row in rows], 256, tmp_path)
    for row, row_labels in zip(rows, labels, strict=True):
        assert [i for i, label in enumerate(row_labels) if label != IGNORE_INDEX] == row["supervised_token_indices"]


def test_show_marks_supervised_text(capsys, project_tokenizer_dir):
    main(["show", str(DATA / "sft.jsonl"), "--tokenizer", str(project_tokenizer_dir), "--line", "2"])
    out = capsys.readouterr().out
    messages = json.loads((DATA / "sft.jsonl").read_text(encoding="utf-8").splitlines()[1])["conversations"]
    for message in messages:
        marked = f"[[{message['content']}<|im_end|>\n]]"
        assert (marked in out) == (message["role"] == "assistant")


def make_data(out_dir: Path, seed: int) -> dict[str, bytes]:
    sizes = ["--n_pretrain", "300", "--n_sft", "200", "--n_eval", "48"]
    command = [sys.executable, str(DATA / "make_data.py"), "--seed", str(seed), "--out_dir", str(out_dir)]
    subprocess.run(command + sizes + ["--no_tokenizer"], check=True)
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.jsonl"))}


def test_generator_is_deterministic(tmp_path):
    first, second = make_data(tmp_path / "a", 1), make_data(tmp_path / "b", 1)
    assert list(first) == ["eval.jsonl", "pretrain.jsonl", "sft.jsonl"]
    assert first == second
    assert make_data(tmp_path / "c", 2)["sft.jsonl"] != first["sft.jsonl"]


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


def test_generated_eval_answers_are_checkable(tmp_path):
    make_data(tmp_path, 3)
    check_eval_set(tmp_path / "eval.jsonl", tmp_path / "sft.jsonl")


def test_repository_data(project_tokenizer_dir):
    sizes = {p.name: p.stat().st_size for p in DATA.glob("*.jsonl")}
    assert sum(sizes.values()) + sum(p.stat().st_size for p in project_tokenizer_dir.iterdir()) < 6_000_000
    assert len(load_pretrain_dataset(DATA / "pretrain.jsonl")) == 20_000
    assert isinstance(load_sft_dataset(DATA / "sft.jsonl"), Dataset)
    check_eval_set(DATA / "eval.jsonl", DATA / "sft.jsonl")


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
