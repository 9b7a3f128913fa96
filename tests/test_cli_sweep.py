"""Every recipe key and every command-line flag with bad values: each case ends in one `error:` line, exits non-zero,
never shows a traceback, and (for the recipes) fails before any work, with nothing written to `output_dir`.

Each case runs the real command in-process through its `main(argv)` (the recipes through `run_cli`, as
`python recipes/sft.py` does), so a case that reached training would be slow and a traceback would fail it.
"""

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from minimind_hf import MiniMindConfig, MiniMindForCausalLM, chat, evaluate, plot
from minimind_hf import data as data_cli
from minimind_hf.stages import dpo, grpo, lora, pretrain, sft
from minimind_hf.testing import write_tiny_recipe
from minimind_hf.tokenizer import load_tokenizer
from minimind_hf.training import run_cli

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizer"

pytestmark = pytest.mark.usefixtures("datasets_cache")

ROW = {"conversations": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}
HEADS = "num_attention_heads=4,num_key_value_heads=2"


def one_error_line(run, capsys) -> str:
    """Run a command; it must exit non-zero with one `error:` line as the last thing it prints."""
    with pytest.raises(SystemExit) as exit_:
        run()
    code = exit_.value.code
    assert code not in (0, None), "exited with success"
    line = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("error: ") or ": error: " in line, line
    return line


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "sft.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "bad.jsonl").write_text("not json\n[1]\n")
    (tmp_path / "pretrain.jsonl").write_text(json.dumps({"text": "one two three"}) + "\n")
    (tmp_path / "a_dir").mkdir()
    return tmp_path


# key: bad value (a callable takes the work directory) -> the message's pattern
RECIPE_CASES = {
    "learning_rate: true": ({"learning_rate": True}, r"learning_rate: expected a number, got true"),
    "learning_rate: -1": ({"learning_rate": -1}, r"learning_rate: must be >= 0, got -1"),
    "weight_decay: -0.1": ({"weight_decay": -0.1}, r"weight_decay: must be >= 0"),
    "per_device_train_batch_size: 0": ({"per_device_train_batch_size": 0}, r"per_device_train_batch_size: must be"),
    "per_device_train_batch_size: [4]": ({"per_device_train_batch_size": [4]}, r"expected an integer, got \[4\]"),
    "per_device_eval_batch_size: 0": ({"per_device_eval_batch_size": 0}, r"per_device_eval_batch_size: must be at"),
    "gradient_accumulation_steps: 0": ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps: must be"),
    "num_train_epochs: 0": ({"num_train_epochs": 0, "max_steps": -1}, r"num_train_epochs: is 0 and max_steps is not"),
    "num_train_epochs: -1": ({"num_train_epochs": -1, "max_steps": -1}, r"num_train_epochs: must be >= 0"),
    "num_train_epochs: two": ({"num_train_epochs": "two"}, r"--num_train_epochs.*invalid float value: 'two'"),
    "max_steps: 0": ({"max_steps": 0}, r"max_steps: must be positive, or -1"),
    "max_steps: 2.5": ({"max_steps": 2.5}, r"max_steps: expected an integer, got 2.5"),
    "max_length: 0": ({"max_length": 0}, r"max_length: must be a positive number of tokens"),
    "max_length: null": ({"max_length": None}, r"max_length: is null, but packing needs"),
    "max_grad_norm: -1": ({"max_grad_norm": -1}, r"max_grad_norm: must be >= 0"),
    "save_steps: 0": ({"save_steps": 0}, r"save_steps: must be positive with save_strategy: steps"),
    "eval_steps: -1": (
        lambda d: {"eval_strategy": "steps", "eval_steps": -1, "eval_data_path": str(d / "sft.jsonl")},
        r"eval_steps: must be positive, got -1",
    ),
    "save_total_limit: 0": ({"save_total_limit": 0}, r"save_total_limit: must be at least 1"),
    "logging_steps: 0": ({"logging_steps": 0}, r"invalid recipe: logging strategy .* requires non-zero"),
    "warmup_steps: -1": ({"warmup_steps": -1}, r"invalid recipe: .*warmup_steps >= 0"),
    "dataloader_num_workers: -1": ({"dataloader_num_workers": -1}, r"dataloader_num_workers: must be >= 0"),
    "seed: -1": ({"seed": -1}, r"seed: must be in 0..2\*\*32-1"),
    "bf16 and fp16": ({"bf16": True, "fp16": True}, r"invalid recipe: At most one of fp16 and bf16"),
    "optim: sgdx": ({"optim": "sgdx"}, r"invalid recipe: sgdx is not a valid OptimizerNames"),
    "lr_scheduler_type: foo": ({"lr_scheduler_type": "foo"}, r"invalid recipe: foo is not a valid SchedulerType"),
    "lr_scheduler_kwargs: a string": ({"lr_scheduler_kwargs": "x"}, r"lr_scheduler_kwargs: must be a mapping"),
    "lr_scheduler_kwargs: a typo": (
        {"lr_scheduler_kwargs": {"min_lr_rat": 0.1}},
        r"lr_scheduler_kwargs: cosine_with_min_lr cannot be built with \{'min_lr_rat': 0.1\}",
    ),
    "report_to: wandbx": ({"report_to": "wandbx"}, r"report_to: wandbx is not supported"),
    "save_pth: maybe": ({"save_pth": "maybe"}, r"--save_pth.*Truthy value expected: got maybe"),
    "output_dir: ''": ({"output_dir": ""}, r"output_dir: is empty"),
    "output_dir: a file": (lambda d: {"output_dir": str(d / "sft.jsonl")}, r"output_dir .*sft.jsonl is not writable"),
    "unknown key": ({"learning_rat": 1e-3}, r"unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"),
    "data_path: []": ({"data_path": []}, r"data_path: is empty"),
    "data_path: 5": ({"data_path": 5}, r"data_path: expected a list of strings, got 5"),
    "data_path: missing": ({"data_path": "no/such.jsonl"}, r"no/such.jsonl: no such file"),
    "data_path: a directory": (lambda d: {"data_path": str(d / "a_dir")}, r"a_dir: is a directory"),
    "data_path: all lines invalid": (
        lambda d: {"data_path": str(d / "bad.jsonl"), "skip_invalid": True},
        r"bad.jsonl: no usable records",
    ),
    "data_path: pretraining rows": (lambda d: {"data_path": str(d / "pretrain.jsonl")}, r':1: no "conversations"'),
    "eval_data_path: missing": ({"eval_data_path": "no/eval.jsonl"}, r"no/eval.jsonl: no such file"),
    "tokenizer_name_or_path: missing": ({"tokenizer_name_or_path": "no/tok"}, r"tokenizer no/tok: cannot load it"),
    "tokenizer_name_or_path: not one": (
        lambda d: {"tokenizer_name_or_path": str(d / "a_dir")},
        r"a_dir: cannot load it \(not a tokenizer directory",
    ),
    "model_name_or_path: missing": ({"model_name_or_path": "no/model"}, r"model_name_or_path no/model: no such model"),
    "model_name_or_path: a data file": (
        lambda d: {"model_name_or_path": str(d / "sft.jsonl")},
        r"model_name_or_path|sft.jsonl",
    ),
    "hidden_size: 0": ({"hidden_size": 0}, r"MiniMindConfig.hidden_size must be positive, got 0"),
    "num_hidden_layers: -1": ({"num_hidden_layers": -1}, r"num_hidden_layers must be positive"),
    "use_moe: maybe": ({"use_moe": "maybe"}, r"--use_moe.*Truthy value expected: got maybe"),
    "config_overrides: typo": (
        {"config_overrides": "num_attention_head=4"},
        r"config_overrides: unknown MiniMindConfig field 'num_attention_head' \(did you mean 'num_attention_heads'",
    ),
    "config_overrides: not k=v": ({"config_overrides": "num_attention_heads"}, r"is not of the form key=value"),
    "config_overrides: 5": ({"config_overrides": 5}, r"config_overrides: expected a string, got 5"),
    "config_overrides: dropout=2": ({"config_overrides": f"{HEADS},dropout=2"}, r"'dropout' expected float"),
    "config_overrides: vocab_size=abc": ({"config_overrides": f"{HEADS},vocab_size=abc"}, r"'vocab_size' expected"),
    "config_overrides: vocab_size=100": ({"config_overrides": f"{HEADS},vocab_size=100"}, r"has 100 embedding rows"),
    "config_overrides: max_position_embeddings=16": (
        {"config_overrides": f"{HEADS},max_position_embeddings=16"},
        r"max_length 64 is above the model's max_position_embeddings 16",
    ),
    "attn_implementation: flash_attention_2": (
        {"attn_implementation": "flash_attention_2"},
        r"attn_implementation: 'flash_attention_2' cannot be used here",
    ),
    "attn_implementation: nonsense": ({"attn_implementation": "fast"}, r"attn_implementation: 'fast' cannot be used"),
    "on_nonfinite: ignore": ({"on_nonfinite": "ignore"}, r"on_nonfinite: must be one of stop, skip, got 'ignore'"),
    "resume_from_checkpoint: missing": (
        {"resume_from_checkpoint": "no/ckpt"},
        r"resume_from_checkpoint: no/ckpt is not a checkpoint directory",
    ),
    "resume_from_checkpoint: a data directory": (
        lambda d: {"resume_from_checkpoint": str(d / "a_dir")},
        r"resume_from_checkpoint: .*a_dir",
    ),
}


@pytest.mark.parametrize(("overrides", "message"), RECIPE_CASES.values(), ids=RECIPE_CASES.keys())
def test_sft_recipe_key_with_a_bad_value(work, capsys, overrides, message):
    overrides = overrides(work) if callable(overrides) else overrides
    argv = ["--config", str(write_tiny_recipe(work, **overrides))]
    line = one_error_line(lambda: run_cli(lambda: sft.main(argv)), capsys)
    assert re.search(message, line), line
    assert not (work / "out").exists(), "output_dir was created before the error"


ARGV_CASES = {
    "--config without a file": (["--config"], r"^error: --config needs a recipe file"),
    "--config then a flag": (["--config", "--learning_rate", "1"], r"^error: --config needs a recipe file"),
    "--config of a missing file": (["--config", "no/such.yaml"], r"^error: recipe file no/such.yaml does not exist"),
    "--config of a list": (["--config", "{list}"], r"a recipe must be a YAML mapping"),
    "--config of broken YAML": (["--config", "{broken}"], r"broken.yaml:2: not valid YAML: expected ',' or ']'"),
    "a flag without its value": (["--config", "{recipe}", "--learning_rate"], r"--learning_rate.*expected one arg"),
    "an unknown flag": (["--config", "{recipe}", "--learning-rat", "1"], r"command line: unknown key 'learning-rat'"),
    "a stray argument": (["--config", "{recipe}", "stray"], r"error: .*stray"),
    "a bad value on the command line": (["--config", "{recipe}", "--max_steps", "0"], r"max_steps: must be positive"),
}


@pytest.mark.parametrize(("argv", "message"), ARGV_CASES.values(), ids=ARGV_CASES.keys())
def test_recipe_command_line_with_bad_flags(work, capsys, argv, message):
    (work / "list.yaml").write_text("- a\n- b\n")
    (work / "broken.yaml").write_text("learning_rate: [1\n")
    paths = {"recipe": write_tiny_recipe(work), "list": work / "list.yaml", "broken": work / "broken.yaml"}
    argv = [arg.format(**paths) for arg in argv]
    line = one_error_line(lambda: run_cli(lambda: sft.main(argv)), capsys)
    assert re.search(message, line), line
    assert not (work / "out").exists()


PRETRAIN_CASES = {
    "conversations as pretraining text": ({"data_path": "{sft}"}, r'sft.jsonl:1: no "text" field'),
    "max_length: 0": ({"max_length": 0}, r"max_length: must be a positive number of tokens"),
    "vocab_size=100": ({"config_overrides": f"{HEADS},vocab_size=100"}, r"has 100 embedding rows"),
}


@pytest.mark.parametrize(("overrides", "message"), PRETRAIN_CASES.values(), ids=PRETRAIN_CASES.keys())
def test_pretrain_recipe_key_with_a_bad_value(work, capsys, overrides, message):
    overrides = {"data_path": str(work / "pretrain.jsonl"), **overrides}
    overrides["data_path"] = overrides["data_path"].format(sft=work / "sft.jsonl")
    argv = ["--config", str(write_tiny_recipe(work, **overrides))]
    line = one_error_line(lambda: run_cli(lambda: pretrain.main(argv)), capsys)
    assert re.search(message, line), line
    assert not (work / "out").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("sweep") / "model"
    config = MiniMindConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    MiniMindForCausalLM(config).save_pretrained(directory)
    load_tokenizer(TOKENIZER).save_pretrained(directory)
    (directory.parent / "eval.jsonl").write_text(json.dumps({**ROW, "task": "add", "answer": "2"}) + "\n")
    state = {"log_history": [{"step": 1, "loss": "high"}]}
    (directory.parent / "bad_state.json").write_text(json.dumps(state))
    (directory.parent / "odd_state.json").write_text(json.dumps({"log_history": [3]}))
    good = {"log_history": [{"step": 1, "loss": 2.0, "learning_rate": 0.1}]}
    (directory.parent / "trainer_state.json").write_text(json.dumps(good))
    (directory.parent / "a_dir").mkdir()
    return directory


CHAT = ["--model", "{model}", "--prompt", "hi", "--max_new_tokens", "2"]
EVAL = ["--model", "{model}", "--data", "{root}/eval.jsonl", "--max_new_tokens", "2"]
SHOW = ["show", "{root}/eval.jsonl", "--tokenizer", str(TOKENIZER)]
CLI_CASES = {
    "chat --temperature -1": (chat.main, [*CHAT, "--temperature", "-1"], r"--temperature: '-1' is not a number >= 0"),
    "chat --temperature inf": (chat.main, [*CHAT, "--temperature", "inf"], r"--temperature: 'inf' is not a number"),
    "chat --top_p 0": (chat.main, [*CHAT, "--top_p", "0"], r"--top_p: '0' is not a number in \(0, 1\]"),
    "chat --top_p 1.5": (chat.main, [*CHAT, "--top_p", "1.5"], r"--top_p: '1.5' is not a number in \(0, 1\]"),
    "chat --max_new_tokens 0": (chat.main, [*CHAT, "--max_new_tokens", "0"], r"'0' is not a positive integer"),
    "chat --history -1": (chat.main, [*CHAT, "--history", "-1"], r"--history: '-1' is not an integer >= 0"),
    "chat --seed -1": (chat.main, [*CHAT, "--seed", "-1"], r"--seed: '-1' is not a seed"),
    "chat --device nowhere": (chat.main, [*CHAT, "--device", "nowhere"], r"--device 'nowhere' is not a device"),
    "chat --dtype float8": (chat.main, [*CHAT, "--dtype", "float8"], r"--dtype: invalid choice: 'float8'"),
    "chat --prompt not UTF-8": (chat.main, [*CHAT[:2], "--prompt", "caf\udce9"], r"--prompt b'caf\\xe9' is not valid"),
    "chat --model missing": (chat.main, ["--model", "no/model", "--prompt", "hi"], r"no/model: no such model"),
    "chat --tokenizer missing": (chat.main, [*CHAT, "--tokenizer", "no/tok"], r"tokenizer no/tok: cannot load it"),
    "chat --config_overrides typo": (
        chat.main,
        [*CHAT, "--config_overrides", "num_attention_head=4"],
        r"unknown MiniMindConfig field 'num_attention_head'",
    ),
    "chat --hidden_size of another model": (chat.main, [*CHAT, "--hidden_size", "64"], r"has hidden_size=32"),
    "evaluate --batch_size 0": (evaluate.main, [*EVAL, "--batch_size", "0"], r"'0' is not a positive integer"),
    "evaluate --limit -1": (evaluate.main, [*EVAL, "--limit", "-1"], r"--limit: '-1' is not a positive integer"),
    "evaluate --max_length 0": (evaluate.main, [*EVAL, "--max_length", "0"], r"--max_length: '0' is not a positive"),
    "evaluate --samples -1": (evaluate.main, [*EVAL, "--samples", "-1"], r"--samples: '-1' is not an integer >= 0"),
    "evaluate --out a directory": (evaluate.main, [*EVAL, "--out", "{root}/a_dir"], r"--out .*a_dir is a directory"),
    "evaluate --out under a file": (
        evaluate.main,
        [*EVAL, "--out", "{root}/eval.jsonl/x.json"],
        r"--out .*x.json: cannot write there",
    ),
    "evaluate --data missing": (evaluate.main, [*EVAL[:2], "--data", "no/eval.jsonl"], r"no/eval.jsonl: no such file"),
    "evaluate --data without answers": (
        evaluate.main,
        [*EVAL[:2], "--data", str(REPO / "data" / "sft.jsonl")],
        r'sft.jsonl:1: no "(task|answer)" string \(an evaluation row needs one\)',
    ),
    "evaluate --device nowhere": (evaluate.main, [*EVAL, "--device", "nowhere"], r"--device 'nowhere' is not a"),
    "plot a missing run": (plot.main, ["{root}/no_run"], r"no_run: no such run directory"),
    "plot a non-number loss": (plot.main, ["{root}/bad_state.json"], r"log_history\[0\].loss is 'high', not a number"),
    "plot odd entries": (plot.main, ["{root}/odd_state.json"], r"log_history is not a list of objects"),
    "plot not a state file": (plot.main, ["{root}/eval.jsonl"], r"eval.jsonl: not a trainer state"),
    "plot --out a directory": (plot.main, ["{root}", "--out", "{root}/a_dir"], r"--out .*a_dir is a directory"),
    "plot --out unknown format": (plot.main, ["{root}", "--out", "{root}/x.xyz"], r"Format 'xyz' is not supported"),
    "plot --out under a file": (
        plot.main,
        ["{root}", "--out", "{root}/eval.jsonl/x.png"],
        r"--out .*x.png: cannot write there",
    ),
    "data without a command": (data_cli.main, [], r"the following arguments are required: command"),
    "data show --line 0": (data_cli.main, [*SHOW, "--line", "0"], r"--line counts from 1"),
    "data show --line past the end": (data_cli.main, [*SHOW, "--line", "9"], r"eval.jsonl:9: no such line"),
    "data show --max_length 0": (data_cli.main, [*SHOW, "--max_length", "0"], r"--max_length must be positive"),
    "data show --tokenizer missing": (
        data_cli.main,
        ["show", "{root}/eval.jsonl", "--tokenizer", "no/tok"],
        r"tokenizer directory not found: no/tok",
    ),
    "data show a directory": (
        data_cli.main,
        ["show", "{root}/a_dir", "--tokenizer", str(TOKENIZER)],
        r"error: .*Is a directory: .*a_dir",
    ),
    "data show a pretraining file": (
        data_cli.main,
        ["show", str(REPO / "data" / "pretrain.jsonl"), "--tokenizer", str(TOKENIZER)],
        r'pretrain.jsonl:1: no "conversations" field',
    ),
}


@pytest.mark.parametrize(("main", "argv", "message"), CLI_CASES.values(), ids=CLI_CASES.keys())
def test_command_line_tool_with_bad_flags(tiny_model, capsys, main, argv, message):
    argv = [arg.format(model=tiny_model, root=tiny_model.parent) for arg in argv]
    line = one_error_line(lambda: main(argv), capsys)
    assert re.search(message, line), line


# The newer stages: each key of DPO, GRPO, LoRA and reasoning SFT with bad values. The recipes start from a tiny
# model (`stage_work`); every case must end in one `error:` line before any work, with nothing in output_dir.
PAIR = {
    "chosen": ROW["conversations"],
    "rejected": [ROW["conversations"][0], {"role": "assistant", "content": "3"}],
}
PROMPT = {**ROW, "task": "add", "answer": "2"}


@pytest.fixture
def stage_work(work) -> Path:
    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    MiniMindForCausalLM(config).save_pretrained(work / "model")
    load_tokenizer(TOKENIZER).save_pretrained(work / "model")
    shutil.copytree(work / "model", work / "ref")
    (work / "dpo.jsonl").write_text(json.dumps(PAIR) + "\n")
    (work / "grpo.jsonl").write_text((json.dumps(PROMPT) + "\n") * 4)
    (work / "rlaif.jsonl").write_text(json.dumps(ROW) + "\n")
    return work


def stage_recipe(stage: str, directory: Path, overrides: dict) -> Path:
    keys: dict = {"model_name_or_path": str(directory / "model")}
    if stage == "dpo":
        keys |= {"data_path": str(directory / "dpo.jsonl"), "max_length": 128}
    if stage == "grpo":
        keys |= {
            "data_path": str(directory / "grpo.jsonl"),
            "num_generations": 2,
            "max_completion_length": 4,
            "max_prompt_length": 64,
            "per_device_train_batch_size": 2,
        }
    recipe = write_tiny_recipe(directory, **{**keys, **overrides})
    if stage == "grpo":  # GRPO has max_prompt_length and max_completion_length, not max_length
        text = "\n".join(line for line in recipe.read_text().splitlines() if not line.startswith("max_length:"))
        recipe.write_text(text + "\n")
    return recipe


STAGE_CASES = {
    # DPO
    "dpo beta: -0.5": ("dpo", {"beta": -0.5}, r"beta: must be in \(0, inf\], got -0.5"),
    "dpo beta: 0": ("dpo", {"beta": 0}, r"beta: must be in \(0, inf\]"),
    "dpo beta: .nan": ("dpo", {"beta": float("nan")}, r"beta: must be in"),
    "dpo beta: high": ("dpo", {"beta": "high"}, r"--beta.*invalid float value: 'high'"),
    "dpo loss_type: typo": ("dpo", {"loss_type": "sigmoidd"}, r"loss_type: must be one of .*got 'sigmoidd'"),
    "dpo loss_type: []": ("dpo", {"loss_type": []}, r"loss_type: is empty"),
    "dpo loss_type: ''": ("dpo", {"loss_type": ""}, r"loss_type: must be one of .*got ''"),
    "dpo loss_weights: wrong length": (
        "dpo",
        {"loss_type": ["sigmoid_norm"], "loss_weights": [1.0, 1.0]},
        r"loss_weights` must have the same length",
    ),
    "dpo loss_weights: [0]": (
        "dpo",
        {"loss_type": ["sigmoid_norm"], "loss_weights": [0.0]},
        r"loss_weights: are all 0",
    ),
    "dpo loss_weights: [-1]": (
        "dpo",
        {"loss_type": ["sigmoid_norm"], "loss_weights": [-1.0]},
        r"loss_weights: must be in \[0, inf\]",
    ),
    "dpo label_smoothing: 0.5": ("dpo", {"label_smoothing": 0.5}, r"label_smoothing: must be in \[0, 0.5\)"),
    "dpo label_smoothing: -0.1": ("dpo", {"label_smoothing": -0.1}, r"label_smoothing: must be in"),
    "dpo exo_pair without smoothing": ("dpo", {"loss_type": "exo_pair"}, r"label_smoothing: exo_pair needs it"),
    "dpo f_divergence_type: kl": ("dpo", {"f_divergence_type": "kl"}, r"f_divergence_type: must be one of"),
    "dpo f_divergence with apo_zero": (
        "dpo",
        {"f_divergence_type": "js_divergence", "loss_type": "apo_zero"},
        r"f_divergence_type: js_divergence works only with",
    ),
    "dpo f_alpha_divergence_coef: 0": ("dpo", {"f_alpha_divergence_coef": 0}, r"f_alpha_divergence_coef: must be"),
    "dpo ld_alpha: 2": ("dpo", {"ld_alpha": 2}, r"ld_alpha: must be in \[0, 1\]"),
    "dpo discopop_tau: 0": ("dpo", {"discopop_tau": 0}, r"discopop_tau: must be in \(0, inf\]"),
    "dpo truncation_mode: middle": ("dpo", {"truncation_mode": "middle"}, r"truncation_mode: must be one of"),
    "dpo use_weighting with aot": ("dpo", {"use_weighting": True, "loss_type": "aot"}, r"use_weighting: TRL does"),
    "dpo precompute_ref_batch_size: 0": ("dpo", {"precompute_ref_batch_size": 0}, r"precompute_ref_batch_size"),
    "dpo ref_model_mixup_alpha: 2": (
        "dpo",
        {"sync_ref_model": True, "ref_model_mixup_alpha": 2},
        r"ref_model_mixup_alpha: must be in \[0, 1\]",
    ),
    "dpo ref_model_sync_steps: 0": (
        "dpo",
        {"sync_ref_model": True, "ref_model_sync_steps": 0},
        r"ref_model_sync_steps: must be at least 1",
    ),
    "dpo ref_model_name_or_path: missing": (
        "dpo",
        {"ref_model_name_or_path": "no/ref"},
        r"ref_model_name_or_path no/ref: no such model",
    ),
    "dpo ref_model_name_or_path: is output_dir": (
        "dpo",
        lambda d: {"ref_model_name_or_path": str(d / "ref"), "output_dir": str(d / "ref")},
        r"output_dir .*ref is ref_model_name_or_path",
    ),
    "dpo data_path: conversations": ("dpo", lambda d: {"data_path": str(d / "sft.jsonl")}, r':1: no "chosen" field'),
    "dpo max_length: 0": ("dpo", {"max_length": 0}, r"max_length: must be a positive number"),
    "dpo learning_rate: -1": ("dpo", {"learning_rate": -1}, r"learning_rate: must be >= 0"),
    # GRPO
    "grpo num_generations: 1": ("grpo", {"num_generations": 1}, r"at least 2 generations per prompt"),
    "grpo num_generations: 0": ("grpo", {"num_generations": 0}, r"a count the config divides by is 0"),
    "grpo num_generations: two": ("grpo", {"num_generations": "two"}, r"--num_generations.*invalid int value"),
    "grpo temperature: 0": ("grpo", {"temperature": 0}, r"temperature: must be in \(0, inf\]"),
    "grpo temperature: -1": ("grpo", {"temperature": -1}, r"temperature: must be in \(0, inf\]"),
    "grpo top_p: 0": ("grpo", {"top_p": 0}, r"top_p: must be in \(0, 1\]"),
    "grpo top_p: 1.5": ("grpo", {"top_p": 1.5}, r"top_p: must be in \(0, 1\]"),
    "grpo top_k: -1": ("grpo", {"top_k": -1}, r"top_k: must be >= 0"),
    "grpo min_p: 2": ("grpo", {"min_p": 2}, r"min_p: must be in \[0, 1\]"),
    "grpo repetition_penalty: 0": ("grpo", {"repetition_penalty": 0}, r"repetition_penalty: must be in"),
    "grpo beta: -0.1": ("grpo", {"beta": -0.1}, r"beta: must be in \[0, inf\]"),
    "grpo epsilon: -0.2": ("grpo", {"epsilon": -0.2}, r"epsilon: must be in \[0, inf\]"),
    "grpo epsilon_high: -1": ("grpo", {"epsilon_high": -1}, r"epsilon_high: must be in"),
    "grpo delta: 0.5": ("grpo", {"delta": 0.5}, r"delta: must be in \(1, inf\]"),
    "grpo num_iterations: 0": ("grpo", {"num_iterations": 0}, r"num_iterations: must be at least 1"),
    "grpo steps_per_generation: 0": ("grpo", {"steps_per_generation": 0}, r"error: "),
    "grpo steps_per_generation: 2, save_steps: 3": (
        "grpo",
        {"steps_per_generation": 2, "save_steps": 3},
        r"save_steps: must be a multiple of 2",
    ),
    "grpo generation_batch_size: 3": ("grpo", {"generation_batch_size": 3}, r"generation_batch_size \(3\) must be"),
    "grpo max_completion_length: 0": ("grpo", {"max_completion_length": 0}, r"max_completion_length: must be at"),
    "grpo max_prompt_length: 0": ("grpo", {"max_prompt_length": 0}, r"max_prompt_length: must be at least 1"),
    "grpo loss_type: typo": ("grpo", {"loss_type": "grpoo"}, r"loss_type: must be one of grpo, .*got 'grpoo'"),
    "grpo scale_rewards: yes": ("grpo", {"scale_rewards": "yes"}, r"scale_rewards: must be one of group, batch"),
    "grpo importance_sampling_level: seq": (
        "grpo",
        {"importance_sampling_level": "seq"},
        r"importance_sampling_level: must be one of token, sequence",
    ),
    "grpo sequence level with dapo": (
        "grpo",
        {"importance_sampling_level": "sequence", "loss_type": "dapo"},
        r"importance_sampling_level: sequence does not apply to loss_type dapo",
    ),
    "grpo multi_objective_aggregation: sum": (
        "grpo",
        {"multi_objective_aggregation": "sum"},
        r"multi_objective_aggregation: must be one of",
    ),
    "grpo reward_weights: [0]": ("grpo", {"reward_weights": [0.0]}, r"reward_weights: are all 0"),
    "grpo reward_weights: [-1]": ("grpo", {"reward_weights": [-1.0]}, r"reward_weights: .*trains against"),
    "grpo reward_weights: wrong length": ("grpo", {"reward_weights": [1.0, 2.0]}, r"2 weights for 1 rewards"),
    "grpo reward_funcs: typo": ("grpo", {"reward_funcs": ["exact_matchh"]}, r"unknown reward 'exact_matchh'"),
    "grpo reward_funcs: []": ("grpo", {"reward_funcs": []}, r"no reward: set reward_funcs"),
    "grpo reward_funcs: ['']": ("grpo", {"reward_funcs": [""]}, r"reward_funcs: "),
    "grpo reward_model_name_or_path: missing": (
        "grpo",
        {"reward_model_name_or_path": "no/rm"},
        r"reward_model_name_or_path no/rm: no such directory",
    ),
    "grpo reward_model_name_or_path: is output_dir": (
        "grpo",
        lambda d: {"reward_model_name_or_path": str(d / "a_dir"), "output_dir": str(d / "a_dir" / "run")},
        r"output_dir .*run lies inside reward_model_name_or_path",
    ),
    "grpo rows without answers": (
        "grpo",
        lambda d: {"data_path": str(d / "rlaif.jsonl")},
        r'none of the 1 rows has an "answer"',
    ),
    "grpo no_signal_patience: -1": ("grpo", {"no_signal_patience": -1}, r"no_signal_patience: must be >= 0"),
    "grpo sync_ref_model, ref_model_sync_steps: 0": (
        "grpo",
        {"sync_ref_model": True, "ref_model_sync_steps": 0},
        r"ref_model_sync_steps: must be at least 1",
    ),
    # LoRA
    "lora lora_r: 0": ("lora", {"lora_r": 0}, r"lora_r must be at least 1"),
    "lora lora_r: 2.5": ("lora", {"lora_r": 2.5}, r"lora_r.*2.5"),
    "lora lora_alpha: 0": ("lora", {"lora_alpha": 0}, r"lora_alpha: must be in \(0, inf\]"),
    "lora lora_alpha: -8": ("lora", {"lora_alpha": -8}, r"lora_alpha: must be in \(0, inf\]"),
    "lora lora_dropout: 1": ("lora", {"lora_dropout": 1}, r"lora_dropout: must be in \[0, 1\)"),
    "lora lora_dropout: -0.1": ("lora", {"lora_dropout": -0.1}, r"lora_dropout: must be in \[0, 1\)"),
    "lora lora_init_std: 0": ("lora", {"lora_init_std": 0}, r"lora_init_std: must be in \(0, inf\]"),
    "lora lora_init_std: -1": ("lora", {"lora_init_std": -1}, r"lora_init_std: must be in \(0, inf\]"),
    "lora lora_target_modules: []": ("lora", {"lora_target_modules": []}, r"lora_target_modules: must name"),
    "lora lora_target_modules: ['']": ("lora", {"lora_target_modules": [""]}, r"lora_target_modules: must name"),
    "lora model_name_or_path: null": ("lora", {"model_name_or_path": None}, r"LoRA adapts an existing model"),
    "lora model_name_or_path: missing": ("lora", {"model_name_or_path": "no/m"}, r"no/m: no such model"),
    "lora output_dir: the model": (
        "lora",
        lambda d: {"output_dir": str(d / "model"), "overwrite_output_dir": True},
        r"output_dir .*model is model_name_or_path",
    ),
    "lora output_dir: inside the model": (
        "lora",
        lambda d: {"output_dir": str(d / "model" / "lora")},
        r"output_dir .*lora lies inside model_name_or_path",
    ),
    # Reasoning SFT (recipes/reason.yaml: the SFT stage with tag weighting)
    "reason tag_loss_weight: -10": ("sft", {"tag_loss_weight": -10}, r"tag_loss_weight: must be in \[0, inf\]"),
    "reason tag_loss_weight: .inf": ("sft", {"tag_loss_weight": float("inf")}, r"tag_loss_weight: must be in"),
    "reason tag_loss_weight: ten": ("sft", {"tag_loss_weight": "ten"}, r"--tag_loss_weight.*invalid float value"),
    "reason tag_tokens: ['']": ("sft", {"tag_loss_weight": 10, "tag_tokens": [""]}, r"tag_tokens: must be non-empty"),
    "reason tag_tokens: []": ("sft", {"tag_loss_weight": 10, "tag_tokens": []}, r"tag_tokens: must be non-empty"),
    "reason tag_tokens: 5": ("sft", {"tag_loss_weight": 10, "tag_tokens": 5}, r"tag_tokens: expected a list"),
    "reason neftune_noise_alpha: -1": ("sft", {"neftune_noise_alpha": -1}, r"neftune_noise_alpha: must be in"),
    "reason output_dir: the model": (
        "sft",
        lambda d: {"output_dir": str(d / "model"), "overwrite_output_dir": True},
        r"output_dir .*model is model_name_or_path",
    ),
}
STAGE_MAINS = {"dpo": dpo.main, "grpo": grpo.main, "lora": lora.main, "sft": sft.main}


@pytest.mark.parametrize(("stage", "overrides", "message"), STAGE_CASES.values(), ids=STAGE_CASES.keys())
def test_stage_recipe_key_with_a_bad_value(stage_work, capsys, monkeypatch, stage, overrides, message):
    overrides = overrides(stage_work) if callable(overrides) else overrides
    argv = ["--config", str(stage_recipe(stage, stage_work, overrides))]
    before = sorted(p.name for p in (stage_work / "model").iterdir())
    line = one_error_line(lambda: run_cli(lambda: STAGE_MAINS[stage](argv)), capsys)
    assert re.search(message, line), line
    assert not (stage_work / "out").exists(), "output_dir was created before the error"
    assert sorted(p.name for p in (stage_work / "model").iterdir()) == before, "the start model was touched"


CONVERT_CASES = {
    "hf2pth of a missing source": (["hf2pth", "no/model", "{root}/m.pth"], r"no/model: no such model"),
    "hf2pth into a directory": (["hf2pth", "{model}", "{root}/a_dir"], r"a_dir: is a directory"),
    "hf2pth over its source": (["hf2pth", "{model}", "{model}"], r"the output would overwrite the source"),
    "pth2hf of a data file": (["pth2hf", "{root}/eval.jsonl", "{root}/hf"], r"error: .*eval.jsonl"),
    "pth2hf --dtype float8": (["pth2hf", "{model}", "{root}/hf", "--dtype", "float8"], r"invalid choice"),
    "pth2hf --hidden_size of another model": (
        ["pth2hf", "{model}", "{root}/hf", "--hidden_size", "64"],
        r"has hidden_size=32",
    ),
    "hf2llama without a tokenizer": (
        ["hf2llama", "{root}/m.pth", "{root}/llama"],
        r"error: ",
    ),
    "hf2qwen3 of a MiniMind2 model": (["hf2qwen3", "{model}", "{root}/q3"], r"has no Qwen3 equivalent"),
    "merge-lora of a model directory": (["merge-lora", "{model}", "{root}/merged"], r"not a PEFT adapter directory"),
    "lorapth2peft without --base": (["lorapth2peft", "{root}/x.pth", "{root}/peft"], r"--base"),
    "lorapth2peft of a missing file": (
        ["lorapth2peft", "{root}/no.pth", "{root}/peft", "--base", "{model}"],
        r"no.pth: no such",
    ),
    "peft2lorapth of a model directory": (["peft2lorapth", "{model}", "{root}/l.pth"], r"error: "),
    "no command": ([], r"required: command"),
}


@pytest.mark.parametrize(("argv", "message"), CONVERT_CASES.values(), ids=CONVERT_CASES.keys())
def test_convert_with_bad_arguments(tiny_model, capsys, argv, message):
    from minimind_hf import convert

    argv = [arg.format(model=tiny_model, root=tiny_model.parent) for arg in argv]
    line = one_error_line(lambda: convert.main(argv), capsys)
    assert re.search(message, line), line


TOKENIZER_CASES = {
    "files: []": ({"files": []}, r"files: no corpus given"),
    "files: missing": ({"files": ["no/corpus.jsonl"]}, r"files: no/corpus.jsonl: no such file"),
    "files: a directory": (lambda d: {"files": [str(d / "a_dir")]}, r"a_dir: is a directory"),
    "files: 5": ({"files": 5}, r"files: expected a list of strings, got 5"),
    "files: not JSON": (lambda d: {"files": [str(d / "bad.jsonl")]}, r"bad.jsonl:1: not JSON"),
    "vocab_size: 10": ({"vocab_size": 10}, r"vocab_size: must be at least 259"),
    "vocab_size: big": ({"vocab_size": "big"}, r"--vocab_size.*invalid int value"),
    "output_dir: a file": (lambda d: {"output_dir": str(d / "sft.jsonl")}, r"output_dir: .*sft.jsonl"),
    "output_dir: ''": ({"output_dir": ""}, r"output_dir: '' is not a directory"),
    "unknown key": ({"vocab_sise": 300}, r"unknown key 'vocab_sise' \(did you mean 'vocab_size'\?\)"),
}


@pytest.mark.parametrize(("overrides", "message"), TOKENIZER_CASES.values(), ids=TOKENIZER_CASES.keys())
def test_tokenizer_recipe_with_bad_values(work, capsys, overrides, message):
    import yaml

    from minimind_hf.testing import load_script

    overrides = overrides(work) if callable(overrides) else overrides
    recipe = {"files": [str(work / "sft.jsonl")], "output_dir": str(work / "tok"), "vocab_size": 300, **overrides}
    (work / "tokenizer.yaml").write_text(yaml.safe_dump(recipe))
    script = load_script(REPO / "recipes" / "tokenizer.py")
    line = one_error_line(lambda: run_cli(lambda: script.main(["--config", str(work / "tokenizer.yaml")])), capsys)
    assert re.search(message, line), line
    assert not (work / "tok").exists()


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo", "lora", "distill", "pretrain"])
def test_a_recipe_says_its_keys_and_their_defaults_with_help(stage, capsys):
    module = importlib.import_module(f"minimind_hf.stages.{stage}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config RECIPE.yaml" in out and "--learning_rate" in out and "--minimind_version" in out
    # The project's defaults, not TRL's: MiniMind's cosine schedule to 10% of the peak.
    assert "cosine_with_min_lr" in out
