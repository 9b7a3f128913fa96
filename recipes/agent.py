"""Agentic RL of MiniMind-3 with TRL's tool-calling GRPOTrainer (MiniMind's `train_agent.py`, the HF way).

    python recipes/agent.py --config recipes/agent.yaml
    torchrun --nproc_per_node 2 recipes/agent.py --config recipes/agent.yaml

The stage (its keys, rows, tools and trainer) is minimind_hf/stages/agent.py; the tools minimind_hf/agent_tools.py;
the reward `agent_reward` in minimind_hf/rewards.py; the lifecycle minimind_hf/training.py.
"""

from minimind_hf.stages.agent import main
from minimind_hf.training import run_cli

if __name__ == "__main__":
    run_cli(main)
