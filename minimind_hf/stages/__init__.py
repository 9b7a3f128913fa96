"""One module per training stage, each a `Stage` for `training.run_recipe` and a `main(argv, **hooks)` that runs
it: `pretrain`, `sft` (reasoning SFT too), `lora`, `dpo`, `grpo`. `recipes/<stage>.py` launches `main`."""
