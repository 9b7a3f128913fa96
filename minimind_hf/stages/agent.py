"""Agentic RL of MiniMind-3 with TRL's tool-calling GRPOTrainer (the original's `train_agent.py`, the HF way).

    python recipes/agent.py --config recipes/agent.yaml
    torchrun --nproc_per_node 2 recipes/agent.py --config recipes/agent.yaml

The rollout is TRL's (`GRPOTrainer(tools=...)`): the model answers, every `<tool_call>` it writes is parsed (TRL's
Qwen3 response template, which MiniMind-3's chat format is) and run, the results go back as `tool` messages, and
the model continues, for at most `max_turns` turns (`max_tool_calling_iterations = max_turns - 1`). TRL masks the
tool replies and the template tokens around them (`tool_mask`); the loss is the GRPO stage's
`MiniMindGRPOTrainer`: the original's per-sequence `cispo` (default) or `grpo`, the k3 KL (beta 0.1) and MiniMind-3's
MoE balance loss. The reward is `agent_reward` (`minimind_hf.rewards`), the original's.

Rows (JSON Lines, `minimind_hf.agent_rows`, checked line by line before any work; a bad one is a `file:line` error):

    {"conversations": [{"role": "system", "content": "...", "tools": "[{\\"type\\": \\"function\\", ...}]"},
                       {"role": "user", "content": "What is 3 * 7?"},
                       {"role": "assistant", "content": ""}],
     "gt": ["21"]}

the original's `agent_rl.jsonl`: t2t conversations (`minimind_hf.t2t` rules) with the tool schemas on the system
message, a last assistant turn that is left out (the original drops the last message; a row that already ends on
a user or tool message is taken whole), and `gt`, the expected answers (strings or numbers). Refused: no tools, no
or a bad `gt`, a tool the recipe's `tools` lack, a prompt over `max_prompt_length` tokens.

Where this differs from the original, and why:

- The prompt shows each row's own tool schemas, as the original renders them: TRL renders `tools=` from the Python
  functions, so the stage gives the trainer (`trainer.chat_template`, a public attribute) the tokenizer's template
  with a preamble that prints the system message's schemas instead. The saved tokenizer keeps its template.
- `thinking_ratio` (0.1) is drawn per row with the seed and rides on the system message (`open_thinking`), which
  the same preamble reads; the original draws per rollout. After a tool reply TRL renders the next generation
  prompt from a conversation without that system message, so later turns open with an empty think block.
- Length: TRL's budget, not the original's left cut. `max_completion_length` bounds a whole trajectory (every turn
  and tool reply) and each turn's generation; a tool reply that would not fit ends the trajectory there (scored
  unfinished). The original generates up to 768 tokens per turn and cuts sequences over 2500 tokens from the left
  for the loss, which can cut the prompt; nothing is cut here, so every trained token keeps its context.
- Calls: TRL runs a turn's calls when all of its `<tool_call>` blocks parse; a turn with one malformed block runs
  none (the original runs the well-formed ones). The reward counts calls from the text either way.
- Any tool of the recipe can be called from any row (TRL's tools are per trainer); a call to a tool the row does
  not list runs, as in the original, and the reward counts it invalid.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl import GRPOConfig
from trl.chat_template_utils import qwen3_template

from ..agent_rows import tool_names
from ..agent_tools import BUILTIN_TOOLS, Tool, resolve_tools
from ..data import InvalidRecord, load_records
from ..errors import RecipeError
from ..rewards import RewardModelScore, resolve_reward_funcs
from ..training import Stage, run_cli, run_recipe
from .grpo import (
    GRPOArguments,
    MiniMindGRPOTrainer,
    _ReferenceDirectory,
    check_loss_keys,
    check_reward_model,
    resolve_generation_defaults,
    takes_open_thinking,
)
from .moe import has_minimind3_moe

# Put before the tokenizer's template: the row's own schemas (JSON strings on the system message) and its
# `open_thinking` draw replace what TRL passes, and a schema that is already a string is printed as it is.
_PREAMBLE = (
    "{%- if messages and messages[0].role == 'system' and messages[0].tools %}"
    "{%- set tools = messages[0].tools %}{%- endif %}"
    "{%- if messages and messages[0].role == 'system' and messages[0].open_thinking is defined "
    "and messages[0].open_thinking is not none %}{%- set open_thinking = messages[0].open_thinking %}{%- endif %}\n"
)
_TOOL_LINE = "{{- tool | tojson }}"


def agent_chat_template(template: str) -> str:
    """The training copy of a MiniMind-3 chat template (see the module doc)."""
    if _TOOL_LINE not in template or "open_thinking" not in template:
        raise RecipeError(
            "the agent stage needs MiniMind-3's chat template (tools block and open_thinking); this tokenizer's "
            "template has not got them"
        )
    return _PREAMBLE + template.replace(_TOOL_LINE, "{{- tool if tool is string else tool | tojson }}")


@dataclass
class AgentArguments(GRPOArguments):
    """The agent recipe's own keys, beside the GRPO stage's and TRL's `GRPOConfig`."""

    max_turns: int = field(default=3, metadata={"help": "turns of the model per trajectory (the original: 3)"})
    tools: list[str] = field(
        default_factory=lambda: list(BUILTIN_TOOLS),
        metadata={"help": "tools the model may call: minimind_hf.agent_tools keys or module.function paths"},
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.tools, str):
            self.tools = [self.tools]
        if self.max_turns < 1:
            raise RecipeError(f"max_turns must be >= 1, not {self.max_turns}")
        if not self.tools:
            raise RecipeError("tools: name at least one tool")


def _resolve_tools(args: AgentArguments) -> dict[str, Tool]:
    try:
        return {tool.name: tool for tool in resolve_tools(args.tools)}
    except ValueError as err:
        raise RecipeError(f"tools: {err}") from err


def _row_check(tools: dict[str, Tool], tokenizer: PreTrainedTokenizerBase, template: str, limit: int | None):
    def check(row: dict) -> None:
        for name in tool_names(row):
            if name not in tools:
                raise InvalidRecord(
                    "unknown_tool", f"tool {name!r} is not among the recipe's tools ({', '.join(tools)})"
                )
        if limit is not None:
            ids = tokenizer.apply_chat_template(
                row["prompt"], chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if len(ids) > limit:
                raise InvalidRecord(
                    "prompt_too_long", f"the prompt is {len(ids)} tokens, over max_prompt_length={limit}"
                )

    return check


def draw_open_thinking(dataset: Dataset, ratio: float, seed: int) -> Dataset:
    """Each row's `open_thinking`, drawn with probability `ratio` from `seed`, put on its system message."""
    draws = random.Random(seed)
    thinking = [draws.random() < ratio for _ in range(len(dataset))]

    def put(row: dict, index: int) -> dict:
        prompt = [dict(message) for message in row["prompt"]]
        prompt[0]["open_thinking"] = thinking[index]
        return {"prompt": prompt}

    return dataset.map(put, with_indices=True)


def load_datasets(args: AgentArguments, training_args: GRPOConfig, tokenizer: PreTrainedTokenizerBase) -> tuple:
    """The agent rows, validated against the recipe's tools; every key is checked here, before the model loads."""
    if not takes_open_thinking(tokenizer):
        raise RecipeError("the agent stage needs MiniMind-3's chat template (with open_thinking and tools)")
    check_loss_keys(args, training_args, tokenizer)
    iterations = training_args.max_tool_calling_iterations
    if iterations is not None and iterations != args.max_turns - 1:
        raise RecipeError(
            f"max_tool_calling_iterations {iterations} contradicts max_turns {args.max_turns}: set max_turns only"
        )
    training_args.max_tool_calling_iterations = args.max_turns - 1
    try:
        resolve_reward_funcs(args.reward_funcs, training_args)
    except ValueError as err:
        raise RecipeError(f"reward_funcs: {err}") from err
    if not args.reward_funcs and not args.reward_model_name_or_path:
        raise RecipeError("no reward: set reward_funcs and/or reward_model_name_or_path")
    if args.reward_model_name_or_path:
        check_reward_model(args.reward_model_name_or_path)
    tools = _resolve_tools(args)
    template = agent_chat_template(tokenizer.chat_template)
    check = _row_check(tools, tokenizer, template, args.max_prompt_length)

    def load(paths):
        dataset = load_records(paths, "agent", skip_invalid=args.skip_invalid, check=check)
        ratio = 0.1 if args.thinking_ratio is None else args.thinking_ratio
        return draw_open_thinking(dataset, ratio, training_args.seed)

    return load(args.data_path), load(args.eval_data_path) if args.eval_data_path else None


def build_agent_trainer(
    model,
    tokenizer: PreTrainedTokenizerBase,
    training_args: GRPOConfig,
    train_dataset,
    eval_dataset=None,
    callbacks: list[TrainerCallback] = (),
    args: AgentArguments | None = None,
) -> MiniMindGRPOTrainer:
    """TRL's `GRPOTrainer` with the recipe's tools, the row-schema template and the GRPO stage's loss."""
    resolve_generation_defaults(model, args, training_args)
    reward_funcs = []
    if args.reward_model_name_or_path:
        reward_funcs.append(RewardModelScore(args.reward_model_name_or_path, clip=args.reward_model_clip))
    reward_funcs += resolve_reward_funcs(args.reward_funcs, training_args)
    tools = [tool.callable_for_trl() for tool in _resolve_tools(args).values()]
    # MiniMind-3 writes calls as Qwen3 does; TRL only recognises Qwen3's own template text, so it is set here.
    if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
        tokenizer.response_template = qwen3_template
    with _ReferenceDirectory(model, args.model_name_or_path, needed=training_args.beta != 0.0):
        trainer = MiniMindGRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=list(callbacks),
            tools=tools,
        )
    trainer.chat_template = agent_chat_template(tokenizer.chat_template)
    trainer.sequence_averaging = args.grpo_loss_averaging == "sequence"
    trainer.add_moe_aux_loss = has_minimind3_moe(model)
    return trainer


# The original's defaults (train_agent.py) where they differ from GRPOConfig's and the project's.
AGENT = Stage(
    name="agent",
    load_datasets=load_datasets,
    config_class=GRPOConfig,
    arguments_class=AgentArguments,
    build_trainer=build_agent_trainer,
    defaults={
        "data_path": ["data/agent_rl.jsonl"],
        "learning_rate": 3e-7,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "temperature": 0.8,
        "max_completion_length": 1536,
        "max_prompt_length": 1024,
        "beta": 0.1,
        "loss_type": "cispo",
        "reward_funcs": ["agent_reward"],
        "logging_steps": 1,
        "save_steps": 10,
        "pth_weight_name": "agent",
        "swanlab_project": "MiniMind-Agent-RL",
    },
)


def main(argv: list[str] | None = None, **hooks):
    """`hooks`: `callbacks` and `before_train`, as `run_recipe` takes them."""
    return run_recipe(AGENT, argv, **hooks)


if __name__ == "__main__":
    run_cli(main)
