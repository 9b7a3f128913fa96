"""LoRA fine-tuning of MiniMind with PEFT on the SFT path (MiniMind's `train_lora.py`, the HF way).

    python recipes/lora.py --config recipes/lora.yaml
    torchrun --nproc_per_node 2 recipes/lora.py --config recipes/lora.yaml --lora_r 16

The SFT recipe's data, masks and packing, with only the adapter trained. `output_dir` becomes a PEFT adapter
directory (adapter_config.json naming the base, adapter_model.safetensors, the tokenizer) that `chat`, `evaluate`
and the recipes' `model_name_or_path` load merged; `python -m minimind_hf.convert merge-lora OUT MERGED` writes the
merged model.

The defaults are the original's adapter (`model/model_lora.py`): it adds `B(A(x))`, unscaled, to every `nn.Linear`
whose weight is square (`q_proj` and `o_proj`; also `k_proj` and `v_proj` when there are as many KV heads as heads),
with `A ~ N(0, 0.02)` and `B = 0`, rank 8 for MiniMind2 and 16 for MiniMind-3 (`lora_r` null: by the base model's
generation; at MiniMind-3's 768 wide, 8 heads, 4 KV heads the square Linears are `q_proj` and `o_proj`). In PEFT
terms that is `LoraConfig(r=8, lora_alpha=8, lora_dropout=0, target_modules=<those>)` plus the init of A, which no
PEFT `init_lora_weights` option gives (`"gaussian"` draws with std 1/r), so `init_lora_like_minimind` sets it. The
original's adapter files are `formats/lora_pth.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ..checks import check_number
from ..errors import RecipeError
from ..formats.lora_pth import save_lora_pth, set_base_model
from ..training import MiniMindArguments, run_cli, run_recipe
from .moe import model_generation
from .sft import SFT, build_sft_trainer

MINIMIND_INIT_STD = 0.02
# The original's default rank in each generation (`train_lora.py`).
RANK_BY_GENERATION = {2: 8, 3: 16}


def square_linear_modules(model: nn.Module) -> list[str]:
    """Where the original puts LoRA: every `nn.Linear` whose weight is square, as PEFT `target_modules`.

    Leaf names (`q_proj`, `o_proj`) when every Linear of that name is square, which keeps `adapter_config.json`
    readable; the full module paths otherwise (a leaf name would also catch the non-square ones).
    """
    square: dict[str, list[str]] = {}
    other: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if module.weight.shape[0] == module.weight.shape[1]:
                square.setdefault(leaf, []).append(name)
            else:
                other.add(leaf)
    if not square:
        raise ValueError("the model has no square nn.Linear: name lora_target_modules explicitly")
    if other & set(square):
        return sorted(name for names in square.values() for name in names)
    return sorted(square)


def lora_config(
    model: nn.Module,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
) -> LoraConfig:
    """The original's adapter as a `LoraConfig`: `alpha` defaults to `r` (B·A·x added unscaled), the targets to
    `square_linear_modules`. `target_modules` may be a list of names or PEFT's `"all-linear"`."""
    return LoraConfig(
        r=r,
        lora_alpha=r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_modules or square_linear_modules(model),
        bias="none",
        task_type="CAUSAL_LM",
    )


def init_lora_like_minimind(model: PeftModel, std: float = MINIMIND_INIT_STD, seed: int = 0) -> None:
    """A ~ N(0, std) and B = 0 in every LoRA layer, as the original's `LoRA.__init__` (PEFT's default draws A
    Kaiming-uniform). A generator of its own keeps the draw the same on every rank and whatever ran before."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    weight = module.lora_A[name].weight
                    weight.copy_(torch.randn(weight.shape, generator=generator) * std)
                    module.lora_B[name].weight.zero_()


@dataclass
class LoraArguments(MiniMindArguments):
    """The SFT keys plus the adapter's, named as in TRL's `ModelConfig`."""

    lora_r: int | None = field(
        default=None, metadata={"help": "adapter rank; null: the original's, 8 for MiniMind2, 16 for MiniMind-3"}
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "scaling alpha/r; default r: B·A·x unscaled"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (the original: none)"})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "module names, or all-linear; default: every square nn.Linear (the original's rule)"},
    )
    lora_init_std: float | None = field(
        default=0.02, metadata={"help": "A ~ N(0, std), B = 0 as the original; null: PEFT's init (Kaiming A)"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.model_name_or_path is None:
            raise RecipeError("model_name_or_path: LoRA adapts an existing model; name the one to adapt")
        if self.lora_r is not None and self.lora_r < 1:
            raise RecipeError(f"lora_r must be at least 1, not {self.lora_r}")
        if isinstance(self.lora_target_modules, list) and self.lora_target_modules == ["all-linear"]:
            self.lora_target_modules = "all-linear"


def check_lora(args: LoraArguments, training_args) -> None:
    """The adapter keys that would make it learn nothing, or backwards (`lora_r` is checked on parsing)."""
    # alpha scales the adapter's output (alpha / r): 0 zeroes it, a negative one flips its sign.
    check_number("lora_alpha", args.lora_alpha, low=0, low_open=True, why="the adapter's scale is alpha / r")
    check_number("lora_dropout", args.lora_dropout, low=0, high=1, high_open=True, why="a dropout probability")
    # With A = 0 and B = 0 neither gets a gradient (each one's is a product with the other): the adapter never moves.
    check_number("lora_init_std", args.lora_init_std, low=0, low_open=True, why="0 leaves A and B at 0 forever")
    targets = args.lora_target_modules
    if isinstance(targets, list) and (not targets or any(not str(name).strip() for name in targets)):
        raise RecipeError(f"lora_target_modules: must name modules (or be null for the original's), got {targets}")


def build_lora_trainer(model, tokenizer, training_args, train_dataset, eval_dataset=None, callbacks=(), args=None):
    """The SFT trainer on the model wrapped with the adapter.

    The model is wrapped here rather than by handing `peft_config` to `SFTTrainer`: the adapter must get the
    original's init before the Trainer sees it, and a run restored at its last step (`finished_model`) already
    arrives as a `PeftModel`; both then take the one SFT path.
    """
    if args.lora_r is None:
        args.lora_r = RANK_BY_GENERATION[model_generation(model)]
    if not isinstance(model, PeftModel):
        try:
            config = lora_config(
                model, args.lora_r, args.lora_alpha, args.lora_dropout, target_modules=args.lora_target_modules
            )
            model = get_peft_model(model, config)
        except ValueError as err:
            raise RecipeError(f"lora_target_modules: {err}") from err
        if args.lora_init_std is not None:
            init_lora_like_minimind(model, args.lora_init_std, seed=training_args.seed)
    set_base_model(model, args.model_name_or_path)
    return build_sft_trainer(model, tokenizer, training_args, train_dataset, eval_dataset, callbacks, args)


def finished_model(model, checkpoint: str, args: LoraArguments) -> PeftModel:
    """A run killed during its final save: the checkpoint's adapter on the base model, trainable as in training."""
    return PeftModel.from_pretrained(model, checkpoint, is_trainable=True)


LORA = dataclasses.replace(
    SFT,
    name="lora",
    arguments_class=LoraArguments,
    build_trainer=build_lora_trainer,
    finished_model=finished_model,
    write_pth=save_lora_pth,
    check=check_lora,
    defaults={
        **SFT.defaults,
        "learning_rate": 1e-4,
        "num_train_epochs": 50,
        "pth_weight_name": "lora_identity",
        "swanlab_project": "MiniMind-LoRA-SFT",
    },
)


def main(argv: list[str] | None = None, **hooks):
    """`hooks`: `callbacks` and `before_train`, as `run_recipe` takes them."""
    return run_recipe(LORA, argv, **hooks)


if __name__ == "__main__":
    run_cli(main)
