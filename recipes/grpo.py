"""GRPO of MiniMind with TRL's GRPOTrainer (MiniMind's `train_grpo.py`, the HF way).

    python recipes/grpo.py --config recipes/grpo.yaml
    torchrun --nproc_per_node 2 recipes/grpo.py --config recipes/grpo.yaml --reward_funcs exact_match

Every key of the YAML (and of `--key value` on the command line) belongs to `GRPOArguments`
(minimind_hf/grpo.py: the project's keys plus `reward_funcs`, `reward_model_name_or_path`, `max_prompt_length`) or
to TRL's `GRPOConfig`. All input, the rewards included, is checked before any work starts.
"""

from trl import GRPOConfig

from minimind_hf.grpo import GRPOArguments, build_grpo_trainer, load_datasets
from minimind_hf.training import Stage, run_cli, run_recipe

# The original's defaults (train_grpo.py) where they differ from GRPOConfig's and the project's.
GRPO = Stage(
    name="grpo",
    load_datasets=load_datasets,
    config_class=GRPOConfig,
    arguments_class=GRPOArguments,
    build_trainer=build_grpo_trainer,
    defaults={
        "data_path": ["data/grpo.jsonl"],
        "learning_rate": 8e-8,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 16,
        "num_generations": 8,
        "beta": 0.02,
        "temperature": 0.8,
        "max_completion_length": 1536,
        "loss_type": "grpo",
        "logging_steps": 1,
        "save_steps": 10,
        "pth_weight_name": "grpo",
        "swanlab_project": "MiniMind-GRPO",
    },
)


def main(argv: list[str] | None = None, **hooks):
    """`hooks`: `callbacks` and `before_train`, as `run_recipe` takes them."""
    return run_recipe(GRPO, argv, **hooks)


if __name__ == "__main__":
    run_cli(main)
