"""Checks of a recipe's values, run by `run_recipe` before anything is read or written: what an unlucky user can
do wrong, refused early with one clear line (a `RecipeError` naming the key).

- `check_command_line`, `check_recipe` right after parsing: value types and ranges of every key, the optimizer and
  learning-rate schedule built once on a dummy parameter, the attention implementation on a tiny model, so that an
  impossible recipe fails in milliseconds instead of mid-training;
- `check_tokenizer_change`: a model keeps the tokenizer it was trained with; another vocabulary is refused;
- `check_model_fits`: the embedding covers every id the tokenizer can emit, and `max_length` fits the model.

The output directory's checks are in `run_dir.py`, the resume point's in `checkpointing.py`.
"""

from __future__ import annotations

import json
import logging
import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.integrations import get_reporting_integration_callbacks
from transformers.optimization import get_scheduler

from .callbacks import NONFINITE_POLICIES
from .chat_templates import TEMPLATE_CHOICES
from .configuration_minimind import MiniMindConfig, config_overrides_problem
from .errors import ModelSourceError, RecipeError
from .loading import tokenizer_source
from .modeling_minimind import MiniMindForCausalLM
from .tokenizer import load_tokenizer

logger = logging.getLogger("minimind_hf")

# Values a key takes beyond its declared type: the recipes document `resume_from_checkpoint: true`.
ALSO_ACCEPTED: dict[str, Any] = {
    "resume_from_checkpoint": bool,
    # DPO and GRPO: null means "what the model's generation trains with", resolved once the model is loaded.
    "loss_type": type(None),
    "beta": type(None),
}


def _fail(key: str, message: str) -> typing.NoReturn:
    raise RecipeError(f"{key}: {message}")


def check_choice(key: str, value: Any, allowed: typing.Iterable[str]) -> None:
    """`value` is one of `allowed` (the values the library accepts; checked here before any work)."""
    allowed = list(allowed)
    if value not in allowed:
        _fail(key, f"must be one of {', '.join(allowed)}, got {value!r}")


def check_number(
    key: str,
    value: float | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> None:
    """`value` (None is not judged) is finite and within [low, high], each bound open when `*_open`."""
    if value is None:
        return
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        _fail(key, f"must be in {bounds}, got {value}{f' ({why})' if why else ''}")


def _accepts(value: Any, hint: Any) -> bool | None:
    """Whether `value` fits a simple type hint (bool, int, float, str, None, list[str] and unions of them); None
    for hints this check does not judge (enums, dicts, ...), which their own classes validate."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(value, arg) for arg in typing.get_args(hint)]
        if None in verdicts:
            return None
        return any(verdicts)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if item is not str:
            return None
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return None


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return "a list of strings"
    return names.get(hint, str(hint))


def check_value_types(*configs: Any) -> None:
    """Every key of simple type holds a value of that type.

    argparse converts the strings of the command line and of the YAML, but a YAML value that is already a list,
    a number or a boolean reaches the dataclass unchecked: `learning_rate: true` would train at 1.0.
    """
    for config in configs:
        try:
            hints = typing.get_type_hints(type(config))
        except (NameError, TypeError):  # an annotation this Python cannot resolve: leave the types to the class
            hints = {}
        for item in fields(config):
            value = getattr(config, item.name)
            hint = hints.get(item.name)
            if item.name in ALSO_ACCEPTED:
                hint = hint | ALSO_ACCEPTED[item.name]
            if hint is not None and _accepts(value, hint) is False:
                shown = json.dumps(value) if isinstance(value, (list, bool, type(None))) else repr(value)
                _fail(item.name, f"expected {_type_name(hint)}, got {shown}")


def _check_ranges(args: Any, training_args: TrainingArguments, resuming: bool) -> None:
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, key) < 1:
            _fail(key, f"must be at least 1, got {getattr(training_args, key)}")
    for key in ("learning_rate", "weight_decay", "max_grad_norm", "dataloader_num_workers", "num_train_epochs"):
        if getattr(training_args, key) < 0:
            _fail(key, f"must be >= 0, got {getattr(training_args, key)}")
    for key, strategy in (("save_steps", "save_strategy"), ("logging_steps", "logging_strategy")):
        if getattr(training_args, strategy) == "steps" and not getattr(training_args, key) > 0:
            _fail(
                key,
                f"must be positive with {strategy}: steps, got {getattr(training_args, key)} "
                f"(set {strategy}: no for none)",
            )
    if (
        training_args.eval_strategy == "steps"
        and training_args.eval_steps is not None
        and training_args.eval_steps <= 0
    ):
        _fail("eval_steps", f"must be positive, got {training_args.eval_steps}")
    if training_args.save_total_limit is not None and training_args.save_total_limit < 1:
        _fail(
            "save_total_limit",
            f"must be at least 1 (null keeps every checkpoint), got {training_args.save_total_limit}",
        )
    if not 0 <= training_args.seed < 2**32:
        _fail("seed", f"must be in 0..2**32-1, got {training_args.seed}")
    max_length = getattr(training_args, "max_length", None)
    if max_length is not None and max_length < 1:
        _fail("max_length", f"must be a positive number of tokens, got {max_length}")
    if max_length is None and getattr(training_args, "packing", False):
        _fail("max_length", "is null, but packing needs the length of the rows it packs into")
    if not str(training_args.output_dir).strip():
        _fail("output_dir", "is empty; name the directory the run writes to")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        _fail("max_steps", f"must be positive, or -1 to train num_train_epochs epochs; got {training_args.max_steps}")
    if training_args.max_steps == -1 and training_args.num_train_epochs == 0 and not resuming:
        _fail("num_train_epochs", "is 0 and max_steps is not set: the run would save an untrained model")
    if not args.data_path:
        _fail("data_path", "is empty; name at least one JSON Lines file")
    if training_args.learning_rate == 0:
        # Legal (a parity check trains at 0 on purpose), but the run then learns nothing: say so.
        logger.warning("learning_rate is 0: the weights will not change")
    check_number("learning_rate", training_args.learning_rate, low=0)
    check_number("max_grad_norm", training_args.max_grad_norm, low=0)
    check_number("neftune_noise_alpha", training_args.neftune_noise_alpha, low=0)
    # Reasoning SFT's tag weight: a negative one would train the tags away, 0 would leave them unlearned.
    check_number("tag_loss_weight", args.tag_loss_weight, low=0, why="a negative weight unlearns the tags")
    if args.tag_loss_weight == 0:
        logger.warning("tag_loss_weight is 0: the reasoning tags get no loss and will not be learned")
    if args.tag_loss_weight != 1.0:
        if not args.tag_tokens or any(not isinstance(tag, str) or not tag.strip() for tag in args.tag_tokens):
            _fail("tag_tokens", f"must be non-empty strings when tag_loss_weight is set, got {args.tag_tokens!r}")
    if args.on_nonfinite not in NONFINITE_POLICIES:
        _fail("on_nonfinite", f"must be one of {', '.join(NONFINITE_POLICIES)}, got {args.on_nonfinite!r}")


def _check_optimizer(training_args: TrainingArguments) -> None:
    """Build the optimizer and learning-rate schedule once, on a dummy parameter, as the Trainer will.

    Their own constructors validate the learning rate, betas, weight decay and every `lr_scheduler_kwargs` key;
    otherwise those errors come only when training starts, after the data and model are loaded.
    """
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
    if not optimizer_cls.__module__.startswith("torch.optim"):
        return  # Optimizers of other libraries may need the real model; they are built by the Trainer only.
    try:
        optimizer = optimizer_cls([torch.nn.Parameter(torch.zeros(1))], **optimizer_kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        _fail("optim", f"{training_args.optim} cannot be built with these settings: {err}")
    steps = training_args.max_steps if training_args.max_steps > 0 else 100
    kwargs = training_args.lr_scheduler_kwargs
    if not isinstance(kwargs, dict):
        _fail("lr_scheduler_kwargs", f"must be a mapping such as {{min_lr_rate: 0.1}}, got {kwargs!r}")
    try:
        get_scheduler(
            training_args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=training_args.get_warmup_steps(steps),
            num_training_steps=steps,
            scheduler_specific_kwargs=kwargs,
        )
    except (ValueError, TypeError) as err:
        name = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
        _fail("lr_scheduler_kwargs", f"{name} cannot be built with {kwargs}: {err}")


def _check_report_to(training_args: TrainingArguments) -> None:
    try:  # only looks the names up; the Trainer would do it after the data and the model are loaded
        get_reporting_integration_callbacks(training_args.report_to)
    except ValueError as err:
        _fail("report_to", str(err))


def check_attn_implementation(name: str) -> None:
    """The attention implementation can run here: checked by transformers itself on a tiny model."""
    config = MiniMindConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config._attn_implementation = name
    try:
        MiniMindForCausalLM(config)
    except (ImportError, ValueError, RuntimeError) as err:
        _fail("attn_implementation", f"{name!r} cannot be used here ({str(err).splitlines()[0]}); sdpa always works")


def check_recipe(args: Any, training_args: TrainingArguments) -> None:
    """Everything about the recipe's values that can be known before any file is read (see the module doc).

    `num_train_epochs: 0` is accepted when resuming: it publishes the checkpoint as the final model.
    """
    check_value_types(args, training_args)
    resuming = str(training_args.resume_from_checkpoint or "").lower() not in ("", "false")
    _check_ranges(args, training_args, resuming)
    _check_optimizer(training_args)
    _check_report_to(training_args)
    if getattr(args, "chat_template", None) not in (None, *TEMPLATE_CHOICES):
        _fail("chat_template", f"must be null or one of {', '.join(TEMPLATE_CHOICES)}, got {args.chat_template!r}")
    for key in ("add_system_ratio", "empty_think_ratio"):
        value = getattr(args, key, None)
        if value is not None and not 0.0 <= value <= 1.0:
            _fail(key, f"must be a share in [0, 1], got {value!r}")
    version = getattr(args, "minimind_version", None)
    if version not in (None, 2, 3):
        _fail("minimind_version", f"must be 2 (MiniMind2) or 3 (MiniMind-3), got {version!r}")
    # A fresh model's generation is known now; a saved model's only once loaded (either generation's fields then).
    fresh = getattr(args, "model_name_or_path", None) is None
    if problem := config_overrides_problem(args.config_overrides, version or (2 if fresh else None)):
        _fail("config_overrides", problem)
    check_attn_implementation(args.attn_implementation)


def check_command_line(argv: list[str]) -> None:
    """`--config` must name a file; argparse would otherwise read the next flag, or nothing, as its value."""
    for i, item in enumerate(argv):
        if item == "--config" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            raise RecipeError("--config needs a recipe file: --config FILE.yaml")


def check_tokenizer_change(args: Any, tokenizer: PreTrainedTokenizerBase, resume_from: str | None) -> None:
    """The recipe's tokenizer has the vocabulary of the one saved with the model (and with the checkpoint resumed
    from): with another one, the trained embeddings would stand for other tokens. `allow_tokenizer_change`
    accepts it, for a deliberate vocabulary change."""
    if args.allow_tokenizer_change:
        return
    for key, source in (("resume_from_checkpoint", resume_from), ("model_name_or_path", args.model_name_or_path)):
        try:
            own = tokenizer_source(source)
        except ModelSourceError as err:
            raise RecipeError(f"{key} {err}") from err
        if own is None or Path(own).resolve() == Path(tokenizer.name_or_path).resolve():
            continue
        try:
            theirs = load_tokenizer(own, chat_template="keep").get_vocab()
        except (OSError, ValueError) as err:
            raise RecipeError(f"{key} {source}: its tokenizer cannot be loaded ({err})") from err
        ours = tokenizer.get_vocab()
        if theirs != ours:
            differ = sum(theirs.get(token) != index for token, index in ours.items())
            raise RecipeError(
                f"tokenizer {tokenizer.name_or_path} is not the tokenizer {source} was trained with "
                f"({len(ours)} vs {len(theirs)} tokens, {differ} with another id): its embeddings would stand for "
                "other tokens. Leave tokenizer_name_or_path unset to use the model's own, or set "
                "allow_tokenizer_change: true if the change is intended"
            )


def tokenizer_id_count(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many embedding rows the tokenizer needs: one past the largest id it can emit, added tokens included."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def check_model_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> None:
    """The model's embedding covers every id the tokenizer can emit (else the first rare token raises an
    IndexError hours in), and `max_length` does not exceed the positions the model declares."""
    rows = min(model.get_input_embeddings().num_embeddings, model.get_output_embeddings().out_features)
    needed = tokenizer_id_count(tokenizer)
    if rows < needed:
        raise RecipeError(
            f"the model has {rows} embedding rows (vocab_size={model.config.vocab_size}) but tokenizer "
            f"{tokenizer.name_or_path} emits ids up to {needed - 1} ({len(tokenizer)} tokens); a new model needs "
            f"config_overrides: vocab_size={needed}, a trained one the tokenizer it was trained with"
        )
    positions = model.config.max_position_embeddings
    if max_length is not None and max_length > positions:
        raise RecipeError(
            f"max_length {max_length} is above the model's max_position_embeddings {positions}: lower max_length, "
            f"or give a new model config_overrides: max_position_embeddings={max_length}"
        )
