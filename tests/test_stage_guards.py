"""Guard rails of the newer stages (issue #22), one test per class, each on the real recipe and a tiny model:
an input model is never lost, an objective is never inverted or zeroed, a run without signal is not saved as
finished, conversions never write inf, recipes mean what they say, resumes do not silently change the run, and
TRL's own checks come before any work."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import yaml

from minimind_hf import convert
from minimind_hf.checkpointing import MANIFEST, list_checkpoints
from minimind_hf.errors import RecipeError, TrainingGaveNoSignal
from minimind_hf.guards import RECIPE_FILE
from minimind_hf.stages import dpo, grpo, lora, sft
from minimind_hf.testing import TINY_RECIPE, save_hf_dir, tiny_model, write_jsonl, write_sft_data, write_tiny_recipe

pytestmark = pytest.mark.usefixtures("datasets_cache")

torch.set_num_threads(1)


@pytest.fixture
def base(tmp_path) -> Path:
    write_sft_data(tmp_path / "sft.jsonl", 16)
    return save_hf_dir(tiny_model(), tmp_path / "base")


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


# 1. The start model is lost ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["the model directory", "inside it", "holding it"],
)
def test_lora_with_output_dir_over_its_model_is_refused_and_the_model_untouched(tmp_path, base, where):
    out = {"the model directory": base, "inside it": base / "run", "holding it": tmp_path}[where]
    before = file_bytes(base)
    recipe = write_tiny_recipe(tmp_path, model_name_or_path=str(base), output_dir=str(out), overwrite_output_dir=True)
    with pytest.raises(RecipeError, match=r"output_dir .* model_name_or_path .*: the run would write over"):
        lora.main(["--config", str(recipe)])
    assert file_bytes(base) == before


def test_dpo_output_dir_is_its_reference_model_is_refused(tmp_path, base):
    ref = save_hf_dir(tiny_model(seed=1), tmp_path / "ref")
    recipe = write_tiny_recipe(
        tmp_path, model_name_or_path=str(base), ref_model_name_or_path=str(ref), output_dir=str(ref)
    )
    with pytest.raises(RecipeError, match=r"output_dir .*ref is ref_model_name_or_path"):
        dpo.main(["--config", str(recipe)])


def test_sft_output_dir_holding_the_tokenizer_is_refused(tmp_path, base):
    recipe = write_tiny_recipe(tmp_path, tokenizer_name_or_path=str(base), output_dir=str(base.parent))
    with pytest.raises(RecipeError, match=r"contains tokenizer_name_or_path"):
        sft.main(["--config", str(recipe)])


# 3. Objectives that learn backwards, or nothing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "keys", "message"),
    [
        (dpo, {"beta": -0.5}, r"beta: must be in \(0, inf\], got -0.5"),
        (dpo, {"beta": 0.0}, r"beta: must be in \(0, inf\]"),
        (dpo, {"label_smoothing": 0.5}, r"label_smoothing: must be in \[0, 0.5\)"),
        (dpo, {"loss_type": ["sigmoid_norm"], "loss_weights": [0.0]}, r"loss_weights: are all 0"),
        (grpo, {"temperature": 0.0}, r"temperature: must be in \(0, inf\]"),
        (grpo, {"epsilon": -0.1}, r"epsilon: must be in \[0, inf\]"),
        (grpo, {"beta": -0.02}, r"beta: must be in \[0, inf\]"),
        (grpo, {"reward_weights": [0.0]}, r"reward_weights: are all 0"),
        (grpo, {"reward_weights": [-1.0]}, r"reward_weights: .*trains against that reward"),
        (grpo, {"reward_weights": [1.0, 1.0]}, r"reward_weights: 2 weights for 1 rewards"),
        (grpo, {"num_generations": 1}, r"at least 2 generations"),
        (lora, {"lora_alpha": -8.0}, r"lora_alpha: must be in \(0, inf\]"),
        (lora, {"lora_dropout": 1.0}, r"lora_dropout: must be in \[0, 1\)"),
        (lora, {"lora_init_std": 0.0}, r"lora_init_std: .*0 leaves A and B at 0"),
        (sft, {"tag_loss_weight": -10.0}, r"tag_loss_weight: must be in \[0, inf\]"),
    ],
)
def test_inverted_or_zeroed_objectives_are_refused_before_any_work(tmp_path, base, stage, keys, message):
    recipe = stage_recipe(stage, tmp_path, base, **keys)
    with pytest.raises(RecipeError, match=message):
        stage.main(["--config", str(recipe)])
    assert not (tmp_path / "out").exists()


def test_learning_rate_0_is_allowed_and_said_in_the_log(tmp_path, caplog):
    from minimind_hf import checks
    from minimind_hf.training import MiniMindArguments, parse_recipe

    write_sft_data(tmp_path / "sft.jsonl", 4)
    recipe = write_tiny_recipe(tmp_path, learning_rate=0.0)
    args, training_args = parse_recipe(argv=["--config", str(recipe)])
    assert isinstance(args, MiniMindArguments)
    with caplog.at_level(logging.WARNING, logger="minimind_hf"):
        checks.check_recipe(args, training_args)
    assert "learning_rate is 0: the weights will not change" in caplog.text


def stage_recipe(stage, tmp_path: Path, base: Path, **keys) -> Path:
    """A tiny recipe of `stage` starting from `base` (GRPO's has prompts with answers and no max_length)."""
    if stage is grpo:
        return grpo_recipe(tmp_path, [question(i, str(i + 1)) for i in range(8)], model_name_or_path=str(base), **keys)
    return write_tiny_recipe(tmp_path, model_name_or_path=str(base), **keys)


# 4. Runs that learned nothing are not saved as finished --------------------------------------------------------


def grpo_recipe(tmp_path: Path, rows: list[dict], **keys) -> Path:
    data = write_jsonl(tmp_path / "grpo.jsonl", rows)
    recipe = {
        **{k: v for k, v in TINY_RECIPE.items() if k != "max_length"},
        "data_path": str(data),
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 4,
        "max_prompt_length": 64,
        "logging_steps": 1,
        "reward_funcs": ["exact_match"],
        **keys,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def question(i: int, answer: str | None) -> dict:
    row = {"conversations": [{"role": "user", "content": f"{i} plus 1?"}, {"role": "assistant", "content": ""}]}
    return row if answer is None else {**row, "task": "add", "answer": answer}


def test_grpo_rows_without_the_answer_the_reward_needs_are_refused_up_front(tmp_path):
    recipe = grpo_recipe(tmp_path, [question(i, None) for i in range(8)])
    with pytest.raises(RecipeError, match=r'none of the 8 rows has an "answer", which every reward .*exact_match'):
        grpo.main(["--config", str(recipe)])
    assert not (tmp_path / "out").exists()


def test_grpo_whose_reward_is_nan_everywhere_stops_without_a_final_model(tmp_path, monkeypatch):
    reward = "def nan_reward(completions, **kw):\n    return [float('nan')] * len(completions)\n"
    (tmp_path / "nan_reward.py").write_text(reward)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = grpo_recipe(tmp_path, [question(i, str(i + 1)) for i in range(8)], reward_funcs=["nan_reward.nan_reward"])
    with pytest.raises(TrainingGaveNoSignal, match=r"no completion could be scored"):
        grpo.main(["--config", str(recipe)])
    assert not (tmp_path / "out" / "model.safetensors").exists()
    sys.modules.pop("nan_reward", None)


# 5. Conversions that would write inf ---------------------------------------------------------------------------


def huge_model(tmp_path: Path) -> Path:
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = 1e6
    return save_hf_dir(model, tmp_path / "huge")


@pytest.mark.parametrize(
    "command",
    [
        ["hf2pth", "{src}", "{out}.pth"],
        ["pth2hf", "{src}", "{out}", "--dtype", "float16"],
        ["hf2llama", "{src}", "{out}", "--dtype", "float16"],
    ],
    ids=["hf2pth", "pth2hf --dtype float16", "hf2llama --dtype float16"],
)
def test_conversions_refuse_a_weight_beyond_fp16_naming_it(tmp_path, capsys, command):
    src = huge_model(tmp_path)
    argv = [arg.format(src=src, out=tmp_path / "converted") for arg in command]
    with pytest.raises(SystemExit):
        convert.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar of saving the source
    assert err.startswith("error: ")
    assert "model.layers.1.self_attn.o_proj.weight holds 1e+06, beyond fp16's range" in err
    assert not list(tmp_path.glob("converted*"))


def test_bf16_narrowing_has_the_range_and_counts_underflow(caplog):
    from minimind_hf.formats.precision import narrow

    with caplog.at_level(logging.WARNING, logger="minimind_hf"):
        out = narrow({"w": torch.tensor([1e6, 1e-50, 0.0], dtype=torch.float64)}, torch.bfloat16)
    assert out["w"][0].item() > 9e5
    assert "1 nonzero weights are below bf16's smallest value" in caplog.text


# 6. Recipes that say two things --------------------------------------------------------------------------------


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    write_sft_data(tmp_path / "sft.jsonl", 4)
    recipe = write_tiny_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "learning_rate: 0.5\n")
    first = 1 + next(i for i, line in enumerate(recipe.read_text().splitlines()) if line.startswith("learning_rate"))
    last = len(recipe.read_text().splitlines())
    with pytest.raises(RecipeError, match=rf"recipe.yaml:{last}: key 'learning_rate' is given twice \(lines {first} "):
        sft.main(["--config", str(recipe)])


# 7. Resumes that change what cannot change ---------------------------------------------------------------------


def test_resume_with_another_learning_rate_is_refused_and_a_longer_run_is_said(tmp_path, caplog):
    write_sft_data(tmp_path / "sft.jsonl", 16)
    recipe = write_tiny_recipe(tmp_path, max_steps=2, save_steps=2)
    sft.main(["--config", str(recipe)])
    checkpoint = list_checkpoints(tmp_path / "out")[-1]
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    assert RECIPE_FILE in json.dumps(manifest), "the recipe is covered by the checkpoint's seal"
    assert json.loads((checkpoint / RECIPE_FILE).read_text())["learning_rate"] == 1e-3

    resume = ["--config", str(recipe), "--resume_from_checkpoint", "true"]
    with pytest.raises(RecipeError, match=r"cannot change midway \((.*, )?per_device_train_batch_size 4 -> 2") as err:
        sft.main([*resume, "--learning_rate", "1e-2", "--per_device_train_batch_size", "2", "--max_steps", "4"])
    assert "learning_rate 0.001 -> 0.01" in str(err.value) and "max_steps" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="minimind_hf"):
        trainer = sft.main([*resume, "--max_steps", "4", "--logging_steps", "3"])
    line = next(line for line in caplog.text.splitlines() if "changed keys, the new values win" in line)
    assert "max_steps 2 -> 4" in line and "logging_steps 10 -> 3" in line
    assert "the learning-rate schedule continues over the new length" in line
    # ... and the new interval is the one used (transformers would restore the checkpoint's 10).
    assert trainer.state.logging_steps == 3
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [3]


def test_grpo_save_steps_inside_a_generation_cycle_is_refused(tmp_path):
    recipe = grpo_recipe(tmp_path, [question(i, str(i + 1)) for i in range(8)], steps_per_generation=2, save_steps=3)
    with pytest.raises(RecipeError, match=r"save_steps: must be a multiple of 2: a generation cycle is 2 optimizer"):
        grpo.main(["--config", str(recipe)])


# 8. TRL's checks before any work -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "keys", "message"),
    [
        (dpo, {"loss_type": "sigmoidd"}, r"loss_type: must be one of sigmoid, .*got 'sigmoidd'"),
        (dpo, {"f_divergence_type": "forward_kl", "loss_type": "apo_zero"}, r"f_divergence_type: forward_kl works"),
        (grpo, {"loss_type": "grpoo"}, r"loss_type: must be one of grpo, .*got 'grpoo'"),
        (grpo, {"scale_rewards": "yes"}, r"scale_rewards: must be one of group, batch, none, got 'yes'"),
        (grpo, {"importance_sampling_level": "seq"}, r"importance_sampling_level: must be one of token, sequence"),
    ],
)
def test_values_trl_rejects_late_are_refused_first(tmp_path, base, stage, keys, message, monkeypatch):
    # The tokenizer is the first thing a run loads (then the data, then the models): the check must come before.
    monkeypatch.setattr("minimind_hf.training.load_tokenizer", lambda *a, **k: pytest.fail("work started"))
    recipe = stage_recipe(stage, tmp_path, base, **keys)
    with pytest.raises(RecipeError, match=message):
        stage.main(["--config", str(recipe)])


def test_saved_pth_is_fp16_and_finite(tmp_path):
    from minimind_hf.formats.pth import save_pth

    path = save_pth(tiny_model(), tmp_path / "m.pth")
    state = torch.load(path, weights_only=True)
    assert all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in state.values())


def test_grpo_resume_from_a_checkpoint_inside_a_generation_cycle_is_refused(tmp_path):
    # max_steps 3 with a 2-step cycle: the final checkpoint-3 is cut inside the second cycle.
    rows = [question(i, str(i + 1)) for i in range(8)]
    recipe = grpo_recipe(tmp_path, rows, steps_per_generation=2, save_steps=2, max_steps=3, learning_rate=1e-3)
    grpo.main(["--config", str(recipe)])
    assert (tmp_path / "out" / "checkpoint-3").is_dir()
    longer = ["--config", str(recipe), "--resume_from_checkpoint", "true", "--max_steps", "6"]
    with pytest.raises(RecipeError, match=r"checkpoint-3 was saved at step 3, inside a cycle: a generation cycle is 2"):
        grpo.main(longer)
    # From a checkpoint on a cycle boundary the resume goes ahead.
    grpo.main([*longer[:2], "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-2"), "--max_steps", "4"])
