"""MiniMind-3 end to end through the recipes: the shipped YAMLs train and save a MiniMind-3 model, every form of
the original's checkpoint starts an SFT run that (at learning rate 0) keeps the original's logits, the trained
model exports to plain Qwen3, and an MoE model trains under DDP with the original's router loss in the log.

The reference files are the original's own outputs (`../shared/fixtures/minimind3_reference`); tests that need them
skip, naming where they looked, when they are absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from minimind_hf import MiniMind3ForCausalLM
from minimind_hf.chat_templates import MINIMIND3_CHAT_TEMPLATE
from minimind_hf.convert import main as convert
from minimind_hf.formats.minimind3_pth import minimind3_pth_state
from minimind_hf.formats.qwen3 import to_qwen3
from minimind_hf.loading import load_model
from minimind_hf.stages import pretrain, sft
from minimind_hf.stages.dpo import DPO
from minimind_hf.stages.grpo import GRPO
from minimind_hf.stages.lora import LORA
from minimind_hf.testing import REPO_ROOT, final_weights, record_batches, write_jsonl
from minimind_hf.training import parse_recipe

RECIPES = REPO_ROOT / "recipes" / "minimind3"
# What turns a recipe of the original's sizes into one that trains in about a second.
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "config_overrides": "num_attention_heads=4,num_key_value_heads=2",
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_steps": 2,
    "save_steps": 100,
    "logging_steps": 1,
    "report_to": "none",
    "dataloader_num_workers": 0,
}


@pytest.fixture(scope="module")
def reference(shared_fixtures) -> Path:
    folder = shared_fixtures / "minimind3_reference"
    if not (folder / "m3_dense_fp16.pth").is_file():
        pytest.skip(f"MiniMind-3 reference fixtures not found in {folder}")
    return folder


def argv(config: Path | None, **keys: Any) -> list[str]:
    """`--config config --key value ...`; None becomes the string `null`, as on a command line."""
    args = ["--config", str(config)] if config else []
    for key, value in keys.items():
        args += [f"--{key}", "null" if value is None else str(value)]
    return args


def t2t_rows(n: int) -> list[dict]:
    """`n` t2t conversations in the original's format: tool calls with a tool reply, `reasoning_content`, plain."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    rows = []
    for i in range(n):
        question = {"role": "user", "content": f"What is {i} plus {i % 5}?"}
        answer = f"{i + i % 5}."
        if i % 3 == 0:
            call = [{"name": "add", "arguments": {"a": i, "b": i % 5}}]
            turns = [
                {"role": "system", "content": "You can use tools.", "tools": json.dumps(tools)},
                question,
                {"role": "assistant", "content": "", "tool_calls": json.dumps(call)},
                {"role": "tool", "content": json.dumps({"sum": i + i % 5})},
                {"role": "assistant", "content": answer},
            ]
        elif i % 3 == 1:
            turns = [question, {"role": "assistant", "content": answer, "reasoning_content": f"{i} + {i % 5}"}]
        else:
            turns = [question, {"role": "assistant", "content": answer}]
        rows.append({"conversations": turns})
    return rows


def test_recipes_carry_the_originals_defaults():
    """The YAMLs are the original's MiniMind-3 runs: section 7 of the spec, key by key."""
    common = {"hidden_size": 768, "num_hidden_layers": 8, "minimind_version": 3, "chat_template": "minimind3"}
    wanted = {
        "pretrain": {**common, "model_name_or_path": None, "num_train_epochs": 2, "per_device_train_batch_size": 32,
                     "learning_rate": 5e-4, "gradient_accumulation_steps": 8, "max_length": 340},
        "sft": {**common, "model_name_or_path": "out/minimind3/pretrain", "num_train_epochs": 2,
                "per_device_train_batch_size": 16, "learning_rate": 1e-5, "max_length": 768,
                "add_system_ratio": 0.2, "empty_think_ratio": 0.2},
    }  # fmt: skip
    for stage, keys in wanted.items():
        args, training_args = parse_recipe(argv=["--config", str(RECIPES / f"{stage}.yaml")])
        for key, value in keys.items():
            assert getattr(args, key, getattr(training_args, key, None)) == value, (stage, key)
        assert training_args.lr_scheduler_type == "cosine_with_min_lr"
        assert training_args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}  # cosine down to 0.1x
        assert Path(args.data_path[0]).name == f"{stage}_t2t_mini.jsonl"


def test_recipe_yamls_pretrain_then_sft_a_minimind3(reference, tmp_path, datasets_cache):
    texts = write_jsonl(tmp_path / "pretrain.jsonl", ({"text": f"Text {i}: " + "word " * (5 + i)} for i in range(24)))
    conversations = write_jsonl(tmp_path / "sft.jsonl", t2t_rows(18))
    tokenizer = reference / "tokenizer"
    pretrained = tmp_path / "pretrain"
    trainer = pretrain.main(
        argv(RECIPES / "pretrain.yaml", **TINY, data_path=texts, tokenizer_name_or_path=tokenizer,
             output_dir=pretrained)
    )  # fmt: skip
    assert trainer.state.global_step == 2 and trainer.state.log_history[0]["loss"] > 0
    assert json.loads((pretrained / "config.json").read_text())["model_type"] == "minimind3"
    assert (pretrained / "pretrain_64.pth").is_file()

    # The SFT recipe from those weights, with its augmentations on and tool-call rows among the data.
    finetuned = tmp_path / "sft"
    trainer = sft.main(
        argv(RECIPES / "sft.yaml", **TINY, data_path=conversations, tokenizer_name_or_path=tokenizer,
             model_name_or_path=pretrained, output_dir=finetuned, learning_rate=1e-3)
    )  # fmt: skip
    assert trainer.state.global_step == 2
    model = load_model(finetuned)
    assert type(model) is MiniMind3ForCausalLM and model.config.hidden_size == 64
    assert (finetuned / "full_sft_64.pth").is_file()
    start, end = final_weights(pretrained), final_weights(finetuned)
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start), "SFT trained nothing"
    # The tokenizer saved beside the model carries the MiniMind-3 template it was trained with.
    assert AutoTokenizer.from_pretrained(str(finetuned)).chat_template == MINIMIND3_CHAT_TEMPLATE


def original_hf_layout(pth: Path, directory: Path) -> Path:
    """What the original's `convert_torch2transformers_minimind` writes for a MiniMind-3 `.pth`: `model_type:
    "minimind"` with MiniMind-3's fields, `auto_map` to its own code (a stub that raises: it must never run), and
    fp16 weights in `pytorch_model.bin` under both tied names, as transformers 4.x saved them."""
    model = load_model(pth)
    directory.mkdir()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("rope_parameters", "model_type")}
    config.update(
        model_type="minimind",
        rope_theta=model.config.rope_parameters["rope_theta"],
        rope_scaling=None,
        flash_attn=True,
        architectures=["MiniMindForCausalLM"],
        auto_map={
            "AutoConfig": "model_minimind.MiniMindConfig",
            "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM",
        },
        torch_dtype="float16",
        transformers_version="4.57.1",
    )
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(minimind3_pth_state(model), directory / "pytorch_model.bin")
    (directory / "model_minimind.py").write_text('raise RuntimeError("the original\'s code must never run")\n')
    return directory


def qwen3_layout(pth: Path, directory: Path) -> Path:
    """How MiniMind-3 is published: `Qwen3ForCausalLM`."""
    to_qwen3(load_model(pth), directory)
    return directory


FORMS = {
    "pth": lambda pth, directory: pth,
    "original_hf": original_hf_layout,
    "qwen3": qwen3_layout,
}


def sft_from(reference: Path, source: Path, output_dir: Path, **keys: Any) -> sft.MiniMindTrainer:
    """Two SFT steps on the fixture's t2t conversations with the original's tokenizer and recipe defaults (bf16
    autocast included), from `source`."""
    recipe = {
        **TINY,
        "hidden_size": None,
        "num_hidden_layers": None,
        "config_overrides": "",
        "data_path": reference / "t2t_convs.jsonl",
        "tokenizer_name_or_path": reference / "tokenizer",
        "model_name_or_path": source,
        "max_length": 340,
        "output_dir": output_dir,
        "bf16": True,
        "save_pth": True,
        **keys,
    }
    recipe = {k: v for k, v in recipe.items() if v is not None and v != ""}
    return sft.main(argv(None, **recipe))


def reference_logits(model: torch.nn.Module, expected: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(expected["input_ids"]).logits


@pytest.mark.parametrize("form", FORMS)
def test_each_original_form_starts_sft_and_learning_rate_0_keeps_the_originals_logits(
    reference, tmp_path, datasets_cache, form
):
    pth = reference / "m3_dense_fp16.pth"
    source = FORMS[form](pth, tmp_path / form)
    trainer = sft_from(reference, source, tmp_path / "out", learning_rate=0.0, weight_decay=0.0)
    assert trainer.state.global_step == 2 and trainer.state.log_history[-1]["train_loss"] > 0

    # Nothing (bf16 autocast, the optimizer, saving) moved a weight: they are the fp16 file's values in fp32.
    original = torch.load(pth, weights_only=True)
    saved = final_weights(tmp_path / "out")
    assert set(saved) <= set(original) and "model.norm.weight" in saved
    for key, tensor in saved.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, original[key].float()), key
    # The .pth written beside it is the original's file again, bit for bit.
    written = torch.load(tmp_path / "out" / "full_sft_128.pth", weights_only=True)
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)

    model = load_model(tmp_path / "out")
    assert type(model) is MiniMind3ForCausalLM
    expected = torch.load(reference / "m3_dense_expected.pt", weights_only=True)
    diff = (reference_logits(model, expected) - expected["logits"]).abs().max().item()
    print(f"{form}: max |trained at lr 0 - original's logits| = {diff:.2e}")
    assert diff <= 1e-4


PLAIN_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(name.startswith("minimind_hf") for name in sys.modules)
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
print(type(model).__name__)
"""


@pytest.mark.slow
def test_trained_output_exports_to_plain_qwen3_with_equal_logits(reference, tmp_path, datasets_cache):
    sft_from(reference, reference / "m3_dense_fp16.pth", tmp_path / "out", learning_rate=1e-3)
    trained = load_model(tmp_path / "out")
    original = torch.load(reference / "m3_dense_fp16.pth", weights_only=True)
    assert not torch.equal(trained.model.norm.weight, original["model.norm.weight"].float()), "nothing trained"

    convert(["hf2qwen3", str(tmp_path / "out"), str(tmp_path / "qwen3")])
    expected = torch.load(reference / "m3_dense_expected.pt", weights_only=True)
    torch.save(expected["input_ids"], tmp_path / "ids.pt")
    # A fresh interpreter with plain transformers: nothing of this package may be needed to load the export.
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(tmp_path / "qwen3"), str(tmp_path / "ids.pt"),
         str(tmp_path / "logits.pt")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "Qwen3ForCausalLM"
    diff = (torch.load(tmp_path / "logits.pt") - reference_logits(trained, expected)).abs().max().item()
    print(f"max |plain Qwen3 export - trained MiniMind-3| = {diff:.2e}")
    assert diff <= 1e-5
    # And back: the export loads through the one loader as the same MiniMind-3.
    back = load_model(tmp_path / "qwen3")
    assert (reference_logits(back, expected) - reference_logits(trained, expected)).abs().max().item() <= 1e-5


MOE = {
    **TINY,
    "minimind_version": 3,
    "use_moe": True,
    "model_name_or_path": None,
    "bf16": False,  # fp32 throughout, so that the hand computation below sees the very same router logits
    "max_length": 128,
}


def router_logits(router_inputs: list[torch.Tensor], model: MiniMind3ForCausalLM) -> list[torch.Tensor]:
    """Each MoE layer's router logits (float64), from the hidden states its router was given."""
    return [
        hidden.reshape(-1, model.config.hidden_size).double() @ layer.mlp.gate.weight.double().T
        for layer, hidden in zip(model.model.layers, router_inputs, strict=True)
    ]


def original_router_loss(router_inputs: list[torch.Tensor], model: MiniMind3ForCausalLM) -> float:
    """The original's router balance loss, written out from spec section 7: per MoE layer
    `coef * E * sum_i f_i * P_i`, with P_i the mean probability of expert i over every token of the batch and f_i,
    summed over the k choice slots, the share of tokens choosing i; the layers' terms summed."""
    config = model.config
    total = 0.0
    for logits in router_logits(router_inputs, model):
        probs = logits.softmax(-1)
        chosen = probs.topk(config.num_experts_per_tok, dim=-1).indices
        for i in range(config.num_experts):
            f_i = sum((chosen[:, slot] == i).double().mean() for slot in range(config.num_experts_per_tok))
            total += config.router_aux_loss_coef * config.num_experts * f_i.item() * probs[:, i].mean().item()
    return total


def test_moe_logs_the_originals_router_loss(reference, tmp_path, datasets_cache):
    write_jsonl(tmp_path / "sft.jsonl", t2t_rows(12))
    batches, initial = [], {}

    def before_train(trainer):
        initial.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        record_batches(trainer, batches, first_only=True)

    recipe = {**MOE, "data_path": tmp_path / "sft.jsonl", "tokenizer_name_or_path": reference / "tokenizer"}
    recipe.update(output_dir=tmp_path / "out", max_steps=1)
    trainer = sft.main(argv(None, **recipe), before_train=before_train)
    logged = trainer.state.log_history[0]

    model = trainer.model
    model.load_state_dict(initial)
    model.train()  # the router loss exists in training only; dropout is 0
    router_inputs = []
    hooks = [
        layer.mlp.gate.register_forward_pre_hook(lambda module, inputs: router_inputs.append(inputs[0].detach()))
        for layer in model.model.layers
    ]
    inputs = batches[0]
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False)
    for hook in hooks:
        hook.remove()
    by_hand = original_router_loss(router_inputs, model)
    assert logged["aux_loss"] == pytest.approx(by_hand, rel=1e-5)
    # Not transformers' Qwen3-MoE loss, which concatenates the layers rather than summing their terms.
    config = model.config
    qwen3_moe = load_balancing_loss_func(
        tuple(router_logits(router_inputs, model)), config.num_experts, config.num_experts_per_tok
    )
    qwen3_moe = config.router_aux_loss_coef * qwen3_moe.item()
    print(f"aux_loss: logged {logged['aux_loss']:.8f}, by hand {by_hand:.8f}, Qwen3-MoE's formula {qwen3_moe:.8f}")
    assert qwen3_moe != pytest.approx(by_hand, rel=1e-2)
    # The loss the optimizer saw is the LM loss plus the router loss, both logged apart.
    assert logged["loss"] == pytest.approx(logged["lm_loss"] + logged["aux_loss"], rel=1e-4)


DDP_PROBE = """
import json, os, sys
from minimind_hf.stages import sft
find_unused = []
def before_train(trainer):
    compute_loss = trainer.compute_loss
    def record(model, inputs, *a, **kw):
        find_unused.append(model.find_unused_parameters)  # `model` is the DDP wrapper here
        return compute_loss(model, inputs, *a, **kw)
    trainer.compute_loss = record
trainer = sft.main(sys.argv[1:], before_train=before_train)
with open(os.path.join({out!r}, "rank-" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({{"find_unused": find_unused, "log": trainer.state.log_history}}, f)
"""


@pytest.mark.slow
def test_moe_trains_under_torchrun_with_no_unused_parameter_error(reference, tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", t2t_rows(24))
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE.format(out=str(tmp_path)))
    recipe = {**MOE, "data_path": tmp_path / "sft.jsonl", "tokenizer_name_or_path": reference / "tokenizer",
              "output_dir": tmp_path / "out", "max_steps": 3}  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(probe),
           *argv(None, **recipe)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "unused" not in result.stderr.lower(), result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    # Every expert is one fused parameter, so an expert no token chose still gets a (zero) gradient and DDP is
    # never asked to search for unused parameters.
    assert {flag for rank in ranks for flag in rank["find_unused"]} == {False}
    steps = [entry for entry in ranks[0]["log"] if "aux_loss" in entry]
    assert len(steps) == 3 and all(entry["aux_loss"] > 0 for entry in steps)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "minimind3" and config["use_moe"] is True
    assert type(load_model(tmp_path / "out")) is MiniMind3ForCausalLM


def test_the_other_stage_recipes_carry_the_originals_defaults():
    """DPO, GRPO and LoRA as the original's MiniMind-3 programs run them (spec section 7's table)."""
    common = {"hidden_size": 768, "num_hidden_layers": 8, "minimind_version": 3, "chat_template": "minimind3"}
    wanted = {
        "dpo": (DPO, {**common, "dpo_logprob_reduction": "sum", "beta": 0.15, "learning_rate": 4e-8,
                      "per_device_train_batch_size": 4, "max_length": 1024}),
        "grpo": (GRPO, {**common, "loss_type": "cispo", "beta": 0.1, "num_generations": 6, "epsilon": 0.2,
                        "epsilon_high": 5.0, "learning_rate": 3e-7, "max_prompt_length": 768,
                        "max_completion_length": 1024, "temperature": 0.8, "thinking_ratio": 0.9,
                        "reward_funcs": ["minimind3_reward"], "grpo_loss_averaging": "sequence"}),
        "lora": (LORA, {**common, "lora_r": 16, "learning_rate": 1e-4, "num_train_epochs": 10, "max_length": 340}),
    }  # fmt: skip
    for name, (stage, keys) in wanted.items():
        args, training_args = parse_recipe(
            (stage.arguments_class, stage.config_class), ["--config", str(RECIPES / f"{name}.yaml")], stage.defaults
        )
        for key, value in keys.items():
            assert getattr(args, key, getattr(training_args, key, None)) == value, (name, key)
        assert training_args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
