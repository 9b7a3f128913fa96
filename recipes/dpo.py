"""DPO of MiniMind with TRL's DPOTrainer and the original's loss (MiniMind's `train_dpo.py`, the HF way).

    python recipes/dpo.py --config recipes/dpo.yaml
    torchrun --nproc_per_node 2 recipes/dpo.py --config recipes/dpo.yaml --beta 0.2

Every key belongs to `DPOArguments` (minimind_hf/dpo.py: the project's keys plus `ref_model_name_or_path`) or to
TRL's `DPOConfig`. The default `loss_type: sigmoid_norm` is the original's loss (mean log-probs over every
assistant turn); `loss_type: sigmoid` is TRL's standard DPO on summed log-probs. All input is checked first.
"""

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig

from minimind_hf.dpo import DPOArguments, build_dpo_trainer, load_dpo_dataset
from minimind_hf.training import Stage, run_cli, run_recipe


def load_datasets(
    args: DPOArguments, training_args: DPOConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, Dataset | None]:
    """Preference pairs as TRL's conversational `chosen` / `rejected`; TRL finds the shared prompt and tokenizes."""

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
    defaults={
        "data_path": ["data/dpo.jsonl"],
        "loss_type": ["sigmoid_norm"],
        "beta": 0.1,
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
