"""Full-parameter SFT of MiniMind with TRL's SFTTrainer (MiniMind's `train_full_sft.py`, the HF way).

    python recipes/sft.py --config recipes/sft.yaml
    torchrun --nproc_per_node 2 recipes/sft.py --config recipes/sft.yaml --learning_rate 1e-6

Every key of the YAML (and of `--key value` on the command line) belongs to `MiniMindArguments`
(minimind_hf/training.py) or to TRL's `SFTConfig`. All input is checked before any work starts.

The stage: conversations tokenized once with the assistant-only mask (`load_datasets`), and `MiniMindTrainer`,
TRL's `SFTTrainer` with MiniMind's loss (MoE balance loss, reasoning SFT's tag weighting) on packed rows
(`build_sft_trainer`, which pretraining and LoRA use too). Reasoning SFT is this stage with recipes/reason.yaml.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DynamoBackend
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..data import load_sft_tokenized
from ..modeling_minimind import MiniMindForCausalLM
from ..training import MiniMindArguments, Stage, run_cli, run_recipe


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


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """`torch.compile` each decoder layer in place (regional compilation); returns how many were compiled.

    The layers hold the elementwise work that eager mode pays for in memory traffic (norms, RoPE, SwiGLU, residual
    adds and autocast's casts): inductor fuses it. The whole model is not compiled: the packed-row mask and the LM
    head at supervised positions are data-dependent. Every layer runs the same code, so one compilation serves all
    of them; in place, so parameter names, checkpoints and `unwrap_model` are unchanged.
    """
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


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
    compiled = training_args.torch_compile
    # Compiled, every packed row is padded to `max_length` (a few percent of pad positions: bfd fills rows almost
    # completely), so that every batch has one shape and the compiled layers are never recompiled.
    static_length = training_args.max_length if compiled and training_args.packing else None
    trainer.data_collator = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=static_length)
    if compiled:
        compile_decoder_layers(model)
        # The layers are compiled in place above. Trainer's own `torch_compile` path hands accelerate the model, whose
        # compiled copy the training loop never calls (measured: no frame compiled, losses bit-identical to eager).
        trainer.accelerator.state.dynamo_plugin.backend = DynamoBackend.NO
    if args is not None and args.tag_loss_weight != 1.0:
        trainer.tag_loss_weight = args.tag_loss_weight
        trainer.tag_sequences = [tokenizer.encode(tag, add_special_tokens=False) for tag in args.tag_tokens]
    return trainer


def load_datasets(
    args: MiniMindArguments, training_args: SFTConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, Dataset | None]:
    """Conversations tokenized once, as TRL would (chat template, assistant-only mask, cut to `max_length`), by
    `dataset_num_proc` processes; `SFTTrainer` takes them as processed and only packs them. A conversation with no
    supervised token within `max_length` is dropped and named in the log (`error_on_unsupervised` to refuse it)."""

    def load(paths):
        return load_sft_tokenized(
            paths,
            tokenizer,
            training_args.max_length,
            skip_invalid=args.skip_invalid,
            error_on_unsupervised=args.error_on_unsupervised,
            num_proc=training_args.dataset_num_proc,
            assistant_only_loss=training_args.assistant_only_loss,
            add_system_ratio=args.add_system_ratio,
            empty_think_ratio=args.empty_think_ratio,
            seed=training_args.seed,
        )

    loaded = load(args.data_path), load(args.eval_data_path) if args.eval_data_path else None
    # The labels now carry the assistant-only mask; TRL applies `assistant_only_loss` only to conversations it
    # tokenizes itself, and refuses the key for tokenized rows.
    training_args.assistant_only_loss = False
    return loaded


SFT = Stage(
    name="sft", load_datasets=load_datasets, build_trainer=build_sft_trainer, defaults={"assistant_only_loss": True}
)


def main(argv: list[str] | None = None, **hooks):
    """`hooks`: `callbacks` and `before_train`, as `run_recipe` takes them."""
    return run_recipe(SFT, argv, **hooks)


if __name__ == "__main__":
    run_cli(main)
