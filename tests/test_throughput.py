"""The throughput benchmark and the loss path it made fast: packed rows learn what separate samples learn, the
LM head at supervised positions only gives the full-logits loss, and the baseline is the original loop."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from torch import nn
from trl import SFTConfig

from minimind_hf.configuration_minimind import build_config
from minimind_hf.data import encode_conversation
from minimind_hf.modeling_minimind import MiniMindForCausalLM
from minimind_hf.stages.sft import build_sft_trainer
from minimind_hf.testing import load_script
from minimind_hf.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
throughput = load_script(REPO / "benchmarks" / "throughput.py")

pytestmark = pytest.mark.usefixtures("datasets_cache")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
    [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "And in Chinese?"},
        {"role": "assistant", "content": "你好！"},
    ],
    [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "one two three four five"}],
    [{"role": "user", "content": "Tell me a long story."}, {"role": "assistant", "content": "Once upon a time " * 20}],
]


@pytest.fixture(scope="module")
def tokenizer(project_tokenizer_dir):
    return load_tokenizer(project_tokenizer_dir)


def tiny_model(use_moe: bool = False) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    # A large init makes attention sharp: a sample that attended to its packed neighbour would move the loss by
    # about 1%, far beyond the float32 tolerances below (at the usual 0.02 it would be 1e-6).
    config = build_config(hidden_size=64, num_hidden_layers=2, use_moe=use_moe, overrides={"initializer_range": 0.2})
    config._attn_implementation = "sdpa"
    return MiniMindForCausalLM(config).train()


def packed_trainer(model, tokenizer, tmp_path: Path):
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        activation_checkpointing=False,
        bf16=False,
        packing=True,
        max_length=128,
        per_device_train_batch_size=2,
        assistant_only_loss=True,
        report_to="none",
    )
    return build_sft_trainer(model, tokenizer, args, Dataset.from_list([{"messages": c} for c in CONVERSATIONS]))


def packed_batch(trainer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The two fullest packed rows as the recipe's collator makes them, and the samples they hold."""
    rows = sorted(trainer.train_dataset, key=lambda row: len(row["seq_lengths"]))[-2:]
    samples = []
    for row in rows:
        start = 0
        for length in row["seq_lengths"]:
            samples.append({key: row[key][start : start + length] for key in ("input_ids", "labels")})
            start += length
    assert len(samples) >= 4, "each row must hold more than one sample to test packing"
    return trainer.data_collator(rows), samples


def test_packed_loss_is_the_token_weighted_mean_of_per_sample_losses(tokenizer, tmp_path):
    model = tiny_model()
    trainer = packed_trainer(model, tokenizer, tmp_path)
    batch, samples = packed_batch(trainer)
    losses, counts = [], []
    with torch.no_grad():
        for sample in samples:
            ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor([sample["labels"]])
            losses.append(model(input_ids=ids, labels=labels).loss.item())
            counts.append(int((labels[:, 1:] != -100).sum()))
        expected = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
        packed = trainer.compute_loss(model, batch).item()
        summed = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(sum(counts))).item()
    print(f"{len(samples)} samples in 2 rows: packed {packed:.7f}, per-sample token-weighted {expected:.7f}")
    assert packed == pytest.approx(expected, rel=1e-5)
    assert summed == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_lm_head_at_supervised_positions_gives_the_full_logits_loss_and_gradients(tokenizer, tmp_path, use_moe):
    model = tiny_model(use_moe)
    trainer = packed_trainer(model, tokenizer, tmp_path)
    batch, _ = packed_batch(trainer)

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    supervised_only, grads = loss_and_grads(lambda: trainer.compute_loss(model, batch))
    # The model's own loss: logits at every position, plus the balance loss for MoE in training.
    full, full_grads = loss_and_grads(lambda: model(**batch, use_cache=False).loss)
    print(f"use_moe={use_moe}: supervised-only head {supervised_only:.7f}, full logits {full:.7f}")
    assert supervised_only == pytest.approx(full, rel=1e-6)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # Whoever asks for the outputs (evaluation) still gets the logits of every position.
    _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert outputs.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)


def write_jsonl(path: Path, conversations: list) -> Path:
    path.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in conversations))
    return path


def test_baseline_follows_the_original_schedule_and_loss_mask(tokenizer, project_tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", CONVERSATIONS * 2)
    settings = throughput.Settings(
        train_data=str(data),
        eval_data=str(data),
        tokenizer=str(project_tokenizer_dir),
        work_dir=str(tmp_path),
        steps=5,
        hidden_size=32,
        num_hidden_layers=1,
        max_length=48,
        batch_size=3,
        learning_rate=1e-3,
    )
    loader = throughput.baseline_loader(settings, tokenizer)
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler), "the original shuffles"
    truncated = 0
    for i, conversation in enumerate(CONVERSATIONS * 2):
        expected = encode_conversation(conversation, tokenizer, 48)
        padding = 48 - len(expected["input_ids"])
        truncated += padding == 0
        ids, labels = loader.dataset[i]
        assert ids.tolist() == expected["input_ids"] + [tokenizer.pad_token_id] * padding
        assert labels.tolist() == expected["labels"] + [-100] * padding
    assert truncated, "one conversation must be cut at max_length"

    result = throughput.run_baseline(settings, {"float32": 1e12, "bfloat16": 1e12})
    # MiniMind's get_lr, set on every step: cosine from the peak to a tenth of it, no warm-up.
    expected_lr = [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * t / 5))) for t in range(5)]
    assert result["learning_rates"] == pytest.approx(expected_lr, rel=1e-12)
    assert result["matmul_dtype"] == "float32", "the original has no autocast on a CPU"
    assert result["padding_fraction"] > 0, "every sample is padded to max_length"


def test_unpacked_collator_lays_out_the_samples_of_packed_rows_like_the_original():
    a, b, c = [1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 2]
    label = [-100, 5, 6, 2], [-100, -100, 2], [-100, -100, 9, 10, 2]
    rows = [
        {"input_ids": a + b, "labels": label[0] + label[1], "seq_lengths": [4, 3]},
        {"input_ids": c, "labels": label[2], "seq_lengths": [5]},
    ]
    batch = throughput.UnpackedPaddedCollator(pad_token_id=0, max_length=6)(rows)
    samples = [{"input_ids": ids, "labels": lb} for ids, lb in zip((a, b, c), label, strict=True)]
    padded = throughput.PaddedSFTDataset(samples, max_length=6, pad_token_id=0)
    assert torch.equal(batch["input_ids"], torch.stack([padded[i][0] for i in range(3)]))
    assert torch.equal(batch["labels"], torch.stack([padded[i][1] for i in range(3)]))
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 3, 5]


def test_flops_formula_counts_every_matmul_weight_of_the_26m_model():
    config = build_config(hidden_size=512, num_hidden_layers=8, use_moe=False, overrides={})
    model = MiniMindForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert throughput.matmul_weights(config) == linear
    per_token = throughput.training_flops(config, [1])
    print(f"26M model: {linear / 1e6:.1f}M matmul weights, {per_token / 1e6:.0f} MFLOP per trained token (n=1)")
    assert 150e6 < per_token < 160e6, "the spec's figure: about 155 MFLOP per trained token"


@pytest.mark.slow
def test_benchmark_smoke_run_writes_the_figures(tmp_path):
    out = tmp_path / "throughput.json"
    command = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--steps", "2", "--hidden_size", "64",
               "--num_hidden_layers", "2", "--max_length", "128", "--batch_size", "4", "--samples", "80",
               "--eval_samples", "8", "--peak_size", "1024", "--configs", "baseline,recipe",
               "--work_dir", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["configs"]) == {"baseline", "recipe"}
    assert report["peak_flops"]["float32"] > 0 and report["peak_flops"]["bfloat16"] > 0
    keys = {"seconds_per_step", "real_tokens_per_s", "supervised_tokens_per_s", "peak_memory_mb", "final_loss",
            "train_loss_per_supervised_token", "eval_loss_per_supervised_token", "mfu", "matmul_dtype"}  # fmt: skip
    for name, figures in report["configs"].items():
        assert keys <= set(figures), f"{name} lacks {keys - set(figures)}"
        assert figures["steps"] == 2 and figures["real_tokens_per_s"] > 0 and figures["peak_memory_mb"] > 0
        assert 0 < figures["eval_loss_per_supervised_token"] < 20 and 0 < figures["mfu"] < 1
    base, recipe = report["configs"]["baseline"], report["configs"]["recipe"]
    assert base["matmul_dtype"] == "float32" and recipe["matmul_dtype"] == "bfloat16", "bf16 autocast on CPU"
    assert recipe["learning_rates"] == pytest.approx(base["learning_rates"]), "the recipe keeps MiniMind's schedule"
    assert recipe["padding_fraction"] < base["padding_fraction"]
    assert report["real_tokens_per_s_vs_baseline"]["recipe"] > 0
    print(result.stdout[-1500:])


def test_generated_benchmark_data_has_minimind_length_mix_and_is_deterministic(tokenizer, tmp_path):
    write_bench_data = load_script(REPO / "benchmarks" / "make_bench_data.py").write_bench_data

    path = write_bench_data(tmp_path / "a.jsonl", tokenizer, samples=300)
    assert write_bench_data(tmp_path / "b.jsonl", tokenizer, samples=300).read_bytes() == path.read_bytes()
    rows = [json.loads(line)["conversations"] for line in path.read_text().splitlines()]
    lengths = sorted(len(encode_conversation(row, tokenizer, None)["input_ids"]) for row in rows)
    median = lengths[len(lengths) // 2]
    print(f"median {median} tokens, longest {lengths[-1]}, {sum(n > 512 for n in lengths)} of 300 over 512")
    assert 100 <= median <= 170 and lengths[-1] > 512
    text = "".join(message["content"] for row in rows for message in row)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and "the" in text, "Chinese and English"
