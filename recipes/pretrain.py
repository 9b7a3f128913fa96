"""Causal-LM pretraining of MiniMind (MiniMind's `train_pretrain.py`, the HF way).

    python recipes/pretrain.py --config recipes/pretrain.yaml
    torchrun --nproc_per_node 2 recipes/pretrain.py --config recipes/pretrain.yaml

The stage (its keys, data and trainer) is minimind_hf/stages/pretrain.py; the lifecycle is minimind_hf/training.py.
"""

from minimind_hf.stages.pretrain import main
from minimind_hf.training import run_cli

if __name__ == "__main__":
    run_cli(main)
