"""Causal-LM pretraining of MiniMind (MiniMind's `train_pretrain.py`, the HF way).

    python recipes/pretrain.py --config recipes/pretrain.yaml
    torchrun --nproc_per_node 2 recipes/pretrain.py --config recipes/pretrain.yaml

Each `{"text": ...}` line becomes `<|im_start|>` + text + `<|im_end|>`, cut to `max_length`, and every token
is a target. Samples are packed into rows of `max_length` (no compute on padding) and never attend to, or
predict, each other. The output directory is what the SFT recipe's `model_name_or_path` points at.
"""

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig

from ..chat_templates import MINIMIND3_CHAT_TEMPLATE
from ..data import load_pretrain_tokenized
from ..training import MiniMindArguments, Stage, run_cli, run_recipe
from .sft import build_sft_trainer


def load_datasets(
    args: MiniMindArguments, training_args: SFTConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, Dataset | None]:
    """Texts tokenized once by `dataset_num_proc` processes, every token a target; `SFTTrainer` only packs them."""

    def load(paths):
        return load_pretrain_tokenized(
            paths,
            tokenizer,
            training_args.max_length,
            skip_invalid=args.skip_invalid,
            num_proc=training_args.dataset_num_proc,
            # MiniMind-3's pretraining keeps the end token when a text is cut; MiniMind2's drops it.
            keep_eos_when_cut=tokenizer.chat_template == MINIMIND3_CHAT_TEMPLATE,
        )

    return load(args.data_path), load(args.eval_data_path) if args.eval_data_path else None


PRETRAIN = Stage(
    name="pretrain",
    load_datasets=load_datasets,
    build_trainer=build_sft_trainer,
    defaults={"assistant_only_loss": False, "pth_weight_name": "pretrain", "swanlab_project": "MiniMind-Pretrain"},
)


def main(argv: list[str] | None = None, **hooks):
    """`hooks`: `callbacks` and `before_train`, as `run_recipe` takes them."""
    return run_recipe(PRETRAIN, argv, **hooks)


if __name__ == "__main__":
    run_cli(main)
