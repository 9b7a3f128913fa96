"""Every recipe key and every command-line flag with bad values: each case ends in one `error:` line, exits non-zero,
never shows a traceback, and (for the recipes) fails before any work, with nothing written to `output_dir`.

Each case runs the real command in-process through its `main(argv)` (the recipes through `run_cli`, as
`python recipes/sft.py` does), so a case that reached training would be slow and a traceback would fail it.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from minimind_hf import MiniMindConfig, MiniMindForCausalLM, chat, evaluate, plot
from minimind_hf import data as data_cli
from minimind_hf.stages import pretrain, sft
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
