"""Knowledge distillation of MiniMind on SFT data (MiniMind-3's `train_distillation.py`, the HF way).

    python recipes/distill.py --config recipes/distill.yaml
    python recipes/distill.py --config recipes/distill.yaml --alpha 0.3 --temperature 2.0

The stage (its keys, data and trainer) is minimind_hf/stages/distill.py; the lifecycle is minimind_hf/training.py.
"""

from minimind_hf.stages.distill import main
from minimind_hf.training import run_cli

if __name__ == "__main__":
    run_cli(main)
