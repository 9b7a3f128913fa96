"""GRPO of MiniMind with TRL's GRPOTrainer (MiniMind's `train_grpo.py`, the HF way).

    python recipes/grpo.py --config recipes/grpo.yaml
    torchrun --nproc_per_node 2 recipes/grpo.py --config recipes/grpo.yaml

The stage (its keys, data and trainer) is minimind_hf/stages/grpo.py; the lifecycle is minimind_hf/training.py.
"""

from minimind_hf.stages.grpo import main
from minimind_hf.training import run_cli

if __name__ == "__main__":
    run_cli(main)
