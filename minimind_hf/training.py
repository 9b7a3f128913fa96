"""What the training recipes share: arguments, model source, collator, trainer, resume and final save.

A recipe (`recipes/sft.py`, `recipes/pretrain.py`) is `parse_recipe` + a dataset + `build_trainer` + `run`.
Everything is TRL's `SFTTrainer` and transformers' `Trainer`; this module adds only MiniMind's specifics.
"""

import difflib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig, SFTTrainer, TrlParser
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .checkpointing import AtomicCheckpointMixin, CheckpointError, check_resumable, last_complete_checkpoint
from .configuration_minimind import MiniMindConfig
from .convert import build_config, load_pth, parse_overrides, pth_name, save_pth
from .data import DataError
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
    "gradient_checkpointing": False,
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
    save_pth: bool = field(default=False, metadata={"help": "also write the original .pth next to the HF model"})
    pth_weight_name: str = field(default="full_sft", metadata={"help": "MiniMind's --save_weight: the .pth prefix"})
    swanlab_project: str = field(default="MiniMind-Full-SFT", metadata={"help": "swanlab project name"})

    def __post_init__(self):
        # YAML may give a single path where a list is expected.
        if isinstance(self.data_path, str):
            self.data_path = [self.data_path]
        if isinstance(self.eval_data_path, str):
            self.eval_data_path = [self.eval_data_path]


class RecipeError(ValueError):
    """A recipe that cannot run; raised before any model, data or output directory is touched."""


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
    known = _known_keys(dataclass_types)
    if "--config" in argv:
        config_path = Path(argv[argv.index("--config") + 1])
        if not config_path.is_file():
            raise RecipeError(f"recipe file {config_path} does not exist")
        try:
            recipe = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as err:
            raise RecipeError(f"{config_path}: not valid YAML: {err}") from err
        if not isinstance(recipe, dict):
            raise RecipeError(f"{config_path}: a recipe must be a YAML mapping of key: value")
        _check_keys([k for k in recipe if k != "env"], known, str(config_path))
    flags = [a[2:].split("=")[0] for a in argv if a.startswith("--") and a != "--config"]
    _check_keys(flags, known, "command line")

    parser = TrlParser(dataclass_types)
    parser.set_defaults(**{k: v for k, v in {**PROJECT_DEFAULTS, **(defaults or {})}.items() if k in known})
    return parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)


def load_model(args: MiniMindArguments) -> MiniMindForCausalLM:
    """The model the recipe starts from: an HF directory, an original `.pth`, or a fresh one from the sizes."""
    overrides = parse_overrides(args.config_overrides)
    sizes = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers, "use_moe": args.use_moe}
    source = args.model_name_or_path
    if source is not None and Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise RecipeError(f"model_name_or_path {source} is a directory without config.json")
        config = MiniMindConfig.from_pretrained(source)
        for key, value in {**sizes, **overrides}.items():
            if value is not None and getattr(config, key, value) != value:
                raise RecipeError(
                    f"the recipe says {key}={value} but the checkpoint {source} has {key}={getattr(config, key)}"
                )
        try:
            return AutoModelForCausalLM.from_pretrained(
                source, dtype=torch.float32, attn_implementation=args.attn_implementation
            )
        except (OSError, ValueError, SafetensorError) as err:
            raise RecipeError(f"model_name_or_path {source}: cannot load the model ({err})") from err
    config = build_config(
        hidden_size=512 if args.hidden_size is None else args.hidden_size,
        num_hidden_layers=8 if args.num_hidden_layers is None else args.num_hidden_layers,
        use_moe=bool(args.use_moe),
        overrides=overrides,
    )
    config._attn_implementation = args.attn_implementation
    if source is None:
        return MiniMindForCausalLM(config)
    if not Path(source).is_file():
        raise RecipeError(f"model_name_or_path {source} does not exist (an HF directory or a .pth file)")
    try:
        return load_pth(source, config)
    except ValueError as err:
        raise RecipeError(str(err)) from err


def check_output_dir(output_dir: str) -> None:
    """Fail before training when the output directory cannot be written (not after hours, at the first save)."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RecipeError(f"output_dir {output_dir} is not writable: {err}") from err


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


class MiniMindTrainer(AtomicCheckpointMixin, SFTTrainer):
    """`SFTTrainer` whose loss is the model's own: the causal-LM loss plus, for MoE, MiniMind's balance loss.

    TRL's fused LM head would drop the MoE loss (it knows only Mixtral's), and its entropy and accuracy metrics
    cost a pass over the vocabulary on every step. The language-model and balance losses are logged apart.
    Checkpoints are sealed when complete (`AtomicCheckpointMixin`).
    """

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


class SwanLabRunIdCallback(TrainerCallback):
    """Keeps the swanlab run id inside each checkpoint, so that a resumed run continues the same swanlab run."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        try:
            import swanlab

            run = swanlab.get_run()
        except Exception:
            run = None
        if run is not None:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
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


def build_trainer(
    model: MiniMindForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    training_args: SFTConfig,
    train_dataset,
    eval_dataset=None,
) -> MiniMindTrainer:
    trainer = MiniMindTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[SwanLabRunIdCallback()],
    )
    # SFTTrainer refuses a custom collator next to its bfd packing, whose dataset preparation we do want; the
    # collator only decides how packed samples become a batch, so it is swapped in afterwards.
    trainer.data_collator = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id)
    return trainer


def save_final(trainer: MiniMindTrainer, args: MiniMindArguments, tokenizer: PreTrainedTokenizerBase) -> None:
    """The output directory becomes an HF model (with tokenizer) that generates until `<|im_end|>`."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.85,
        top_p=0.85,
        max_new_tokens=512,
    )
    trainer.save_model(trainer.args.output_dir)
    # The run's log history next to the model: what `python -m minimind_hf.plot DIR` draws.
    trainer.save_state()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(trainer.args.output_dir)
        if args.save_pth:
            path = save_pth(model, Path(trainer.args.output_dir) / pth_name(args.pth_weight_name, model.config))
            logger.info("wrote %s", path)


def tokenizer_path(args: MiniMindArguments) -> str:
    """The recipe's tokenizer, else the model directory's own, else the project's shipped one."""
    if args.tokenizer_name_or_path:
        return args.tokenizer_name_or_path
    model_dir = Path(args.model_name_or_path or "")
    if args.model_name_or_path and (model_dir / "tokenizer_config.json").is_file():
        return str(model_dir)
    return "data/tokenizer"


def run_recipe(
    argv: list[str] | None,
    load_datasets: Callable[[MiniMindArguments, SFTConfig, PreTrainedTokenizerBase], tuple],
    defaults: dict[str, Any] | None = None,
) -> MiniMindTrainer:
    """A recipe's whole run. Everything that can be wrong with the input is checked before training starts,
    and before anything is written to output_dir: recipe keys and types, tokenizer, data, model, resume point."""
    args, training_args = parse_recipe(argv=argv, defaults=defaults)
    tokenizer = load_tokenizer(tokenizer_path(args))
    train_dataset, eval_dataset = load_datasets(args, training_args, tokenizer)
    model = load_model(args)
    resume_from = resolve_resume(training_args)
    check_output_dir(training_args.output_dir)
    loggers = start_swanlab(args, training_args, resume_from)

    trainer = build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset)
    for callback in loggers:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume_from)
    save_final(trainer, args, tokenizer)
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
