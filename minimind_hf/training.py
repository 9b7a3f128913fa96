"""The recipe core: one lifecycle for every training stage (pretrain, SFT, LoRA, DPO, GRPO, reasoning SFT).

    parse the recipe -> check everything -> seed -> load the model -> build the stage's trainer -> train
    -> save the final model

`run_recipe(stage, argv)` owns that lifecycle. A `Stage` supplies only what differs: its config dataclass (TRL's
`SFTConfig`, `DPOConfig`, ...) plus the project's keys, how data files become datasets, and how its trainer is
built. A recipe script (`recipes/sft.py`) is a `Stage` and one call. What every trainer gets (sealed
checkpoints, the swanlab run id) is a `TrainerCallback`, so it works unchanged on any TRL trainer.
"""

import difflib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from trl import SFTConfig, SFTTrainer, TrlParser
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from . import guards
from .checkpointing import (
    CheckpointError,
    SealCheckpointCallback,
    begin_final,
    check_checkpoint_fits,
    check_resumable,
    commit_final,
    interrupted_save,
    last_complete_checkpoint,
    save_failed,
    training_finished,
)
from .convert import pth_name, save_pth
from .data import DataError
from .guards import RecipeError
from .loading import ModelSourceError, source_kind, tokenizer_source
from .loading import load_model as load_any_model
from .modeling_minimind import MiniMindForCausalLM
from .tokenizer import load_tokenizer

logger = logging.getLogger("minimind_hf")

SWANLAB_RUN_FILE = "swanlab_run_id.txt"
# swanlab would otherwise copy the console into the run, i.e. every redraw of the Trainer's progress bar; the
# metrics are what is logged.
SWANLAB_SETTINGS: dict[str, Any] = {"terminal": {"proxy_type": "none"}}

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
    guards.check_command_line(argv)
    known = _known_keys(dataclass_types)
    if "--config" in argv:
        config_path = Path(argv[argv.index("--config") + 1])
        if not config_path.is_file():
            raise RecipeError(f"recipe file {config_path} does not exist")
        try:
            recipe = yaml.safe_load(config_path.read_text())
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


def load_model(
    args: MiniMindArguments, source: str | None = None, key: str = "model_name_or_path"
) -> MiniMindForCausalLM:
    """The model the recipe starts from (`source`, default `args.model_name_or_path`), in any form
    `minimind_hf.loading` knows (or a fresh one of the recipe's sizes); errors name the recipe `key`."""
    try:
        return load_any_model(
            args.model_name_or_path if source is None else source,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            use_moe=args.use_moe,
            config_overrides=args.config_overrides,
            attn_implementation=args.attn_implementation,
        )
    except ModelSourceError as err:
        raise RecipeError(f"{key} {err}") from err
    except (ValueError, StrictDataclassError) as err:  # a config field of the wrong type (`dropout=2`)
        raise RecipeError(" ".join(str(err).split())) from err


@dataclass
class PackedRowsCollator(DataCollatorForLanguageModeling):
    """Rows of packed samples with `position_ids` that restart at each sample, and no `attention_mask`.

    Without an attention mask, `masking_utils` reads the restarts as sample boundaries and builds a block-diagonal
    causal mask per row, so samples never attend to each other and no compute goes to padding. TRL's own
    padding-free mode instead flattens the whole batch into one row, whose attention cost on a CPU (no varlen
    kernels) is quadratic in the batch rather than in each row.
    """

    return_position_ids: bool = True

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch.pop("attention_mask", None)
        # A sample's first token would be the target of the previous sample's last one: never a target.
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def tag_positions(targets: torch.Tensor, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Where `targets` (batch x positions, -100 where not supervised) hold a whole occurrence of one of the token
    `sequences`, every token of it marked. Only targets are matched, so a tag in a prompt (or one cut by the
    assistant mask) is never marked: MiniMind marks every position whose target id is a tag id, inside the mask or
    not, but its tags are several ordinary tokens ('<', 'th', 'ink', '>') with its own tokenizer, so its rule also
    weights each such token anywhere in the text, and the loss of prompt tokens is not SFT's to learn."""
    marked = torch.zeros_like(targets, dtype=torch.bool)
    for sequence in sequences:
        n = len(sequence)
        if n == 0 or targets.size(-1) < n:
            continue
        pattern = torch.tensor(list(sequence), device=targets.device, dtype=targets.dtype)
        hits = (targets.unfold(-1, n, 1) == pattern).all(-1)
        for k in range(n):
            marked[..., k : k + hits.size(-1)] |= hits
    return marked


class MiniMindTrainer(SFTTrainer):
    """`SFTTrainer` whose loss is the model's own: the causal-LM loss plus, for MoE, MiniMind's balance loss.

    TRL's fused LM head would drop the MoE loss (it knows only Mixtral's), and its entropy and accuracy metrics
    cost a pass over the vocabulary on every step. The language-model and balance losses are logged apart.

    Reasoning SFT (`tag_loss_weight`, `tag_sequences`: the token ids of each tag) weights every supervised target
    that belongs to a tag, and divides the weighted sum by the unweighted count of supervised targets, as
    MiniMind's `train_distill_reason.py` does. Evaluation losses stay unweighted, comparable across recipes.
    """

    tag_loss_weight: float = 1.0
    tag_sequences: Sequence[Sequence[int]] = ()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        inputs = {**inputs, "use_cache": False}
        labels = inputs.pop("labels")
        unwrapped = self.accelerator.unwrap_model(model)
        if return_outputs:
            outputs = model(**inputs)
            loss_labels = {"labels": labels}
        else:
            # Only the loss is wanted: project onto the vocabulary only at positions whose next token is supervised
            # (`logits_to_keep` takes a boolean mask), which skips the LM head, its fp32 logits and their softmax
            # for every prompt, header and padding position. Measured in benchmarks/README.md.
            shift_labels = labels[:, 1:]
            supervised = shift_labels != -100
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = supervised
            outputs = model(**inputs, logits_to_keep=keep)
            loss_labels = {"labels": None, "shift_labels": shift_labels[supervised]}
        if not return_outputs and self.tag_loss_weight != 1.0 and self.tag_sequences:
            targets = shift_labels[supervised]
            per_token = torch.nn.functional.cross_entropy(
                outputs.logits.reshape(targets.numel(), -1).float(), targets, reduction="none"
            )
            weights = 1.0 + (self.tag_loss_weight - 1.0) * tag_positions(shift_labels, self.tag_sequences)[supervised]
            count = supervised.sum() if num_items_in_batch is None else num_items_in_batch
            lm_loss = (per_token * weights).sum() / count
        else:
            lm_loss = unwrapped.loss_function(
                logits=outputs.logits,
                vocab_size=unwrapped.config.vocab_size,
                num_items_in_batch=num_items_in_batch,
                **loss_labels,
            )
        loss = lm_loss
        # As in `Trainer.compute_loss`: with a global token count, DDP's gradient averaging must be undone.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if getattr(outputs, "aux_loss", None) is not None:
            # The balance loss is a per-micro-batch mean: average it over the accumulated micro-batches.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + outputs.aux_loss / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(outputs.aux_loss.detach()).mean().item())
            per_batch_lm = lm_loss.detach()
            if num_items_in_batch is not None:
                per_batch_lm = per_batch_lm * num_items_in_batch / (labels[:, 1:] != -100).sum().clamp(min=1)
            self._metrics[mode]["lm_loss"].append(self.accelerator.gather(per_batch_lm).mean().item())
        return (loss, outputs) if return_outputs else loss


def write_swanlab_run_id(checkpoint: Path) -> None:
    """Keep the swanlab run id inside a checkpoint, so that a resumed run continues the same swanlab run."""
    try:
        import swanlab

        run = swanlab.get_run()
    except Exception:
        run = None
    if run is not None and checkpoint.is_dir():
        (checkpoint / SWANLAB_RUN_FILE).write_text(run.id)


def resolve_resume(training_args: SFTConfig) -> str | None:
    """`resume_from_checkpoint`: a path, or true/"true" for the newest complete checkpoint in output_dir (None if
    none). Incomplete or damaged newer checkpoints are skipped with a warning; a given path must be intact."""
    value = training_args.resume_from_checkpoint
    if value in (None, False, "", "false", "False"):
        return None
    try:
        if str(value).lower() == "true":
            last = last_complete_checkpoint(training_args.output_dir)
            if last is None:
                logger.warning("resume_from_checkpoint: no checkpoint in %s, starting fresh", training_args.output_dir)
            return last
        check_resumable(value)
    except CheckpointError as err:
        raise RecipeError(f"resume_from_checkpoint: {err}") from err
    return str(value)


def start_swanlab(args: MiniMindArguments, training_args: SFTConfig, resume_from: str | None) -> list[TrainerCallback]:
    """swanlab logging, continuing the run saved with the checkpoint we resume from.

    transformers' built-in `report_to: swanlab` calls `swanlab.get_run()`, which raises in swanlab >= 0.9 when
    no run is active; swanlab's own transformers callback is used instead, on a run started here (on the main
    process) so that it can carry the resumed run id. `SWANLAB_MODE=local|offline|disabled` works as usual.
    """
    if "swanlab" not in training_args.report_to:
        return []
    training_args.report_to = [name for name in training_args.report_to if name != "swanlab"]
    import swanlab
    from swanlab.integration.transformers import SwanLabCallback

    if training_args.process_index == 0:
        run_file = Path(resume_from or "", SWANLAB_RUN_FILE)
        run_id = run_file.read_text().strip() if resume_from and run_file.is_file() else None
        swanlab.init(
            project=os.environ.get("SWANLAB_PROJECT", args.swanlab_project),
            experiment_name=training_args.run_name,
            logdir=os.environ.get("SWANLAB_LOG_DIR", str(Path(training_args.output_dir) / "swanlog")),
            id=run_id,
            resume="allow" if run_id else None,
            settings=swanlab.Settings(**SWANLAB_SETTINGS),
        )
    return [SwanLabCallback()]


def build_sft_trainer(
    model: MiniMindForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    training_args: SFTConfig,
    train_dataset,
    eval_dataset=None,
    callbacks: Sequence[TrainerCallback] = (),
    args: MiniMindArguments | None = None,
) -> MiniMindTrainer:
    """TRL's `SFTTrainer` with MiniMind's loss and packed rows (pretraining and SFT)."""
    trainer = MiniMindTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    # SFTTrainer refuses a custom collator next to its bfd packing, whose dataset preparation we do want; the
    # collator only decides how packed samples become a batch, so it is swapped in afterwards.
    trainer.data_collator = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id)
    if args is not None and args.tag_loss_weight != 1.0:
        trainer.tag_loss_weight = args.tag_loss_weight
        trainer.tag_sequences = [tokenizer.encode(tag, add_special_tokens=False) for tag in args.tag_tokens]
    return trainer


@dataclass(frozen=True)
class Stage:
    """What one training stage adds to the shared lifecycle of `run_recipe`.

    `config_class` is the TRL config (`SFTConfig`, `DPOConfig`, ...), `arguments_class` the project's keys
    (`MiniMindArguments` or a subclass with the stage's own), `defaults` what the stage changes in both.
    `load_datasets(args, training_args, tokenizer)` returns (train, eval or None), validated; `build_trainer` has
    `build_sft_trainer`'s signature. `finished_model(model, checkpoint, args)` turns a checkpoint written at the
    last step into the model to publish (default: that checkpoint loaded as a model; LoRA puts its adapter on
    `model`), `write_pth(model, path)` writes the original's `.pth` for `save_pth`.
    """

    name: str
    load_datasets: Callable[[Any, Any, PreTrainedTokenizerBase], tuple]
    config_class: type[TrainingArguments] = SFTConfig
    arguments_class: type = MiniMindArguments
    build_trainer: Callable[..., Trainer] = build_sft_trainer
    defaults: dict[str, Any] = field(default_factory=dict)
    finished_model: Callable[[Any, str, Any], Any] | None = None
    write_pth: Callable[[Any, Path], Path] = save_pth


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """How a trained model generates by default: until `<|im_end|>`, sampling as MiniMind's chat does."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.85,
        top_p=0.85,
        max_new_tokens=512,
    )


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
    guards.check_recipe(args, training_args)
    resume_from = resolve_resume(training_args)
    guards.check_resume_point(resume_from)
    guards.check_output_dir_use(training_args.output_dir, resume_from, args.overwrite_output_dir)
    try:
        # Cheap, and before the data is tokenized: a mistyped model path must not wait for that.
        source_kind(args.model_name_or_path)
    except ModelSourceError as err:
        raise RecipeError(f"model_name_or_path {err}") from err
    try:
        tokenizer = load_tokenizer(tokenizer_path(args))
    except (OSError, ValueError) as err:
        raise RecipeError(f"tokenizer {tokenizer_path(args)}: cannot load it ({err})") from err
    guards.check_tokenizer_change(args, tokenizer, resume_from)
    train_dataset, eval_dataset = stage.load_datasets(args, training_args, tokenizer)
    # The original seeds before it builds the model (`setup_seed(42 + rank)`): a fresh model's weights are part
    # of what the seed decides. The Trainer seeds again in its constructor, which changes nothing here.
    set_seed(training_args.seed)
    model = load_model(args)
    guards.check_model_fits(model, tokenizer, getattr(training_args, "max_length", None))
    if resume_from is not None:
        check_checkpoint_fits(resume_from, model.config)
    finished = resume_from is not None and training_finished(resume_from, training_args)
    if finished:
        # Killed during its final save: publish the last checkpoint's weights, without training a step too many.
        if stage.finished_model is not None:
            model = stage.finished_model(model, resume_from, args)
        else:
            model = load_any_model(resume_from, attn_implementation=args.attn_implementation)
    guards.check_output_dir_writable(training_args.output_dir)
    with guards.run_lock(training_args.output_dir):
        if resume_from is None and args.overwrite_output_dir:
            guards.clear_previous_run(training_args.output_dir)
        loggers = start_swanlab(args, training_args, resume_from)

        # Before the seal callback, so that a save it cancels never reaches the seal.
        guard = guards.NonFiniteGuard(args.on_nonfinite)
        # The seal callback rotates checkpoints itself, after each seal (see `SealCheckpointCallback`).
        sealing = SealCheckpointCallback(training_args.save_total_limit, extra_files=write_swanlab_run_id)
        training_args.save_total_limit = None
        trainer = stage.build_trainer(
            model, tokenizer, training_args, train_dataset, eval_dataset, [guard, sealing, *loggers, *callbacks], args
        )
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
        guards.raise_if_diverged(trainer)
        save_final(trainer, args, tokenizer, stage.write_pth)
        if loggers and trainer.is_world_process_zero():
            import swanlab

            swanlab.finish()
    return trainer


def run_cli(main: Callable[[], Any]) -> None:
    """Run a recipe from the command line: bad input prints one `error: ...` line and exits 1, no traceback."""
    try:
        main()
    except (RecipeError, DataError, CheckpointError) as err:
        sys.exit(f"error: {err}")
