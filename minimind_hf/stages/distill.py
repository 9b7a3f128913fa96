"""Knowledge distillation on SFT data (MiniMind-3's `train_distillation.py`, the HF way).

    python recipes/distill.py --config recipes/distill.yaml

The SFT stage (its data, assistant-only mask, packed rows and `MiniMindTrainer`) with a frozen teacher: any model
source (`teacher_model_name_or_path`: an HF directory, a MiniMind-3 `.pth`, an adapter, a Qwen3 export; MoE or
dense, any size) that shares the student's tokenizer. `DistillTrainer.compute_loss`, the one thing that changes:

    loss = alpha * (CE + student aux) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with the KL summed over the vocabulary and averaged over the supervised tokens (the CE's count, so gradient
accumulation weighs both terms alike), the teacher's logits cut to the student's vocabulary, `alpha` 0.5 and
`temperature` 1.5 (the original's). A teacher of the other generation (a different tokenizer behind the same 6400
ids) or with fewer logits than the student has is refused with one line before training. TRL's GKD trainer was
not used: it distils on-policy generations with a generalised JSD, not this supervised forward KL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ModelSourceError, RecipeError
from ..loading import load_model, source_kind
from ..training import MiniMindArguments, run_cli, run_recipe
from .moe import model_generation
from .sft import SFT, MiniMindTrainer, PackedRowsCollator


@dataclass
class DistillArguments(MiniMindArguments):
    """The SFT keys plus the teacher and the mix of the two losses."""

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "the frozen teacher: any model source sharing the student's tokenizer"}
    )
    alpha: float = field(default=0.5, metadata={"help": "weight of the student's own CE (+ aux); 1 - alpha: the KL"})
    temperature: float = field(default=1.5, metadata={"help": "softmax temperature T of both (the KL is scaled T^2)"})

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_model_name_or_path is None:
            raise RecipeError("teacher_model_name_or_path: distillation needs a teacher model")
        try:
            source_kind(self.teacher_model_name_or_path)
        except ModelSourceError as err:
            raise RecipeError(f"teacher_model_name_or_path {err}") from err
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"alpha must be between 0 and 1, not {self.alpha}")
        if not self.temperature > 0:
            raise RecipeError(f"temperature must be > 0, not {self.temperature}")


def load_teacher(args: DistillArguments, student: torch.nn.Module) -> torch.nn.Module:
    """The teacher, frozen in eval mode, after checking it shares the student's vocabulary (one-line errors)."""
    try:
        teacher = load_model(args.teacher_model_name_or_path, attn_implementation=args.attn_implementation)
    except ModelSourceError as err:
        raise RecipeError(f"teacher_model_name_or_path {err}") from err
    names = {2: "MiniMind2", 3: "MiniMind-3"}
    if model_generation(teacher) != model_generation(student):
        raise RecipeError(
            f"teacher_model_name_or_path {args.teacher_model_name_or_path} is a {names[model_generation(teacher)]} "
            f"model and the student {names[model_generation(student)]}: their vocabularies differ"
        )
    if teacher.config.vocab_size < student.config.vocab_size:
        raise RecipeError(
            f"teacher_model_name_or_path {args.teacher_model_name_or_path} has vocab_size={teacher.config.vocab_size}"
            f", fewer than the student's {student.config.vocab_size}: they must share the tokenizer"
        )
    return teacher.eval().requires_grad_(False)


class DistillTrainer(MiniMindTrainer):
    """`MiniMindTrainer` whose loss mixes the student's CE (+ MoE aux) with the KL to the teacher (module doc)."""

    teacher: torch.nn.Module | None = None
    alpha: float = 0.5
    temperature: float = 1.5

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {**inputs, "use_cache": False}
        labels = inputs.pop("labels")
        targets = labels[:, 1:]
        supervised = targets != -100
        # Logits only where the next token is supervised, for both models (the rest is never scored).
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = supervised
        outputs = model(**inputs, logits_to_keep=keep)
        student = outputs.logits.float().reshape(int(supervised.sum()), -1)
        if self.teacher.device != student.device:
            self.teacher.to(student.device)
        with torch.no_grad():
            teacher = self.teacher(**inputs, logits_to_keep=keep).logits.float()
        teacher = teacher.reshape(student.size(0), -1)[:, : student.size(-1)]
        count = supervised.sum() if num_items_in_batch is None else num_items_in_batch
        ce = F.cross_entropy(student, targets[supervised], reduction="sum") / count
        t = self.temperature
        teacher_logp = F.log_softmax(teacher / t, dim=-1)
        kl = (teacher_logp.exp() * (teacher_logp - F.log_softmax(student / t, dim=-1))).sum() / count
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            ce, kl = ce * self.accelerator.num_processes, kl * self.accelerator.num_processes
        hard = ce
        if getattr(outputs, "aux_loss", None) is not None:
            # A per-micro-batch mean, as in `MiniMindTrainer`: averaged over the accumulated micro-batches.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            hard = hard + outputs.aux_loss / steps
            self._metrics["train"]["aux_loss"].append(self.accelerator.gather(outputs.aux_loss.detach()).mean().item())
        loss = self.alpha * hard + (1 - self.alpha) * t * t * kl
        self._metrics["train"]["ce_loss"].append(self.accelerator.gather(ce.detach()).mean().item())
        self._metrics["train"]["kl_loss"].append(self.accelerator.gather(kl.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss


def build_distill_trainer(model, tokenizer, training_args, train_dataset, eval_dataset=None, callbacks=(), args=None):
    """The SFT trainer, as `DistillTrainer`, with the teacher on the student's device."""
    teacher = load_teacher(args, model)
    trainer = DistillTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    # As `build_sft_trainer`: packed rows batched with per-sample position ids (see `PackedRowsCollator`).
    trainer.data_collator = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id)
    trainer.teacher = teacher.to(trainer.args.device)
    trainer.alpha, trainer.temperature = args.alpha, args.temperature
    return trainer


DISTILL = dataclasses.replace(
    SFT,
    name="distill",
    arguments_class=DistillArguments,
    build_trainer=build_distill_trainer,
    defaults={
        **SFT.defaults,
        # MiniMind-3's train_distillation.py.
        "learning_rate": 5e-6,
        "max_length": 340,
        "pth_weight_name": "full_dist",
        "swanlab_project": "MiniMind-Distillation",
    },
)


def main(argv: list[str] | None = None, **hooks):
    """`hooks`: `callbacks` and `before_train`, as `run_recipe` takes them."""
    return run_recipe(DISTILL, argv, **hooks)


if __name__ == "__main__":
    run_cli(main)
