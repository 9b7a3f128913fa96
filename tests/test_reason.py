"""Reasoning SFT: MiniMind's tag-weighted loss (`tag_loss_weight`) against a hand computation, and the recipes."""

import pytest
import torch
import torch.nn.functional as F
import yaml

from minimind_hf.data import IGNORE_INDEX, encode_conversation
from minimind_hf.stages import sft
from minimind_hf.stages.sft import tag_positions
from minimind_hf.testing import REPO_ROOT, write_jsonl, write_tiny_recipe
from minimind_hf.training import MiniMindArguments, parse_recipe

pytestmark = pytest.mark.usefixtures("datasets_cache")

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def reasoning_rows(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 10, (7 * i) % 10
        reply = f"<think>\nStart at {a} and add {b}.\n{a} + {b} = {a + b} < 20.\n</think>\n<answer>\n{a + b}\n</answer>"
        # A tag in the prompt is not the model's to learn: never weighted.
        question = f"What is {a} plus {b}? Use <think> first." if i % 2 else f"What is {a} plus {b}?"
        rows.append({"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]})
    return rows


def test_tag_positions_marks_whole_supervised_occurrences_only():
    targets = torch.tensor([[5, 1, 2, 3, 9, 1, 2, -100, 1, 2, 3, 1, 2, 3]])
    marked = tag_positions(targets, [[1, 2, 3], [4]])
    assert marked.int().tolist() == [[0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]]
    assert not tag_positions(targets[:, :2], [[1, 2, 3]]).any()


def tag_token_flags(tokenizer, messages) -> tuple[list[int], list[bool]]:
    """The conversation's ids, and for each token whether it lies inside a tag of an assistant reply: found by
    character offsets in the rendered text, independently of how the trainer matches token ids."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for message in messages:
        start = text.index(message["content"], cursor)
        cursor = start + len(message["content"])
        if message["role"] != "assistant":
            continue
        for tag in TAGS:
            at = message["content"].find(tag)
            while at != -1:
                spans.append((start + at, start + at + len(tag)))
                at = message["content"].find(tag, at + 1)
    flags = [any(s <= a and b <= e for s, e in spans) for a, b in encoded["offset_mapping"]]
    return encoded["input_ids"], flags


def test_loss_weights_tag_tokens_and_divides_by_the_supervised_count(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "sft.jsonl", reasoning_rows())
    recipe = write_tiny_recipe(tmp_path, max_steps=1, save_steps=1, tag_loss_weight=10.0)
    trainer = sft.main(["--config", str(recipe)])
    tokenizer = trainer.processing_class
    assert trainer.tag_loss_weight == 10.0 and len(trainer.tag_sequences) == 4
    assert all(len(sequence) > 1 for sequence in trainer.tag_sequences), "the project tokenizer splits each tag"

    rows = [row["conversations"] for row in reasoning_rows(2)]
    encoded = [encode_conversation(messages, tokenizer, None) for messages in rows]
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in encoded])
    labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in encoded])
    position_ids = torch.arange(width).expand(len(rows), -1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids}

    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=ids, position_ids=position_ids).logits
    total, count, weighted = 0.0, 0, 0
    for row, (messages, e) in enumerate(zip(rows, encoded, strict=True)):
        row_ids, flags = tag_token_flags(tokenizer, messages)
        assert row_ids == e["input_ids"]
        for i in range(1, len(row_ids)):
            if e["labels"][i] == IGNORE_INDEX:
                continue
            ce = F.cross_entropy(logits[row, i - 1].float(), torch.tensor(row_ids[i])).item()
            weight = 10.0 if flags[i] else 1.0
            total, count, weighted = total + weight * ce, count + 1, weighted + (weight > 1)
    assert weighted == 2 * sum(len(tokenizer.encode(tag, add_special_tokens=False)) for tag in TAGS)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # Under gradient accumulation the count is the global one the Trainer passes.
    with torch.no_grad():
        accumulated = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(2 * count))
    assert accumulated.item() == pytest.approx(total / count / 2, rel=1e-5)


def test_weight_one_is_the_plain_loss(tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", reasoning_rows())
    losses = {}
    for weight in (1.0, 10.0):
        recipe = write_tiny_recipe(tmp_path, max_steps=1, save_steps=1, logging_steps=1, tag_loss_weight=weight)
        trainer = sft.main(["--config", str(recipe), "--output_dir", str(tmp_path / f"out{weight}")])
        losses[weight] = trainer.state.log_history[0]["loss"]
    assert losses[10.0] > 1.5 * losses[1.0], "tag tokens are a good part of each reply and weigh 10x"


@pytest.mark.parametrize("name", ["reason.yaml", "demo/reason.yaml"])
def test_reason_recipes_parse_as_sft_recipes_with_tag_weighting(name):
    path = REPO_ROOT / "recipes" / name
    args, training_args = parse_recipe(argv=["--config", str(path)])
    assert isinstance(args, MiniMindArguments)
    assert args.tag_loss_weight == 10.0 and list(args.tag_tokens) == list(TAGS)
    assert training_args.assistant_only_loss
    assert "reason" in yaml.safe_load(path.read_text())["data_path"]
