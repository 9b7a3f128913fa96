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

Defaults by the policy's generation, where the recipe leaves a key null (`resolve_generation_defaults`):

| key | MiniMind2 (the seed's `train_grpo.py`) | MiniMind-3 (today's `train_grpo.py`) |
|---|---|---|
| `loss_type` | `grpo` | `cispo` |
| `beta` | 0.02 | 0.1 |
| `epsilon_high` | `epsilon` (0.2) | 5.0 with `cispo` (the cap on the ratio), `epsilon` with `grpo` |
| `thinking_ratio` | off (MiniMind2's template has no `open_thinking`) | 0.9 |
| MoE balance loss | not added | added (MiniMind-3's `aux_loss`) |

`num_generations` (8) is TRL's and checked against the batch size when the recipe is parsed, before the model is
known: a MiniMind-3 recipe sets 6 (recipes/minimind3/grpo.yaml). `thinking_ratio` is the share of prompts rendered
with the MiniMind-3 template's `open_thinking`: drawn once per row with the seed, and the prompt then goes to TRL
as rendered text (its messages stay in `prompt_messages` for a reward model).

`grpo_loss_averaging`: `sequence` (the original's: each sequence's per-token loss averaged over its completion
tokens, then over sequences) or `trl` (whatever TRL does for `loss_type`). For `loss_type: grpo` TRL already averages
per sequence; its `cispo` averages over all tokens of the batch, and no TRL option gives per-sequence CISPO, so
`sequence` (the default) makes `MiniMindGRPOTrainer.compute_loss` compute the loss itself for `grpo` and `cispo`:

    ratio = exp(logp - old_logp), KL = exp(ref - logp) - (ref - logp) - 1
    grpo:  -(min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) - beta * KL)
    cispo: -(stopgrad(min(ratio, eps_high)) * A * logp - beta * KL)

plus the MoE balance loss of a MiniMind-3 policy. The KL term is the original's: TRL's `use_bias_correction_kl`
(on by default, it multiplies the KL by the ratio) does not apply to this path. TRL's options this path does not
implement (sequence-level importance sampling, entropy masks and bonus, off-policy masks, vLLM correction) are
refused with it.

The reward model (`reward_model_name_or_path`) is `rewards.RewardModelScore`: a local sequence classifier or a local
remote-code model with `get_score` (InternLM2-1.8B-Reward), scoring the answer after `</think>`, clipped to
+-`reward_model_clip`.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, Features, List, Value
from safetensors.torch import save_model
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.utils import SAFE_WEIGHTS_NAME
from trl import GRPOConfig, GRPOTrainer

from ..data import InvalidRecord, conversation_messages, load_records, register_format
from ..errors import RecipeError
from ..loading import source_kind
from ..modeling_minimind3 import minimind3_aux_loss
from ..rewards import RewardModelScore, resolve_reward_funcs
from ..training import MiniMindArguments, Stage, run_cli, run_recipe
from .moe import capture_router_logits, has_minimind3_moe, model_generation

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

    thinking_ratio: float | None = field(
        default=None,
        metadata={
            "help": "share of prompts rendered with open_thinking (MiniMind-3's template), drawn per row with the "
            "seed; null: 0.9 with a template that has open_thinking, else off"
        },
    )
    grpo_loss_averaging: str | None = field(
        default=None,
        metadata={
            "help": "sequence (the original: per sequence, then over sequences; grpo and cispo) or trl (TRL's own "
            "for loss_type); null: sequence for grpo and cispo, trl otherwise"
        },
    )
    reward_model_clip: float | None = field(
        default=3.0, metadata={"help": "the reward model's score is clipped to +-this (MiniMind-3: 3); null: not"}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if self.thinking_ratio is not None and not 0.0 <= self.thinking_ratio <= 1.0:
            raise RecipeError(f"thinking_ratio must be between 0 and 1 (or null), not {self.thinking_ratio}")
        if self.grpo_loss_averaging not in (None, "sequence", "trl"):
            raise RecipeError(f"grpo_loss_averaging must be sequence, trl or null, not {self.grpo_loss_averaging!r}")
        if self.reward_model_clip is not None and self.reward_model_clip <= 0:
            raise RecipeError(f"reward_model_clip must be > 0 (or null), not {self.reward_model_clip}")


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


# What each generation of the original trains with where they differ (see the module doc).
LOSS_TYPE_BY_GENERATION = {2: "grpo", 3: "cispo"}
BETA_BY_GENERATION = {2: 0.02, 3: 0.1}
CISPO_EPSILON_HIGH = 5.0
DEFAULT_THINKING_RATIO = 0.9
# The options of TRL's loss that `MiniMindGRPOTrainer`'s own (sequence-averaged) loss does not implement, with
# their neutral values.
_TRL_ONLY_OPTIONS = {
    "importance_sampling_level": "token",
    "top_entropy_quantile": 1.0,
    "off_policy_mask_threshold": None,
    "delta": None,
    "use_vllm": False,
}


def takes_open_thinking(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template renders MiniMind-3's `open_thinking` generation prompt."""
    return "open_thinking" in (tokenizer.chat_template or "")


def check_loss_keys(args: GRPOArguments, training_args: GRPOConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """The new keys against each other and the tokenizer, before any work (one-line errors)."""
    if args.thinking_ratio is not None and not takes_open_thinking(tokenizer):
        raise RecipeError(
            "thinking_ratio needs a chat template with open_thinking (MiniMind-3's); this tokenizer's has none"
        )
    if training_args.loss_type is not None and training_args.loss_type not in ("grpo", "cispo"):
        if args.grpo_loss_averaging == "sequence":
            raise RecipeError(
                f"grpo_loss_averaging: sequence applies to loss_type grpo and cispo, not {training_args.loss_type}"
            )
    if args.grpo_loss_averaging != "trl":
        for key, neutral in _TRL_ONLY_OPTIONS.items():
            if getattr(training_args, key, neutral) != neutral:
                raise RecipeError(
                    f"{key}: {getattr(training_args, key)} is not implemented by the original's sequence-averaged "
                    "loss; set grpo_loss_averaging: trl to use TRL's loss"
                )
    if training_args.beta is not None and training_args.beta < 0:
        raise RecipeError(f"beta must be >= 0, not {training_args.beta}")


def render_prompts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, ratio: float, seed: int) -> Dataset:
    """Each row's prompt rendered as text, with `open_thinking` drawn with probability `ratio` (one draw per row,
    from `seed`); the messages move to `prompt_messages`, the draw to `open_thinking`."""
    draws = random.Random(seed)
    thinking = [draws.random() < ratio for _ in range(len(dataset))]

    def render(row: dict, index: int) -> dict:
        text = tokenizer.apply_chat_template(
            row["prompt"], tokenize=False, add_generation_prompt=True, open_thinking=thinking[index]
        )
        return {"prompt_text": text, "open_thinking": thinking[index]}

    dataset = dataset.map(render, with_indices=True)
    dataset = dataset.rename_column("prompt", "prompt_messages")
    return dataset.rename_column("prompt_text", "prompt")


def load_datasets(args: GRPOArguments, training_args: GRPOConfig, tokenizer: PreTrainedTokenizerBase) -> tuple:
    """The prompt datasets; the reward names, the new keys and the reward model directory are checked here too,
    since this is the stage's hook that runs before the model is loaded."""
    check_loss_keys(args, training_args, tokenizer)
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

    train, evaluation = load(args.data_path), load(args.eval_data_path) if args.eval_data_path else None
    ratio = args.thinking_ratio
    if ratio is None and takes_open_thinking(tokenizer):
        ratio = DEFAULT_THINKING_RATIO
    if ratio is not None:
        train = render_prompts(train, tokenizer, ratio, training_args.seed)
        evaluation = None if evaluation is None else render_prompts(evaluation, tokenizer, ratio, training_args.seed)
    return train, evaluation


def resolve_generation_defaults(model, args: GRPOArguments, training_args: GRPOConfig) -> None:
    """`loss_type`, `beta`, `epsilon_high` and `grpo_loss_averaging` where the recipe left them null: the policy's
    generation decides (see the module doc). Logged, so a run says which GRPO it is."""
    generation = model_generation(model)
    if training_args.loss_type is None:
        training_args.loss_type = LOSS_TYPE_BY_GENERATION[generation]
    if training_args.beta is None:
        training_args.beta = BETA_BY_GENERATION[generation]
    if training_args.epsilon_high is None and training_args.loss_type == "cispo":
        training_args.epsilon_high = CISPO_EPSILON_HIGH
    if args.grpo_loss_averaging is None:
        args.grpo_loss_averaging = "sequence" if training_args.loss_type in ("grpo", "cispo") else "trl"
    if args.grpo_loss_averaging == "sequence" and training_args.loss_type not in ("grpo", "cispo"):
        raise RecipeError(
            f"grpo_loss_averaging: sequence applies to loss_type grpo and cispo, not {training_args.loss_type}"
        )
    logger.info(
        "GRPO of a MiniMind%s model: loss_type %s, beta %s, epsilon_high %s, averaged by %s",
        "-3" if generation == 3 else "2",
        training_args.loss_type,
        training_args.beta,
        training_args.epsilon_high,
        args.grpo_loss_averaging,
    )


class MiniMindGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` with the original's per-sequence averaging for `grpo` and `cispo` and MiniMind-3's MoE
    balance loss, in the public `compute_loss` (see the module doc). With `sequence_averaging` off it is TRL's."""

    sequence_averaging: bool = False
    add_moe_aux_loss: bool = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.sequence_averaging:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        mode = "train" if model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        n = completion_ids.size(1)
        # Only completion tokens are scored; TRL's fused LM head (temperature-scaled, as for the old and reference
        # log-probs TRL computed) returns their log-probs without the full logits.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-n] = -100
        unwrapped = self.accelerator.unwrap_model(model)
        with capture_router_logits(unwrapped, self.add_moe_aux_loss and model.training) as router_logits:
            with self.accelerator.autocast():
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        logps = outputs.log_probs[:, -n:]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        ratio = torch.exp(logps - old)
        if self.loss_type == "cispo":
            per_token = -torch.clamp(ratio, max=self.epsilon_high).detach() * advantages * logps
        else:
            clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
            per_token = -torch.min(ratio * advantages, clipped * advantages)
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            per_token = per_token + self.beta * kl
            mean_kl = (kl * mask).sum() / mask.sum().clamp(min=1.0)
            self._metrics[mode]["kl"].append(self.accelerator.gather(mean_kl.detach()).nanmean().item())
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        if router_logits:
            aux_loss = minimind3_aux_loss(router_logits[0], unwrapped.config)
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()).mean().item())
            loss = loss + aux_loss
        # As TRL's own `grpo` loss: the accumulated micro-batches' losses are summed by backward.
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)


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
    """TRL's `GRPOTrainer` with the recipe's rewards (the reward model first, when given, then `reward_funcs`) and
    the model generation's loss (see the module doc)."""
    resolve_generation_defaults(model, args, training_args)
    reward_funcs = []
    if args.reward_model_name_or_path:
        try:
            reward_funcs.append(RewardModelScore(args.reward_model_name_or_path, clip=args.reward_model_clip))
        except (OSError, ValueError) as err:
            raise RecipeError(f"reward_model_name_or_path {args.reward_model_name_or_path}: {err}") from err
    reward_funcs += resolve_reward_funcs(args.reward_funcs, training_args)
    with _ReferenceDirectory(model, args.model_name_or_path, needed=training_args.beta != 0.0):
        trainer = MiniMindGRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
    trainer.sequence_averaging = args.grpo_loss_averaging == "sequence"
    trainer.add_moe_aux_loss = has_minimind3_moe(model)
    return trainer


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
        "temperature": 0.8,
        "max_completion_length": 1536,
        # null: by the policy's generation (`resolve_generation_defaults`).
        "beta": None,
        "loss_type": None,
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
