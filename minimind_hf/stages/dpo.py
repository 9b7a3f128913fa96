"""DPO of MiniMind with TRL's DPOTrainer and the original's loss (MiniMind's `train_dpo.py`, the HF way).

    python recipes/dpo.py --config recipes/dpo.yaml
    torchrun --nproc_per_node 2 recipes/dpo.py --config recipes/dpo.yaml --beta 0.2

Every key belongs to `DPOArguments` (below: the project's keys plus `ref_model_name_or_path`,
`dpo_logprob_reduction`) or to TRL's `DPOConfig`. All input is checked first.

The original's loss is `-logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))`, the supervised tokens following the
SFT rule: every assistant turn's content, its `<|im_end|>` and the `\\n` after it, in earlier turns too. The two
generations of the original differ in how a sequence's log-prob is reduced, in beta and in the MoE loss:

| | MiniMind2 (`train_dpo.py` of the seed) | MiniMind-3 (today's `train_dpo.py`) |
|---|---|---|
| `dpo_logprob_reduction` | `mean` over supervised tokens (`loss_type: sigmoid_norm`) | `sum` (`loss_type: sigmoid`) |
| `beta` | 0.1 | 0.15 |
| MoE balance loss | not added | the policy's `aux_loss` is added (training steps) |

`dpo_logprob_reduction` and `beta` left unset (null) follow the policy model's generation; either can be set for any
model. An explicit `loss_type` must agree with `dpo_logprob_reduction` when both are set; another TRL loss type
(`ipo`, ...) keeps its own meaning and takes no reduction. Two things make `DPOTrainer` compute the loss:

- `loss_type: sigmoid` (sum) or `sigmoid_norm` (mean), TRL's own; `sigmoid_norm` divides each side's summed
  log-ratio by that side's number of completion tokens. Policy and reference share the mask, so
  `(sum pi_c - sum ref_c) / n_c` is `mean pi_c - mean ref_c`, and the loss is the original's term for term. This
  is picked over `ld_alpha` (which weights a tail, it does not average) and over overriding `compute_loss` (TRL's
  is several hundred lines). `loss_type: sigmoid` is TRL's standard summed-log-prob DPO. TRL logs
  `rewards/chosen|rejected|margins|accuracies` and `logps/*` from the summed log-ratios in both cases: a loss
  stuck at log 2 = 0.693 shows there as margins at 0 and accuracies at 0.5 or 0.
- `MiniMindDPOTrainer` adds MiniMind-3's balance loss: TRL's fused LM head computes Mixtral's formula, and only for
  configs with `output_router_logits`, so the policy backbone's router logits are captured by a forward hook
  instead and scored with the model's own `minimind3_aux_loss` (as the original adds `outputs.aux_loss`).
- `PreferenceCollator`, passed as the trainer's `data_collator`: TRL's collator (truncation, padding), with
  `completion_mask` recomputed over the whole sequence by the SFT rule. TRL's own mask covers only what follows the
  prompt shared by chosen and rejected, i.e. the last assistant turn.

Rows are MiniMind's `{"chosen": [messages], "rejected": [messages]}`, validated like SFT data (`file:line` errors,
`skip_invalid`). A pair TRL would drop silently (its shared prompt fills `max_length`), or one whose mean
log-prob would be 0/0 (no supervised token within `max_length`: the original's NaN), is an error or a counted skip.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, Features, IterableDataset, List, Value
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.data_utils import extract_prompt
from trl.trainer.dpo_trainer import DataCollatorForPreference

from ..checks import check_choice, check_number
from ..data import (
    IGNORE_INDEX,
    InvalidRecord,
    Paths,
    conversation_messages,
    encode_conversation,
    load_records,
    register_format,
)
from ..errors import ModelSourceError, RecipeError
from ..loading import source_kind
from ..modeling_minimind3 import minimind3_aux_loss
from ..tokenizer import BOS_TOKEN, EOS_TOKEN
from ..training import MiniMindArguments, Stage, load_recipe_model, run_cli, run_recipe
from .moe import capture_router_logits, has_minimind3_moe, leave_balance_loss_to_the_stage, model_generation

logger = logging.getLogger("minimind_hf")

_MESSAGES = List({"role": Value("string"), "content": Value("string")})
PAIR_FEATURES = Features({"chosen": _MESSAGES, "rejected": _MESSAGES})


def _pair(record: dict) -> dict:
    pair = {}
    for side in ("chosen", "rejected"):
        if side not in record:
            raise InvalidRecord("missing_field", f'no "{side}" field')
        try:
            pair[side] = conversation_messages(record[side])
        except InvalidRecord as invalid:
            raise InvalidRecord(invalid.problem, f"{side}: {invalid.detail}") from None
    if pair["chosen"] == pair["rejected"]:
        raise InvalidRecord("same_pair", "chosen and rejected are the same conversation")
    return pair


register_format("dpo", _pair, PAIR_FEATURES)


def _fits(tokenizer: PreTrainedTokenizerBase, max_length: int) -> Callable[[dict], None]:
    def token_count(messages: list[dict], **kwargs: Any) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        # A token covers at least one byte: a text shorter than max_length in bytes fits without tokenizing it.
        if len(text.encode()) < max_length:
            return 0
        return len(tokenizer.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"])

    def check(pair: dict) -> None:
        prompt = extract_prompt(pair)["prompt"]
        if not prompt:
            raise InvalidRecord("no_shared_prompt", "chosen and rejected differ from their first message on")
        length = token_count(prompt, add_generation_prompt=True)
        if length >= max_length:
            raise InvalidRecord(
                "prompt_too_long", f"the prompt chosen and rejected share is {length} tokens, max_length={max_length}"
            )
        for side in ("chosen", "rejected"):
            # Each assistant turn supervises at least `<|im_end|>` and `\n`: a conversation that fits has them.
            if token_count(pair[side]) < max_length:
                continue
            labels = encode_conversation(pair[side], tokenizer, max_length)["labels"]
            if all(label == IGNORE_INDEX for label in labels):
                raise InvalidRecord("unsupervised", f"{side}: no supervised token within max_length={max_length}")

    return check


def load_dpo_dataset(
    paths: Paths,
    *,
    skip_invalid: bool = False,
    streaming: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
) -> Dataset | IterableDataset:
    """Preference pairs as `chosen` / `rejected` message columns, the format `DPOTrainer` takes. With `tokenizer`
    and `max_length`, pairs that cannot train within `max_length` are errors too (see the module doc)."""
    check = _fits(tokenizer, max_length) if tokenizer is not None and max_length is not None else None
    return load_records(paths, "dpo", skip_invalid=skip_invalid, streaming=streaming, check=check)


def assistant_token_mask(ids: list[int], header: list[int], end_id: int) -> list[int]:
    """1 for each token the SFT rule supervises, from token ids alone: after each `<|im_start|>assistant` header and
    the token holding its newline, everything up to the closing `<|im_end|>` and the token after it.

    This is the rule `MiniMindTokenizer` builds from the chat template's `{% generation %}` spans (tested equal),
    and how the original finds the spans: DPO gets the ids from TRL, already tokenized, without the masks.
    """
    mask = [0] * len(ids)
    n, i = len(header), 0
    while i < len(ids):
        if ids[i : i + n] != header:
            i += 1
            continue
        j = i + n + 1
        while j < len(ids):
            mask[j] = 1
            j += 1
            if ids[j - 1] == end_id:
                if j < len(ids):
                    mask[j] = 1
                    j += 1
                break
        i = j
    return mask


@dataclass
class PreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator whose `completion_mask` is the SFT rule over the whole sequence (see module doc)."""

    header: list[int] = field(default_factory=list)
    end_id: int = -1

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> PreferenceCollator:
        return cls(
            pad_token_id=tokenizer.pad_token_id,
            header=tokenizer.encode(BOS_TOKEN + "assistant", add_special_tokens=False),
            end_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
            **kwargs,
        )

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        masks = [assistant_token_mask(row, self.header, self.end_id) for row in batch["input_ids"].tolist()]
        batch["completion_mask"] = torch.tensor(masks, dtype=torch.long) * batch["attention_mask"]
        return batch


# What each generation of the original does where the two differ (see the module doc).
REDUCTION_BY_GENERATION = {2: "mean", 3: "sum"}
BETA_BY_GENERATION = {2: 0.1, 3: 0.15}
LOSS_TYPE_BY_REDUCTION = {"mean": "sigmoid_norm", "sum": "sigmoid"}


@dataclass
class DPOArguments(MiniMindArguments):
    """The project's keys plus the reference model and the log-prob reduction."""

    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "the frozen reference, any model source (the policy's sizes); default: the policy's start"},
    )
    dpo_logprob_reduction: str | None = field(
        default=None,
        metadata={
            "help": "a sequence's log-prob: mean over its supervised tokens (MiniMind2) or sum (MiniMind-3); "
            "null: the policy model's generation"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.dpo_logprob_reduction, str) and self.dpo_logprob_reduction.lower() in ("null", "none"):
            self.dpo_logprob_reduction = None
        if self.dpo_logprob_reduction not in (None, *LOSS_TYPE_BY_REDUCTION):
            raise RecipeError(
                f"dpo_logprob_reduction must be mean, sum or null (by model generation), "
                f"not {self.dpo_logprob_reduction!r}"
            )
        if self.ref_model_name_or_path is not None:
            try:
                source_kind(self.ref_model_name_or_path)
            except ModelSourceError as err:
                raise RecipeError(f"ref_model_name_or_path {err}") from err


# What TRL 1.16's DPOTrainer accepts (`_compute_loss`, `__init__`), checked before any work: the trainer itself
# rejects an unknown value only when it computes the first loss, after the data and both models are loaded.
DPO_LOSS_TYPES = (
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses TRL generalizes to another f-divergence (`f_divergence_loss_types` in DPOTrainer.__init__).
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def check_dpo(args: DPOArguments, training_args: DPOConfig) -> None:
    """The DPO keys whose value would invert, zero or break the objective, or that TRL rejects only late."""
    # beta scales the log-ratio margin: 0 makes the loss a constant log 2, a negative beta prefers `rejected`.
    check_number("beta", training_args.beta, low=0, low_open=True, why="0 learns nothing, < 0 prefers rejected")
    losses = training_args.loss_type
    if losses is not None and not losses:
        raise RecipeError("loss_type: is empty; name at least one loss (the original's: sigmoid_norm)")
    losses = losses or []  # null: dpo_logprob_reduction and the policy's generation decide (see the module doc)
    for loss in losses:
        check_choice("loss_type", loss, DPO_LOSS_TYPES)
    if training_args.loss_weights is not None:
        for weight in training_args.loss_weights:
            check_number("loss_weights", weight, low=0, why="a negative weight trains that loss backwards")
        if not any(training_args.loss_weights):
            raise RecipeError(f"loss_weights: are all 0 ({training_args.loss_weights}): nothing would be learned")
    # Label smoothing is the assumed rate of flipped pairs: at 0.5 chosen and rejected are equally likely.
    check_number("label_smoothing", training_args.label_smoothing, low=0, high=0.5, high_open=True)
    if "exo_pair" in losses and training_args.label_smoothing == 0:
        raise RecipeError("label_smoothing: exo_pair needs it above 0 (the EXO paper uses 1e-3)")
    check_choice("f_divergence_type", training_args.f_divergence_type, F_DIVERGENCES)
    if training_args.f_divergence_type != "reverse_kl" and losses and not set(losses) <= set(F_DIVERGENCE_LOSSES):
        raise RecipeError(
            f"f_divergence_type: {training_args.f_divergence_type} works only with loss_type "
            f"{', '.join(F_DIVERGENCE_LOSSES)}; got {', '.join(losses)}"
        )
    check_number("f_alpha_divergence_coef", training_args.f_alpha_divergence_coef, low=0, low_open=True)
    check_number("ld_alpha", training_args.ld_alpha, low=0, high=1)
    check_number("discopop_tau", training_args.discopop_tau, low=0, low_open=True)
    check_choice("truncation_mode", training_args.truncation_mode, ("keep_start", "keep_end"))
    if training_args.use_weighting and {"aot", "aot_unpaired"} & set(losses):
        raise RecipeError("use_weighting: TRL does not implement it for aot or aot_unpaired")
    if training_args.precompute_ref_batch_size is not None and training_args.precompute_ref_batch_size < 1:
        raise RecipeError(
            f"precompute_ref_batch_size: must be at least 1, got {training_args.precompute_ref_batch_size}"
        )
    if training_args.sync_ref_model:
        check_number("ref_model_mixup_alpha", training_args.ref_model_mixup_alpha, low=0, high=1)
        if training_args.ref_model_sync_steps < 1:
            raise RecipeError(f"ref_model_sync_steps: must be at least 1, got {training_args.ref_model_sync_steps}")


def load_reference(args: DPOArguments, model: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference model: `ref_model_name_or_path` in any form, else a copy of the policy as it starts
    (the original loads the same SFT weights twice)."""
    if args.ref_model_name_or_path is None:
        reference = copy.deepcopy(model)
    else:
        reference = load_recipe_model(args, args.ref_model_name_or_path, key="ref_model_name_or_path")
        if reference.config.vocab_size != model.config.vocab_size:
            raise RecipeError(
                f"ref_model_name_or_path {args.ref_model_name_or_path} has vocab_size={reference.config.vocab_size}, "
                f"the policy {model.config.vocab_size}: they must share the tokenizer"
            )
    return reference.eval().requires_grad_(False)


def check_loss_keys(args: DPOArguments, training_args: DPOConfig) -> None:
    """An explicit `loss_type` that contradicts `dpo_logprob_reduction`, or a beta <= 0, is an error before any work."""
    if training_args.beta is not None and training_args.beta <= 0:
        raise RecipeError(f"beta must be > 0, not {training_args.beta}")
    if args.dpo_logprob_reduction is None or training_args.loss_type is None:
        return
    wanted = LOSS_TYPE_BY_REDUCTION[args.dpo_logprob_reduction]
    if list(training_args.loss_type) != [wanted]:
        raise RecipeError(
            f"dpo_logprob_reduction: {args.dpo_logprob_reduction} is loss_type {wanted}, but loss_type is "
            f"{','.join(training_args.loss_type)}: set one of them (another loss type takes no reduction)"
        )


def resolve_generation_defaults(model: torch.nn.Module, args: DPOArguments, training_args: DPOConfig) -> None:
    """`loss_type` (from `dpo_logprob_reduction`) and `beta` where the recipe left them null: the model's
    generation decides (see the module doc). Logged, so a run says which DPO it is."""
    generation = model_generation(model)
    if training_args.loss_type is None:
        reduction = args.dpo_logprob_reduction or REDUCTION_BY_GENERATION[generation]
        training_args.loss_type = [LOSS_TYPE_BY_REDUCTION[reduction]]
    if training_args.beta is None:
        training_args.beta = BETA_BY_GENERATION[generation]
    logger.info(
        "DPO of a MiniMind%s model: loss_type %s, beta %s%s",
        "-3" if generation == 3 else "2",
        ",".join(training_args.loss_type),
        training_args.beta,
        ", plus the MoE balance loss" if generation == 3 and getattr(model.config, "use_moe", False) else "",
    )


class MiniMindDPOTrainer(DPOTrainer):
    """`DPOTrainer` that adds a MiniMind-3 MoE policy's balance loss on training steps (see the module doc).

    The hook asks the backbone for its router logits and keeps them; only the policy's backbone carries it, so the
    reference model's forward is untouched.
    """

    add_moe_aux_loss: bool = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        with capture_router_logits(unwrapped, self.add_moe_aux_loss and model.training) as router_logits:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not router_logits:
            return result
        if len(router_logits) != 1:
            raise RuntimeError(f"expected one policy forward per DPO step, saw {len(router_logits)}")
        aux_loss = minimind3_aux_loss(router_logits[0], unwrapped.config)
        self._metrics["train"]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        if return_outputs:
            loss, outputs = result
            return loss + aux_loss, outputs
        return result + aux_loss


def build_dpo_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    training_args: DPOConfig,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    callbacks: tuple[TrainerCallback, ...] | list[TrainerCallback] = (),
    args: DPOArguments | None = None,
) -> DPOTrainer:
    """TRL's `DPOTrainer` with the reference model, the SFT-rule mask and the model generation's loss (see the
    module doc)."""
    resolve_generation_defaults(model, args, training_args)
    leave_balance_loss_to_the_stage(training_args)
    collator = PreferenceCollator.for_tokenizer(
        tokenizer,
        max_length=training_args.max_length,
        truncation_mode=training_args.truncation_mode,
        pad_to_multiple_of=training_args.pad_to_multiple_of,
    )
    trainer = MiniMindDPOTrainer(
        model=model,
        ref_model=load_reference(args, model),
        args=training_args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.add_moe_aux_loss = has_minimind3_moe(model)
    return trainer


def load_datasets(
    args: DPOArguments, training_args: DPOConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, Dataset | None]:
    """Preference pairs as TRL's conversational `chosen` / `rejected`; TRL finds the shared prompt and tokenizes.
    The loss keys are checked here, the stage's hook that runs before any work."""
    check_loss_keys(args, training_args)

    def load(paths):
        return load_dpo_dataset(
            paths, skip_invalid=args.skip_invalid, tokenizer=tokenizer, max_length=training_args.max_length
        )

    return load(args.data_path), load(args.eval_data_path) if args.eval_data_path else None


DPO = Stage(
    name="dpo",
    load_datasets=load_datasets,
    config_class=DPOConfig,
    arguments_class=DPOArguments,
    build_trainer=build_dpo_trainer,
    check=check_dpo,
    defaults={
        "data_path": ["data/dpo.jsonl"],
        # null: by the policy's generation (`resolve_generation_defaults`).
        "loss_type": None,
        "beta": None,
        "learning_rate": 4e-8,
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "max_length": 1024,
        "pth_weight_name": "dpo",
        "swanlab_project": "MiniMind-DPO",
    },
)


def main(argv: list[str] | None = None, **hooks):
    """`hooks`: `callbacks` and `before_train`, as `run_recipe` takes them."""
    return run_recipe(DPO, argv, **hooks)


if __name__ == "__main__":
    run_cli(main)
