"""Full-parameter SFT of MiniMind with TRL's SFTTrainer (MiniMind's `train_full_sft.py`, the HF way).

    python recipes/sft.py --config recipes/sft.yaml
    torchrun --nproc_per_node 2 recipes/sft.py --config recipes/sft.yaml
    python recipes/sft.py --config recipes/reason.yaml     # reasoning SFT (tag-weighted loss)

The stage (its keys, data and trainer) is minimind_hf/stages/sft.py; the lifecycle is minimind_hf/training.py.
"""

from minimind_hf.stages.sft import main
from minimind_hf.training import run_cli

if __name__ == "__main__":
    run_cli(main)
