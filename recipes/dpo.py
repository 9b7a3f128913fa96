"""DPO of MiniMind with TRL's DPOTrainer and the original's loss (MiniMind's `train_dpo.py`, the HF way).

    python recipes/dpo.py --config recipes/dpo.yaml
    torchrun --nproc_per_node 2 recipes/dpo.py --config recipes/dpo.yaml

The stage (its keys, data and trainer) is minimind_hf/stages/dpo.py; the lifecycle is minimind_hf/training.py.
"""

from minimind_hf.stages.dpo import main
from minimind_hf.training import run_cli

if __name__ == "__main__":
    run_cli(main)
