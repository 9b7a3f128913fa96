"""The recipe core: one lifecycle for every training stage (pretrain, SFT, LoRA, DPO, GRPO, reasoning SFT).

    parse the recipe -> check everything -> seed -> load the model -> build the stage's trainer -> train
    -> save the final model -> end

`run_recipe(stage, argv)` owns that lifecycle. A `Stage` supplies only what differs: its config dataclass (TRL's
`SFTConfig`, `DPOConfig`, ...) plus the project's keys, how data files become datasets, and how its trainer is
built. Each stage lives in `minimind_hf/stages/<name>.py`; a recipe script (`recipes/sft.py`) only launches it.
What every trainer gets (sealed checkpoints, the divergence guard, the swanlab run id) is a `TrainerCallback`
(`callbacks.py`), so it works unchanged on any TRL trainer. The checks run before training are in `checks.py`
(recipe values), `run_dir.py` (output directory and lock) and `checkpointing.py` (resume point).
"""

import difflib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainerState, TrainingArguments, set_seed
from trl import SFTConfig, TrlParser

from . import checks, guards, run_dir
from .callbacks import (
    NonFiniteGuard,
    NoSignalGuard,
    SealCheckpointCallback,
    raise_if_diverged,
    start_swanlab,
    write_swanlab_run_id,
)
from .checkpointing import (
    begin_final,
    check_checkpoint_fits,
    check_resume_point,
    commit_final,
    interrupted_save,
    resolve_resume,
    save_failed,
    training_finished,
)
from .errors import MiniMindError, ModelSourceError, RecipeError
from .formats.pth import pth_name, save_pth
from .loading import load_model, source_kind, tokenizer_source
from .modeling_minimind import MiniMindForCausalLM
from .tokenizer import generation_config, load_tokenizer

logger = logging.getLogger("minimind_hf")

# Where the project's defaults differ from SFTConfig's: MiniMind's schedule (cosine to 10% of the peak, no
# warm-up), no gradient checkpointing (it only slows a model this small), bf16 autocast on CPU as well.
PROJECT_DEFAULTS: dict[str, Any] = {
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "warmup_steps": 0,
    "activation_checkpointing": False,
    "bf16": True,
    "use_cpu": not torch.cuda.is_available(),
    "max_grad_norm": 1.0,
    "weight_decay": 0.01,  # torch.optim.AdamW's default, which the original trains with
    "max_length": 512,
    "packing": True,
    "report_to": "none",
    "save_strategy": "steps",
    "save_only_model": False,
    "seed": 42,
    "dataset_num_proc": None,
    # Every parameter gets a gradient on every step (MoE experts run on empty batches too), so DDP need not
    # search for unused ones.
    "ddp_find_unused_parameters": False,
}


@dataclass
class MiniMindArguments:
    """The project's own recipe keys: where the data, tokenizer and model come from, and the model's sizes."""

    data_path: list[str] = field(
        default_factory=lambda: ["data/sft.jsonl"], metadata={"help": "one JSON Lines file or a list of them"}
    )
    eval_data_path: list[str] | None = field(default=None, metadata={"help": "held-out JSON Lines file(s)"})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "tokenizer directory; default: the model directory's, else data/tokenizer"}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "an HF directory, an original MiniMind .pth file, or null for a fresh model"},
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "the template to train with: null decides from the tokenizer (MiniMind2's or MiniMind-3's "
            "original gets its marked twin; an unknown one is refused), or minimind2, minimind3, keep"
        },
    )
    add_system_ratio: float = field(
        default=0.0,
        metadata={"help": "MiniMind-3 SFT: share of rows without system prompt or tools given one (original 0.2)"},
    )
    empty_think_ratio: float = field(
        default=1.0,
        metadata={"help": "MiniMind-3 SFT: share of rows that keep their empty think blocks (original 0.2)"},
    )
    minimind_version: int | None = field(
        default=None,
        metadata={
            "help": "the generation of a fresh model: 2 (MiniMind2, the default) or 3 (MiniMind-3); a saved model "
            "is the generation it is, and a different value here is an error"
        },
    )
    hidden_size: int | None = field(default=None, metadata={"help": "512 (26M), 768 (104M), 640 (MoE)"})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "8 by default"})
    use_moe: bool | None = field(default=None, metadata={"help": "DeepSeek-style MoE feed-forward"})
    config_overrides: str = field(default="", metadata={"help": 'other config fields, "num_attention_heads=4,..."'})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    skip_invalid: bool = field(default=False, metadata={"help": "skip (and count) invalid data lines"})
    error_on_unsupervised: bool = field(
        default=False,
        metadata={
            "help": "a conversation with no supervised token within max_length is an error (default: dropped, "
            "counted and named in the log, as the original trains on it with zero loss)"
        },
    )
    save_pth: bool = field(default=False, metadata={"help": "also write the original .pth next to the HF model"})
    pth_weight_name: str = field(default="full_sft", metadata={"help": "MiniMind's --save_weight: the .pth prefix"})
    swanlab_project: str = field(default="MiniMind-Full-SFT", metadata={"help": "swanlab project name"})
    tag_loss_weight: float = field(
        default=1.0,
        metadata={"help": "reasoning SFT (train_distill_reason.py: 10): the loss weight of supervised tag tokens"},
    )
    tag_tokens: list[str] = field(
        default_factory=lambda: ["<think>", "</think>", "<answer>", "</answer>"],
        metadata={"help": "the tags tag_loss_weight applies to (every token of each, where a tag is several)"},
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "a step with a non-finite gradient norm: stop (an error naming the step; nothing non-finite is "
            "saved) or skip (its update is not applied; counted in the log)"
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace the run (checkpoints, final model) already in output_dir"}
    )
    allow_tokenizer_change: bool = field(
        default=False, metadata={"help": "accept a tokenizer other than the one the model was trained with"}
    )

    def __post_init__(self):
        # YAML may give a single path where a list is expected.
        if isinstance(self.data_path, str):
            self.data_path = [self.data_path]
        if isinstance(self.eval_data_path, str):
            self.eval_data_path = [self.eval_data_path]
        # On the command line `--model_name_or_path null` arrives as a string; in YAML `null` is None already.
        for key in ("model_name_or_path", "tokenizer_name_or_path"):
            if isinstance(getattr(self, key), str) and getattr(self, key).lower() in ("null", "none", ""):
                setattr(self, key, None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps the last
    value, so `learning_rate` written twice would train with the one further down, whatever the reader saw first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise RecipeError(
                    f"{key_node.start_mark.name}:{line}: key '{key}' is given twice (lines {seen[key]} and {line}); "
                    "keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _known_keys(dataclass_types: tuple[type, ...]) -> set[str]:
    return {f.name for dc in dataclass_types for f in fields(dc)}


def _check_keys(keys: list[str], known: set[str], where: str) -> None:
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{where}: unknown key '{key}'{hint}")


def parse_recipe(
    dataclass_types: tuple[type, ...] = (MiniMindArguments, SFTConfig),
    argv: list[str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> tuple:
    """`--config FILE.yaml` plus `--key value` overrides into the dataclasses, with the project's defaults.

    Unknown keys, in the YAML or on the command line, are an error that suggests the closest known key; values of
    the wrong type (`learning_rate: fast`) are rejected by argparse with the key's name.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        # Every key with its type, default and help, from the dataclasses (TRL's and the project's).
        parser = TrlParser(dataclass_types)
        parser.usage = f"{Path(sys.argv[0]).name} --config RECIPE.yaml [--key value ...]"
        known = _known_keys(dataclass_types)
        parser.set_defaults(**{k: v for k, v in {**PROJECT_DEFAULTS, **(defaults or {})}.items() if k in known})
        parser.print_help()
        sys.exit(0)
    checks.check_command_line(argv)
    known = _known_keys(dataclass_types)
    if "--config" in argv:
        config_path = Path(argv[argv.index("--config") + 1])
        if not config_path.is_file():
            raise RecipeError(f"recipe file {config_path} does not exist")
        try:
            with config_path.open(encoding="utf-8") as stream:  # the stream's name goes into the error's position
                recipe = yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{config_path}:{mark.line + 1}" if mark else str(config_path)
            raise RecipeError(f"{where}: not valid YAML: {getattr(err, 'problem', None) or err}") from err
        if not isinstance(recipe, dict):
            raise RecipeError(f"{config_path}: a recipe must be a YAML mapping of key: value")
        _check_keys([k for k in recipe if k != "env"], known, str(config_path))
    flags = [a[2:].split("=")[0] for a in argv if a.startswith("--") and a != "--config"]
    _check_keys(flags, known, "command line")

    parser = TrlParser(dataclass_types)
    parser.set_defaults(**{k: v for k, v in {**PROJECT_DEFAULTS, **(defaults or {})}.items() if k in known})
    try:
        return parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)
    except (ValueError, TypeError) as err:  # the config classes' own checks (`report_to: wandbx`, ...)
        raise RecipeError(f"invalid recipe: {err}") from err
    except ZeroDivisionError as err:  # GRPOConfig divides by num_generations / steps_per_generation unchecked
        raise RecipeError(
            f"invalid recipe: a count the config divides by is 0 ({err}); counts must be at least 1"
        ) from err


def load_recipe_model(
    args: MiniMindArguments, source: str | None = None, key: str = "model_name_or_path"
) -> MiniMindForCausalLM:
    """The model the recipe starts from (`source`, default `args.model_name_or_path`), in any form
    `minimind_hf.loading` knows (or a fresh one of the recipe's sizes); errors name the recipe `key`."""
    try:
        return load_model(
            args.model_name_or_path if source is None else source,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            use_moe=args.use_moe,
            config_overrides=args.config_overrides,
            attn_implementation=args.attn_implementation,
            minimind_version=args.minimind_version,
        )
    except ModelSourceError as err:
        raise RecipeError(f"{key} {err}") from err
    except (ValueError, StrictDataclassError) as err:  # a config field of the wrong type (`dropout=2`)
        raise RecipeError(" ".join(str(err).split())) from err


@dataclass(frozen=True)
class Stage:
    """What one training stage adds to the shared lifecycle of `run_recipe` (one per `minimind_hf/stages/*.py`).

    `config_class` is the TRL config (`SFTConfig`, `DPOConfig`, ...), `arguments_class` the project's keys
    (`MiniMindArguments` or a subclass with the stage's own), `defaults` what the stage changes in both.
    `load_datasets(args, training_args, tokenizer)` returns (train, eval or None), validated; `build_trainer(model,
    tokenizer, training_args, train_dataset, eval_dataset, callbacks, args)` returns the stage's trainer
    (`stages.sft.build_sft_trainer` for the SFT family). `finished_model(model, checkpoint, args)` turns a
    checkpoint written at the last step into the model to publish (default: that checkpoint loaded as a model;
    LoRA puts its adapter on `model`), `write_pth(model, path)` writes the original's `.pth` for `save_pth`.
    """

    name: str
    load_datasets: Callable[[Any, Any, PreTrainedTokenizerBase], tuple]
    build_trainer: Callable[..., Trainer]
    config_class: type[TrainingArguments] = SFTConfig
    arguments_class: type = MiniMindArguments
    defaults: dict[str, Any] = field(default_factory=dict)
    finished_model: Callable[[Any, str, Any], Any] | None = None
    write_pth: Callable[[Any, Path], Path] = save_pth
    # The stage's own value checks (beta, num_generations, lora_r, ...), run with `checks.check_recipe`.
    check: Callable[[Any, Any], None] | None = None


def save_final(
    trainer: Trainer,
    args: MiniMindArguments,
    tokenizer: PreTrainedTokenizerBase,
    write_pth: Callable[[Any, Path], Path] = save_pth,
) -> None:
    """`output_dir` becomes an HF model with its tokenizer (the Trainer saves its processing class), a
    generation config that stops at `<|im_end|>` and the run's log history (`python -m minimind_hf.plot DIR`).

    The save goes to a staging folder first and is then moved into place (`checkpointing.commit_final`), so a
    crash leaves either the old model or a save that says it is incomplete, never a torn one that looks whole.
    """
    output_dir = trainer.args.output_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.generation_config = generation_config(tokenizer)
    state = PartialState()
    staging = begin_final(output_dir) if state.is_main_process else None
    state.wait_for_everyone()
    staging = Path(output_dir) / ".final.partial" if staging is None else staging
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        if args.save_pth:
            logger.info("wrote %s", write_pth(model, staging / pth_name(args.pth_weight_name, model.config)))
        commit_final(output_dir)
    state.wait_for_everyone()


def tokenizer_path(args: MiniMindArguments) -> str:
    """The recipe's tokenizer, else the model source's own, else the project's shipped one."""
    if args.tokenizer_name_or_path:
        return args.tokenizer_name_or_path
    try:
        return tokenizer_source(args.model_name_or_path) or "data/tokenizer"
    except ModelSourceError as err:
        raise RecipeError(f"model_name_or_path {err}") from err


def run_recipe(
    stage: Stage,
    argv: list[str] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    before_train: Callable[[Trainer], None] | None = None,
) -> Trainer:
    """A recipe's whole run (see the module doc); returns the trainer after the final save.

    Everything that can be wrong with the input is checked before training starts, and before anything is
    written to output_dir: recipe keys and types, tokenizer, data, model, resume point. `callbacks` are added to
    the trainer; `before_train(trainer)` sees it just before training (tests and the fault-injection harness).
    """
    args, training_args = parse_recipe((stage.arguments_class, stage.config_class), argv, stage.defaults)
    checks.check_recipe(args, training_args)
    if stage.check is not None:
        stage.check(args, training_args)
    guards.check_inputs_outside_output(args, training_args.output_dir)
    recipe = guards.recipe_snapshot(args, training_args)
    resume_from = resolve_resume(training_args)
    check_resume_point(resume_from)
    guards.check_resume_recipe(resume_from, recipe)
    run_dir.check_output_dir_use(training_args.output_dir, resume_from, args.overwrite_output_dir)
    try:
        # Cheap, and before the data is tokenized: a mistyped model path must not wait for that.
        source_kind(args.model_name_or_path)
    except ModelSourceError as err:
        raise RecipeError(f"model_name_or_path {err}") from err
    try:
        tokenizer = load_tokenizer(tokenizer_path(args), chat_template=args.chat_template)
    except (OSError, ValueError) as err:
        raise RecipeError(f"tokenizer {tokenizer_path(args)}: cannot load it ({err})") from err
    checks.check_tokenizer_change(args, tokenizer, resume_from)
    train_dataset, eval_dataset = stage.load_datasets(args, training_args, tokenizer)
    # The original seeds before it builds the model (`setup_seed(42 + rank)`): a fresh model's weights are part
    # of what the seed decides. The Trainer seeds again in its constructor, which changes nothing here.
    set_seed(training_args.seed)
    model = load_recipe_model(args)
    checks.check_model_fits(model, tokenizer, getattr(training_args, "max_length", None))
    if resume_from is not None:
        check_checkpoint_fits(resume_from, model.config)
    finished = resume_from is not None and training_finished(resume_from, training_args)
    if finished:
        # Killed during its final save: publish the last checkpoint's weights, without training a step too many.
        if stage.finished_model is not None:
            model = stage.finished_model(model, resume_from, args)
        else:
            model = load_model(resume_from, attn_implementation=args.attn_implementation)
    run_dir.check_output_dir_writable(training_args.output_dir)
    with run_dir.run_lock(training_args.output_dir):
        if resume_from is None and args.overwrite_output_dir:
            run_dir.clear_previous_run(training_args.output_dir)
        loggers = start_swanlab(args, training_args, resume_from)

        # Before the seal callback, so that a save it cancels never reaches the seal.
        guard = NonFiniteGuard(args.on_nonfinite)
        silent = NoSignalGuard(getattr(args, "no_signal_patience", 0))

        def extra_files(folder: Path) -> None:
            write_swanlab_run_id(folder)
            guards.write_recipe(folder, recipe)  # compared on resume (`guards.check_resume_recipe`)

        # The seal callback rotates checkpoints itself, after each seal (see `SealCheckpointCallback`).
        sealing = SealCheckpointCallback(training_args.save_total_limit, extra_files=extra_files)
        training_args.save_total_limit = None
        callbacks = [guard, silent, sealing, guards.RecipeIntervals(), *loggers, *callbacks]
        trainer = stage.build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset, callbacks, args)
        if before_train is not None:
            before_train(trainer)
        if finished:
            trainer.state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
        else:
            try:
                trainer.train(resume_from_checkpoint=resume_from)
            except Exception as err:
                folder = interrupted_save(training_args.output_dir, trainer.state.global_step)
                if folder is None or not trainer.is_world_process_zero():
                    raise
                raise save_failed(training_args.output_dir, folder, err) from err
        raise_if_diverged(trainer)
        save_final(trainer, args, tokenizer, stage.write_pth)
        if loggers and trainer.is_world_process_zero():
            import swanlab

            swanlab.finish()
    return trainer


def run_cli(main: Callable[[], Any]) -> None:
    """Run a recipe from the command line: bad input prints one `error: ...` line and exits 1, no traceback."""
    try:
        trainer = main()
        # As TRL's scripts end, once, at the very end of the script: finish the trackers and leave the process
        # group. Not in `run_recipe`, which a script may call more than once (LoRA, then DPO, in one process).
        if isinstance(trainer, Trainer):
            trainer.end()
    except MiniMindError as err:
        # One line, whatever a library put in the message: the last line of the output is the whole error.
        sys.exit("error: " + " ".join(str(err).split()))
