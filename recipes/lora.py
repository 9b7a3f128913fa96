"""LoRA fine-tuning of MiniMind with PEFT on the SFT path (MiniMind's `train_lora.py`, the HF way).

    python recipes/lora.py --config recipes/lora.yaml
    torchrun --nproc_per_node 2 recipes/lora.py --config recipes/lora.yaml

The stage (its keys, data and trainer) is minimind_hf/stages/lora.py; the lifecycle is minimind_hf/training.py.
"""

from minimind_hf.stages.lora import main
from minimind_hf.training import run_cli

if __name__ == "__main__":
    run_cli(main)
