"""The pretraining recipe, and the whole path: pretrain, SFT from its output, chat with the result."""

import json
from pathlib import Path

import pytest
import torch

from minimind_hf.stages import pretrain, sft
from minimind_hf.testing import REPO_ROOT, record_batches, write_pretrain_texts, write_tiny_recipe

TINY = {
    "config_overrides": "num_attention_heads=4,num_key_value_heads=2,vocab_size=2048",
    "max_length": 48,
    "learning_rate": 2e-3,
    "logging_steps": 1,
    "save_steps": 100,
}


def write_recipe(path: Path, **values) -> Path:
    return write_tiny_recipe(path.parent, path.name, **{**TINY, **values})


def test_packed_pretraining_labels_never_cross_a_document_boundary(tmp_path):
    batches = []
    recipe = write_recipe(
        tmp_path / "pretrain.yaml",
        data_path=str(write_pretrain_texts(tmp_path / "t.jsonl")),
        output_dir=str(tmp_path / "o"),
    )
    pretrain.main(["--config", str(recipe), "--max_steps", "3"], before_train=lambda t: record_batches(t, batches))
    assert len(batches) == 3

    documents_seen = 0
    for batch in batches:
        ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
        starts = positions == 0
        # Each document starts with <|im_start|>, which is never a target (nothing precedes it in its document).
        assert (labels[starts] == -100).all()
        inside = ~starts & (ids != 0)
        assert torch.equal(labels[inside], ids[inside]), "every other token of a document is a target"
        documents_seen += int((starts & (ids == 1)).sum())
        assert (ids[starts & (ids != 0)] == 1).all(), "documents begin with <|im_start|>"
    assert documents_seen > len(batches) * 4, "rows hold several packed documents"


@pytest.mark.slow
def test_pretrain_then_sft_then_chat(tmp_path, capsys):
    from minimind_hf import chat

    pretrain_out, sft_out = tmp_path / "pretrain", tmp_path / "sft"
    pretrain.main(
        ["--config", str(write_recipe(tmp_path / "p.yaml", data_path=str(REPO_ROOT / "data" / "pretrain.jsonl"))),
         "--output_dir", str(pretrain_out), "--max_steps", "4", "--save_pth", "true"]
    )  # fmt: skip
    assert (pretrain_out / "pretrain_32.pth").is_file(), "MiniMind's file name rule for the pretrain weights"
    sft_recipe = write_recipe(tmp_path / "s.yaml", data_path=str(REPO_ROOT / "data" / "sft.jsonl"))
    sft.main(["--config", str(sft_recipe), "--model_name_or_path", str(pretrain_out), "--output_dir", str(sft_out),
              "--max_steps", "4", "--hidden_size", "32", "--max_length", "128"])  # fmt: skip
    log = [
        entry for entry in json.loads((sft_out / "trainer_state.json").read_text())["log_history"] if "loss" in entry
    ]
    assert len(log) == 4 and all(entry["loss"] > 0 for entry in log)
    # Four steps teach a 32-wide model little; what matters is that the stages connect: the chat command answers
    # with the SFT model's own greedy reply.
    model, tokenizer = chat.load_model_and_tokenizer(sft_out)
    messages = [{"role": "user", "content": "Is 7 odd or even?"}]
    expected = chat.generate_reply(model, tokenizer, messages, greedy=True, max_new_tokens=8)
    capsys.readouterr()
    chat.main(["--model", str(sft_out), "--prompt", "Is 7 odd or even?", "--greedy", "--max_new_tokens", "8"])
    assert capsys.readouterr().out.strip() == expected.strip()
