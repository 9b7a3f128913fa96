"""The speed work of issue #25: MiniMind-3's grouped experts in the autocast dtype give the eager loop's loss and
gradients, the compiled SFT path pads packed rows to one length without changing the loss, and the benchmark's
launcher of the current original counts its steps, tokens and losses (on a stand-in script: the original's code is
never part of this repository)."""

import json
import textwrap
from pathlib import Path

import torch
from torch import nn

from minimind_hf.configuration_minimind import build_config
from minimind_hf.modeling_minimind3 import MiniMind3ForCausalLM
from minimind_hf.stages.sft import PackedRowsCollator
from minimind_hf.testing import load_script

REPO = Path(__file__).resolve().parents[1]
throughput = load_script(REPO / "benchmarks" / "throughput.py")


def tiny_moe(experts: int = 4, top_k: int = 1) -> MiniMind3ForCausalLM:
    torch.manual_seed(0)
    overrides = {"num_experts": experts, "num_experts_per_tok": top_k}
    config = build_config(hidden_size=64, num_hidden_layers=2, use_moe=True, overrides=overrides, minimind_version=3)
    return MiniMind3ForCausalLM(config).train()


def test_moe_defaults_to_grouped_experts_and_keeps_the_eager_loss_and_gradients():
    model = tiny_moe(top_k=2)
    assert model.config._experts_implementation == "minimind_grouped_mm"
    ids = torch.randint(3, 6000, (2, 40))
    results = {}
    for implementation in ("eager", "minimind_grouped_mm"):
        model.set_experts_implementation(implementation)
        for autocast in (False, True):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                output = model(input_ids=ids, labels=ids)
            output.loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            results[implementation, autocast] = output.loss.detach(), output.aux_loss.detach(), grads
    for autocast, tolerance in ((False, 1e-5), (True, 2e-2)):
        loss, aux, grads = results["eager", autocast]
        grouped_loss, grouped_aux, grouped_grads = results["minimind_grouped_mm", autocast]
        torch.testing.assert_close(grouped_loss, loss, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(grouped_aux, aux, rtol=1e-6, atol=1e-7)  # the router runs in float32 either way
        for grouped, eager in zip(grouped_grads, grads, strict=True):
            torch.testing.assert_close(grouped, eager, rtol=tolerance, atol=tolerance * 1e-1)


def test_grouped_experts_multiply_in_bf16_under_autocast(monkeypatch):
    import minimind_hf.modeling_minimind3 as modeling

    seen = []
    original = modeling.grouped_mm_experts_forward

    def spy(experts, hidden_states, *args):
        seen.append((hidden_states.dtype, experts.gate_up_proj.dtype, experts.down_proj.dtype))
        return original(experts, hidden_states, *args)

    monkeypatch.setattr(modeling, "grouped_mm_experts_forward", spy)
    model = tiny_moe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.randint(3, 6000, (1, 16)))
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)


def test_rows_padded_to_max_length_give_the_same_loss():
    torch.manual_seed(0)
    config = build_config(hidden_size=64, num_hidden_layers=2, use_moe=False, overrides={}, minimind_version=3)
    model = MiniMind3ForCausalLM(config).eval()
    rows = [
        {"input_ids": list(range(5, 45)), "seq_lengths": [25, 15]},
        {"input_ids": list(range(50, 80)), "seq_lengths": [30]},
    ]
    for row in rows:
        row["labels"] = [i if i % 3 else -100 for i in row["input_ids"]]
    losses = []
    for multiple in (None, 64):
        batch = PackedRowsCollator(pad_token_id=0, pad_to_multiple_of=multiple)(rows)
        assert batch["input_ids"].shape[1] == (40 if multiple is None else 64)
        with torch.no_grad():
            losses.append(model(**batch).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_flops_formula_counts_every_matmul_weight_of_minimind3_dense_and_moe():
    for use_moe in (False, True):
        config = build_config(hidden_size=512, num_hidden_layers=8, use_moe=use_moe, overrides={}, minimind_version=3)
        model = MiniMind3ForCausalLM(config)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        if use_moe:  # the fused experts are parameters, not nn.Linear; a token uses top-k of them
            experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
            per_expert = sum(e.gate_up_proj[0].numel() + e.down_proj[0].numel() for e in experts)
            routers = sum(m.weight.numel() for m in model.modules() if type(m).__name__.endswith("TopKRouter"))
            linear += per_expert * config.num_experts_per_tok + routers
        assert throughput.matmul_weights(config) == linear


# A stand-in for the original's trainer/train_full_sft.py, with the same interface to the launcher: a module-level
# DataLoader of (input_ids, labels), GradScaler.scale on the loss, an optimizer step per batch, `model` at the end.
STAND_IN = """
import argparse, os
import torch
from torch.utils.data import DataLoader

parser = argparse.ArgumentParser()
for flag in ("--device", "--epochs", "--batch_size", "--learning_rate", "--hidden_size", "--num_hidden_layers",
             "--max_seq_len", "--use_moe", "--data_path", "--from_weight", "--seed", "--num_workers",
             "--log_interval", "--save_interval", "--save_dir", "--use_compile"):
    parser.add_argument(flag)
args = parser.parse_args()
assert os.path.isdir("../model"), "the tokenizer is where the original looks for it"
lines = open(args.data_path).read().splitlines()
batch, length = int(args.batch_size), int(args.max_seq_len)
data = [(torch.full((length,), 7), torch.full((length,), 7)) for _ in lines]
for ids, _ in data:
    ids[20:] = 0  # 20 real tokens, then the pad id
model = torch.nn.Linear(2, 1)
optimizer = torch.optim.AdamW(model.parameters(), lr=float(args.learning_rate))
scaler = torch.amp.GradScaler("cpu", enabled=False)
for input_ids, labels in DataLoader(data, batch_size=batch):
    loss = model(torch.ones(1, 2)).sum() ** 2
    scaler.scale(loss).backward()
    optimizer.step()
    optimizer.zero_grad()
"""

STAND_IN_CONFIG = """
class MiniMindConfig:
    def __init__(self, hidden_size, num_hidden_layers, use_moe):
        self.hidden_size, self.num_hidden_layers, self.use_moe = hidden_size, num_hidden_layers, use_moe
        self.num_attention_heads, self.num_key_value_heads, self.head_dim = 2, 1, hidden_size // 2
        self.intermediate_size, self.vocab_size = 4 * hidden_size, 100
"""


def test_original_launcher_counts_steps_tokens_and_losses(tmp_path, monkeypatch, project_tokenizer_dir):
    original = tmp_path / "orig"
    (original / "trainer").mkdir(parents=True)
    (original / "model").mkdir()
    (original / "trainer" / "train_full_sft.py").write_text(textwrap.dedent(STAND_IN))
    (original / "model" / "model_minimind.py").write_text(textwrap.dedent(STAND_IN_CONFIG))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"conversations": []}) + "\n" for _ in range(20)))
    settings = throughput.Settings(
        train_data=str(train), eval_data=str(train), tokenizer=str(project_tokenizer_dir), work_dir=str(tmp_path),
        steps=3, hidden_size=8, num_hidden_layers=1, max_length=32, batch_size=4, original_dir=str(original),
    )  # fmt: skip
    monkeypatch.setattr(throughput, "heldout_loss", lambda *args: 1.0)
    monkeypatch.setattr(throughput, "encode_samples", lambda *args: [])
    monkeypatch.setattr(torch.utils.data, "DataLoader", torch.utils.data.DataLoader)  # restored after the test
    monkeypatch.setattr(torch.amp.GradScaler, "scale", torch.amp.GradScaler.scale)
    result = throughput.run_original(settings, "original_compile", {"float32": 1e9, "bfloat16": 1e9})
    assert result["steps"] == 3, "one epoch over steps x batch_size conversations"
    assert result["step_real_tokens"] == [4 * 20] * 3
    assert result["rows_per_step"] == 4 and result["matmul_dtype"] == "float32"
    assert all(loss > 0 for loss in result["step_losses"])
    assert result["step_losses"][0] > result["step_losses"][-1], "the launcher sees the losses the script trains on"


def test_torch_compile_compiles_the_decoder_layers_in_place(tmp_path, project_tokenizer_dir):
    from datasets import Dataset
    from trl import SFTConfig

    from minimind_hf.stages.sft import build_sft_trainer
    from minimind_hf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(project_tokenizer_dir)
    model = tiny_moe()
    names = [name for name, _ in model.named_parameters()]
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, packing=True, max_length=64, torch_compile=True,
        per_device_train_batch_size=1, report_to="none",
    )  # fmt: skip
    trainer = build_sft_trainer(model, tokenizer, args, Dataset.from_list([{"messages": messages}] * 4))
    layers = model.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers), "every decoder layer, in place"
    assert [name for name, _ in model.named_parameters()] == names, "checkpoints keep their parameter names"
    assert trainer.data_collator.pad_to_multiple_of == 64, "one row length: no recompilation"
    assert str(trainer.accelerator.state.dynamo_plugin.backend) in ("NO", "DynamoBackend.NO")
