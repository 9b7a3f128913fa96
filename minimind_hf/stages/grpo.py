"""GRPO of MiniMind with TRL's GRPOTrainer (MiniMind's `train_grpo.py`, the HF way).

    python recipes/grpo.py --config recipes/grpo.yaml
    torchrun --nproc_per_node 2 recipes/grpo.py --config recipes/grpo.yaml --reward_funcs exact_match

Every key of the YAML (and of `--key value` on the command line) belongs to `GRPOArguments`
(below: the project's keys plus `reward_funcs`, `reward_model_name_or_path`, `max_prompt_length`) or
to TRL's `GRPOConfig`. All input, the rewards included, is checked before any work starts.

Rows (JSON Lines), validated line by line with `file:line` errors like SFT data (`minimind_hf.data`):

- MiniMind's RLAIF rows: `{"conversations": [..., {"role": "assistant", "content": "<reference or empty>"}]}`;
- this project's evaluation rows: the same plus `"task"` and `"answer"` (`data/eval.jsonl`, `data/grpo.jsonl`).

The prompt is every message before the last (assistant) one, rendered with the generation prompt. Each row becomes
`prompt` (messages), `answer` (None for RLAIF rows), `solution` (the same, the column TRL's accuracy rewards read),
`task` and `reference` (the last assistant message); every column but `prompt` reaches the reward functions.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, Features, List, Value
from safetensors.torch import save_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.utils import SAFE_WEIGHTS_NAME
from trl import GRPOConfig, GRPOTrainer

from ..checkpointing import checkpoint_step, resolve_resume
from ..checks import check_choice, check_number
from ..data import InvalidRecord, conversation_messages, load_records, register_format
from ..errors import RecipeError
from ..loading import source_kind
from ..rewards import resolve_reward_funcs
from ..training import MiniMindArguments, Stage, run_cli, run_recipe

logger = logging.getLogger("minimind_hf")

GRPO_FEATURES = Features(
    {
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "answer": Value("string"),
        "solution": Value("string"),
        "task": Value("string"),
        "reference": Value("string"),
    }
)


def _grpo_row(record: dict) -> dict:
    messages = conversation_messages(record.get("conversations"))
    if messages[-1]["role"] != "assistant":
        raise InvalidRecord(
            "bad_order",
            "the last message must be the assistant's (a reference reply, or empty): the prompt is "
            "every message before it",
        )
    for key in ("answer", "task"):
        if key in record and not isinstance(record[key], str):
            raise InvalidRecord("bad_field", f'"{key}" is a {type(record[key]).__name__}, not a string')
    answer = record.get("answer")
    return {
        "prompt": messages[:-1],
        "answer": answer,
        "solution": answer,
        "task": record.get("task"),
        "reference": messages[-1]["content"],
    }


register_format("grpo", _grpo_row, GRPO_FEATURES)


@dataclass
class GRPOArguments(MiniMindArguments):
    """The GRPO recipe's own keys, beside `MiniMindArguments` and TRL's `GRPOConfig`."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_match"],
        metadata={"help": "names from minimind_hf.rewards.REWARD_FUNCS, or module.function import paths"},
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "a local sequence-classification reward model directory (with its tokenizer)"},
    )
    max_prompt_length: int | None = field(
        default=66,
        metadata={
            "help": "longest prompt in tokens (chat template and generation prompt included); a longer one is an "
            "error naming its line (skipped and counted with skip_invalid). The original cuts prompts from the "
            "left to its --max_seq_len 66, which can cut off the chat header; null: no limit"
        },
    )

    no_signal_patience: int = field(
        default=0,
        metadata={
            "help": "stop when every group's rewards were equal (every advantage 0) for this many steps in a row; "
            "0: only log it. A window where no completion could be scored (every reward None/NaN) always stops"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]


# What TRL 1.16's GRPOTrainer accepts; it rejects other values only once the models are loaded, or mid-training.
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
# Rewards that score a row only through its `answer` (TRL's: `solution`, the same column): None without one.
ANSWER_REWARDS = ("exact_match", "answer_match", "accuracy_reward", "reasoning_accuracy_reward")


def generation_cycle(training_args: GRPOConfig) -> int:
    """Optimizer steps per generation cycle: TRL generates once every `steps_per_generation * num_iterations`
    micro-batches and reuses those completions until then. A cycle cut by a checkpoint cannot resume exactly (the
    buffered completions are not saved), so checkpoints must fall on cycle boundaries."""
    micro = training_args.steps_per_generation * training_args.num_iterations
    return math.lcm(micro, training_args.gradient_accumulation_steps) // training_args.gradient_accumulation_steps


def check_grpo(args: GRPOArguments, training_args: GRPOConfig) -> None:
    """The GRPO keys whose value would invert or zero the objective, or that TRL rejects only late."""
    check_number("temperature", training_args.temperature, low=0, low_open=True, why="sampling needs it above 0")
    check_number("top_p", training_args.top_p, low=0, high=1, low_open=True)
    check_number("min_p", training_args.min_p, low=0, high=1)
    check_number("repetition_penalty", training_args.repetition_penalty, low=0, low_open=True)
    if training_args.top_k < 0:
        raise RecipeError(f"top_k: must be >= 0 (0: no top-k), got {training_args.top_k}")
    # beta 0 is legal (no KL term, no reference model); a negative one would reward drifting from the reference.
    check_number("beta", training_args.beta, low=0, why="a negative KL weight rewards drifting away")
    check_number("epsilon", training_args.epsilon, low=0, why="the clipping range")
    check_number("epsilon_high", training_args.epsilon_high, low=0)
    check_number("delta", training_args.delta, low=1, low_open=True, why="the two-sided clip bound, above 1")
    check_number("top_entropy_quantile", training_args.top_entropy_quantile, low=0, high=1)
    for key in ("num_iterations", "steps_per_generation", "max_completion_length", "num_generations"):
        value = getattr(training_args, key)
        if value is not None and value < 1:
            raise RecipeError(f"{key}: must be at least 1, got {value}")
    if args.max_prompt_length is not None and args.max_prompt_length < 1:
        raise RecipeError(f"max_prompt_length: must be at least 1 (null: no limit), got {args.max_prompt_length}")
    if args.no_signal_patience < 0:
        raise RecipeError(f"no_signal_patience: must be >= 0 (0: off), got {args.no_signal_patience}")
    check_choice("loss_type", training_args.loss_type, GRPO_LOSS_TYPES)
    check_choice("scale_rewards", training_args.scale_rewards, SCALE_REWARDS)
    check_choice("importance_sampling_level", training_args.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    check_choice("multi_objective_aggregation", training_args.multi_objective_aggregation, AGGREGATIONS)
    if training_args.importance_sampling_level == "sequence" and training_args.loss_type in (
        "bnpo",
        "dr_grpo",
        "dapo",
        "cispo",
    ):
        raise RecipeError(f"importance_sampling_level: sequence does not apply to loss_type {training_args.loss_type}")
    rewards = len(args.reward_funcs) + bool(args.reward_model_name_or_path)
    weights = training_args.reward_weights
    if weights is not None:
        if len(weights) != rewards:
            raise RecipeError(
                f"reward_weights: {len(weights)} weights for {rewards} rewards (the reward model first, then "
                "reward_funcs)"
            )
        for weight in weights:
            check_number("reward_weights", weight, low=0, why="a negative weight trains against that reward")
        if not any(weights):
            raise RecipeError(f"reward_weights: are all 0 ({weights}): every advantage would be 0")
    if training_args.sync_ref_model:
        check_number("ref_model_mixup_alpha", training_args.ref_model_mixup_alpha, low=0, high=1)
        if training_args.ref_model_sync_steps < 1:
            raise RecipeError(f"ref_model_sync_steps: must be at least 1, got {training_args.ref_model_sync_steps}")
    _check_generation_cycle(training_args)


def _check_generation_cycle(training_args: GRPOConfig) -> None:
    cycle = generation_cycle(training_args)
    if cycle == 1:
        return
    what = (
        f"a generation cycle is {cycle} optimizer steps (steps_per_generation {training_args.steps_per_generation} x "
        f"num_iterations {training_args.num_iterations} / gradient_accumulation_steps "
        f"{training_args.gradient_accumulation_steps}), whose completions a checkpoint does not hold"
    )
    save_steps = training_args.save_steps
    if training_args.save_strategy == "steps" and save_steps >= 1 and int(save_steps) % cycle:
        raise RecipeError(f"save_steps: must be a multiple of {cycle}: {what}, so a resume would not be exact")
    resume_from = resolve_resume(training_args)
    step = checkpoint_step(resume_from) if resume_from is not None else None
    if step is not None and step % cycle:
        raise RecipeError(f"resume_from_checkpoint: {resume_from} was saved at step {step}, inside a cycle: {what}")


def _prompt_length_check(tokenizer: PreTrainedTokenizerBase, limit: int, template_kwargs: dict):
    def check(row: dict) -> None:
        ids = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False, **template_kwargs
        )
        if len(ids) > limit:
            raise InvalidRecord("prompt_too_long", f"the prompt is {len(ids)} tokens, over max_prompt_length={limit}")

    return check


def load_grpo_dataset(
    paths,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int | None,
    skip_invalid: bool = False,
    chat_template_kwargs: dict | None = None,
) -> Dataset:
    """Prompt rows from RLAIF or evaluation-format JSON Lines, validated; see the module doc."""
    check = None
    if max_prompt_length is not None:
        check = _prompt_length_check(tokenizer, max_prompt_length, chat_template_kwargs or {})
    return load_records(paths, "grpo", skip_invalid=skip_invalid, check=check)


def check_reward_model(path: str) -> None:
    """A reward model directory that will load: fail before any work when it will not."""
    directory = Path(path)
    if not directory.is_dir():
        raise RecipeError(f"reward_model_name_or_path {path}: no such directory (a local reward model is needed)")
    for needed, what in (("config.json", "an HF model directory"), ("tokenizer_config.json", "its tokenizer")):
        if not (directory / needed).is_file():
            raise RecipeError(f"reward_model_name_or_path {path}: no {needed} ({what} is needed)")


def load_datasets(args: GRPOArguments, training_args: GRPOConfig, tokenizer: PreTrainedTokenizerBase) -> tuple:
    """The prompt datasets; the reward names and the reward model directory are checked here too, since this is
    the stage's hook that runs before the model is loaded."""
    try:
        resolve_reward_funcs(args.reward_funcs, training_args)
    except ValueError as err:
        raise RecipeError(f"reward_funcs: {err}") from err
    if not args.reward_funcs and not args.reward_model_name_or_path:
        raise RecipeError("no reward: set reward_funcs and/or reward_model_name_or_path")
    if args.reward_model_name_or_path:
        check_reward_model(args.reward_model_name_or_path)

    def load(paths):
        return load_grpo_dataset(
            paths,
            tokenizer,
            max_prompt_length=args.max_prompt_length,
            skip_invalid=args.skip_invalid,
            chat_template_kwargs=training_args.chat_template_kwargs,
        )

    train = load(args.data_path)
    _check_rows_can_be_scored(args, train)
    return train, load(args.eval_data_path) if args.eval_data_path else None


def _check_rows_can_be_scored(args: GRPOArguments, dataset: Dataset) -> None:
    """Refuse data on which no reward can ever be computed: every reward reads the `answer` and no row has one
    (MiniMind's RLAIF rows). Training would log loss 0 at every step and save the unchanged model."""
    if args.reward_model_name_or_path or not set(args.reward_funcs) <= set(ANSWER_REWARDS):
        return
    if all(answer is None for answer in dataset["answer"]):
        raise RecipeError(
            f'data_path: none of the {len(dataset)} rows has an "answer", which every reward of reward_funcs '
            f"({', '.join(args.reward_funcs)}) needs: no completion could be scored. Add answers, or a reward that "
            "needs none (reasoning_format, reasoning_tags, a reward model)"
        )


def _reward_model(path: str):
    """The reward model and its tokenizer; TRL scores the last non-padding token, so a pad token is needed."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class _ReferenceDirectory:
    """`GRPOTrainer` builds its frozen reference model by loading `model.config._name_or_path` again, which must be
    an HF directory holding the starting weights. A model that came from elsewhere (a `.pth`, a merged adapter, a
    Llama export, a fresh one) is saved to a temporary directory for it, removed once the reference is loaded."""

    def __init__(self, model, source: str | None, needed: bool):
        self.path = None
        if not needed:
            return
        if source is not None and source_kind(source) == "minimind":
            model.config._name_or_path = str(source)
            return
        self.path = tempfile.mkdtemp(prefix="minimind-grpo-reference-")
        # Every process writes its own copy: `save_pretrained` writes on rank 0 only under torch.distributed.
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(self.path)
        save_model(model, str(Path(self.path, SAFE_WEIGHTS_NAME)), metadata={"format": "pt"})
        model.config._name_or_path = self.path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def build_grpo_trainer(
    model,
    tokenizer: PreTrainedTokenizerBase,
    training_args: GRPOConfig,
    train_dataset,
    eval_dataset=None,
    callbacks: list[TrainerCallback] = (),
    args: GRPOArguments | None = None,
) -> GRPOTrainer:
    """TRL's `GRPOTrainer` with the recipe's rewards: the reward model first (when given), then `reward_funcs`."""
    reward_funcs, reward_tokenizers = [], []
    if args.reward_model_name_or_path:
        reward_model, reward_tokenizer = _reward_model(args.reward_model_name_or_path)
        reward_funcs.append(reward_model)
        reward_tokenizers.append(reward_tokenizer)
    functions = resolve_reward_funcs(args.reward_funcs, training_args)
    reward_funcs += functions
    reward_tokenizers += [None] * len(functions)
    with _ReferenceDirectory(model, args.model_name_or_path, needed=training_args.beta != 0.0):
        return GRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            reward_processing_classes=reward_tokenizers,
            callbacks=list(callbacks),
        )


# The original's defaults (train_grpo.py) where they differ from GRPOConfig's and the project's.
GRPO = Stage(
    name="grpo",
    load_datasets=load_datasets,
    config_class=GRPOConfig,
    arguments_class=GRPOArguments,
    build_trainer=build_grpo_trainer,
    check=check_grpo,
    defaults={
        "data_path": ["data/grpo.jsonl"],
        "learning_rate": 8e-8,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 16,
        "num_generations": 8,
        "beta": 0.02,
        "temperature": 0.8,
        "max_completion_length": 1536,
        "loss_type": "grpo",
        "logging_steps": 1,
        "save_steps": 10,
        "pth_weight_name": "grpo",
        "swanlab_project": "MiniMind-GRPO",
    },
)


def main(argv: list[str] | None = None, **hooks):
    """`hooks`: `callbacks` and `before_train`, as `run_recipe` takes them."""
    return run_recipe(GRPO, argv, **hooks)


if __name__ == "__main__":
    run_cli(main)
