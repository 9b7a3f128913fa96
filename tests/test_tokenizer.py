"""The ChatML template, the assistant masks against the original MiniMind's, and the tokenizer recipe."""

import json
import re
import shutil
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from minimind_hf.data import IGNORE_INDEX, encode_conversation
from minimind_hf.tokenizer import CHAT_TEMPLATE, MiniMindTokenizer, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 256

EDGE_CASES = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "和呢？"},
        {"role": "assistant", "content": "五"},
    ],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a\nb\n"}],
]


@pytest.fixture(scope="module")
def reference(shared_fixtures):
    lines = (shared_fixtures / "minimind_reference" / "sft_loss_mask.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def original_dir(shared_fixtures):
    return shared_fixtures / "minimind_tokenizer"


def supervised_indices(labels: list[int]) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX]


def test_template_renders_like_the_original(reference, original_dir):
    original = AutoTokenizer.from_pretrained(original_dir)
    conversations = [row["conversations"] for row in reference] + EDGE_CASES
    for messages in conversations:
        for prompt in (messages, messages[:-1]):
            expected = original.apply_chat_template(prompt, tokenize=False, add_generation_prompt=prompt != messages)
            ours = original.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=prompt != messages, chat_template=CHAT_TEMPLATE
            )
            assert ours == expected


def test_masks_equal_the_original_on_the_reference(reference, original_dir):
    tokenizer = load_tokenizer(original_dir)
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.pad_token_id == 0
    for row in reference:
        encoded = encode_conversation(row["conversations"], tokenizer, MAX_LENGTH)
        assert encoded["input_ids"] == row["input_ids"]
        assert supervised_indices(encoded["labels"]) == row["supervised_token_indices"]


def test_token_after_assistant_header_is_never_supervised(reference, original_dir):
    """transformers alone marks a token merging the header's newline with leading spaces of the reply."""
    plain = AutoTokenizer.from_pretrained(original_dir)
    plain.chat_template = CHAT_TEMPLATE
    ours = load_tokenizer(original_dir)
    header = ours.encode("<|im_start|>assistant")
    merged = 0
    for row in reference:
        ids = row["input_ids"]
        plain_mask = plain.apply_chat_template(row["conversations"], return_assistant_tokens_mask=True)
        plain_set = {i for i, m in enumerate(plain_mask["assistant_masks"][:MAX_LENGTH]) if m}
        after_header = {i for i in range(len(header), len(ids)) if ids[i - len(header) : i] == header}
        assert plain_set - after_header == set(row["supervised_token_indices"])
        merged += bool(plain_set & after_header)
    assert merged >= 1, "the reference should hold a reply starting with spaces"


def test_project_tokenizer_supervises_replies_and_their_end(project_tokenizer_dir):
    tokenizer = load_tokenizer(project_tokenizer_dir)
    lines = (REPO_ROOT / "data" / "sft.jsonl").read_text(encoding="utf-8").splitlines()[:50]
    for messages in EDGE_CASES + [json.loads(line)["conversations"] for line in lines]:
        encoded = encode_conversation(messages, tokenizer, None)
        supervised = [label != IGNORE_INDEX for label in encoded["labels"]]
        spans = [
            tokenizer.decode([encoded["input_ids"][i] for i, _ in group])
            for is_supervised, group in groupby(enumerate(supervised), key=lambda item: item[1])
            if is_supervised
        ]
        assert spans == [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]


def test_project_tokenizer_layout(project_tokenizer_dir):
    tokenizer = load_tokenizer(project_tokenizer_dir)
    assert isinstance(tokenizer, MiniMindTokenizer)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    ids = tokenizer("The capital of Valdoria is Mirenburg.")["input_ids"]
    assert 1 not in ids and 2 not in ids
    assert tokenizer.decode(ids) == "The capital of Valdoria is Mirenburg."


def test_load_tokenizer_names_a_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)


@pytest.mark.slow
def test_recipe_trains_a_minimind_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"text": f"Sentence number {i} says hello 你好."} for i in range(50)]
    rows += [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}]
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = tmp_path / "tokenizer.yaml"
    config.write_text(f"files: [{corpus}]\noutput_dir: {tmp_path / 'out'}\nvocab_size: 6400\n")
    command = [sys.executable, str(REPO_ROOT / "recipes" / "tokenizer.py"), "--config", str(config)]
    subprocess.run(command + ["--vocab_size", "300"], check=True, cwd=tmp_path)

    tokenizer = load_tokenizer(tmp_path / "out")
    assert 259 < len(tokenizer) <= 300
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer("hello")["input_ids"] == tokenizer.encode("hello", add_special_tokens=True)
    assert 1 not in tokenizer("hello")["input_ids"]


def test_a_template_without_generation_markers_or_none_is_replaced_and_one_with_markers_kept(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # no chat_template.jinja
        shutil.copy(REPO_ROOT / "data" / "tokenizer" / name, plain / name)
    assert load_tokenizer(plain).chat_template == CHAT_TEMPLATE
    marked = "{%- for m in messages -%}{%- generation -%}{{ m['content'] }}{%- endgeneration -%}{%- endfor -%}"
    (plain / "chat_template.jinja").write_text(marked)
    assert load_tokenizer(plain).chat_template == marked
