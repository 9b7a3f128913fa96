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
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, Features, List, Value
from safetensors.torch import save_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.utils import SAFE_WEIGHTS_NAME
from trl import GRPOConfig, GRPOTrainer

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

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]


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

    return load(args.data_path), load(args.eval_data_path) if args.eval_data_path else None


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
