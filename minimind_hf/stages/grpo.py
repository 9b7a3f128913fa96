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
`sequence` (the default for cispo and for MiniMind-3; MiniMind2's grpo keeps TRL's loss, as the seed trained it)
makes `MiniMindGRPOTrainer.compute_loss` compute the loss itself for `grpo` and `cispo`:

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
import math
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

from ..checkpointing import checkpoint_step, resolve_resume
from ..checks import check_choice, check_number
from ..data import InvalidRecord, conversation_messages, load_records, register_format
from ..errors import RecipeError
from ..loading import source_kind
from ..modeling_minimind3 import minimind3_aux_loss
from ..rewards import RewardModelScore, resolve_reward_funcs
from ..training import MiniMindArguments, Stage, run_cli, run_recipe
from .moe import capture_router_logits, has_minimind3_moe, leave_balance_loss_to_the_stage, model_generation

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
            "for loss_type); null: sequence for cispo and for MiniMind-3, trl (per sequence already) for MiniMind2 grpo"
        },
    )
    reward_model_clip: float | None = field(
        default=3.0, metadata={"help": "the reward model's score is clipped to +-this (MiniMind-3: 3); null: not"}
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
        if self.thinking_ratio is not None and not 0.0 <= self.thinking_ratio <= 1.0:
            raise RecipeError(f"thinking_ratio must be between 0 and 1 (or null), not {self.thinking_ratio}")
        if self.grpo_loss_averaging not in (None, "sequence", "trl"):
            raise RecipeError(f"grpo_loss_averaging must be sequence, trl or null, not {self.grpo_loss_averaging!r}")
        if self.reward_model_clip is not None and self.reward_model_clip <= 0:
            raise RecipeError(f"reward_model_clip must be > 0 (or null), not {self.reward_model_clip}")


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
    if training_args.loss_type is not None:  # null: the policy's generation decides (see the module doc)
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
    _check_rows_can_be_scored(args, train)
    ratio = args.thinking_ratio
    if ratio is None and takes_open_thinking(tokenizer):
        ratio = DEFAULT_THINKING_RATIO
    if ratio is not None:
        train = render_prompts(train, tokenizer, ratio, training_args.seed)
        evaluation = None if evaluation is None else render_prompts(evaluation, tokenizer, ratio, training_args.seed)
    return train, evaluation


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


def resolve_generation_defaults(model, args: GRPOArguments, training_args: GRPOConfig) -> None:
    """`loss_type`, `beta`, `epsilon_high` and `grpo_loss_averaging` where the recipe left them null: the policy's
    generation decides (see the module doc). Logged, so a run says which GRPO it is."""
    generation = model_generation(model)
    leave_balance_loss_to_the_stage(training_args)
    if training_args.loss_type is None:
        training_args.loss_type = LOSS_TYPE_BY_GENERATION[generation]
    if training_args.beta is None:
        training_args.beta = BETA_BY_GENERATION[generation]
    if training_args.epsilon_high is None and training_args.loss_type == "cispo":
        training_args.epsilon_high = CISPO_EPSILON_HIGH
    if args.grpo_loss_averaging is None:
        # TRL's `grpo` already averages per sequence: MiniMind2 keeps TRL's loss exactly as the seed trained it.
        # MiniMind-3 needs the override for its MoE aux loss, and TRL's `cispo` averages over the whole batch.
        per_sequence = training_args.loss_type == "cispo" or (generation == 3 and training_args.loss_type == "grpo")
        args.grpo_loss_averaging = "sequence" if per_sequence else "trl"
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
    check=check_grpo,
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
