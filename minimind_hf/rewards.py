"""Reward functions for GRPO, by name: checkable answers, MiniMind's reasoning format, and TRL's own rewards.

Each function has the signature TRL's `GRPOTrainer` calls: `f(completions, **columns) -> list[float | None]`, where
`completions` are strings or, for chat prompts, one-message lists (`[{"role": "assistant", "content": ...}]`) and
each dataset column (`answer`, `task`, ...) comes as a keyword list. `None` means "does not apply to this row":
TRL leaves it out of the sum.

    exact_match        1.0 when the reply, stripped, equals the row's `answer` (stripped); None without one
    answer_match       the same for the content of the reply's `<answer>` block (a reasoning reply)
    reasoning_format   0.5 when the reply is `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` (MiniMind)
    reasoning_tags     0.25 for each of the four tags that occurs exactly once (MiniMind)
    minimind3_reward   MiniMind-3's length, thinking-length, `</think>` closure and repetition terms
    agent_reward       MiniMind-3's agent RL reward of a tool-calling trajectory (`gt`, the row's tools)
    think_format_reward, accuracy_reward, reasoning_accuracy_reward, soft_overlong_punishment,
    repetition_penalty  TRL's rewards (`trl.rewards`)

MiniMind's `train_grpo.py` adds `reasoning_format` and `reasoning_tags` (its `reasoning_model_reward`) to a reward
model's score; `resolve_reward_funcs` builds the list from names or `module.function` import paths, as TRL's
`trl/scripts/grpo.py` does.

Completions are untrusted text: every function takes empty, huge, tag-less or undecodable replies (bytes, lone
surrogates) and answers in time linear in the reply's length.

Score a model's greedy replies to held-out prompts with any of them:

    python -m minimind_hf.rewards --model out/demo/reason --data data/eval.jsonl \
        --rewards reasoning_format reasoning_tags answer_match
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from .agent_tools import TOOLS
from .chat import generate_replies
from .cli_options import add_model_arguments, load_from_args
from .evaluate import load_eval_rows
from .replies import gt_found, parse_call_blocks

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
REASONING_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

RewardFunc = Callable[..., list[float | None]]


def completion_text(completion: Any) -> str:
    """The reply's text: a string as is, a chat completion's last message content, bytes decoded leniently."""
    if isinstance(completion, list):
        completion = completion[-1].get("content", "") if completion and isinstance(completion[-1], dict) else ""
    if isinstance(completion, (bytes, bytearray)):
        completion = bytes(completion).decode("utf-8", errors="replace")
    return completion if isinstance(completion, str) else ""


def exact_match(completions: Sequence[Any], answer: Sequence[str | None] | None = None, **kwargs) -> list:
    """1.0 when the stripped reply equals the stripped `answer` (what `minimind_hf.evaluate` scores), else 0.0;
    None for a row without an answer (a MiniMind RLAIF row)."""
    answers = answer if answer is not None else [None] * len(completions)
    return [
        None if expected is None else float(completion_text(c).strip() == expected.strip())
        for c, expected in zip(completions, answers, strict=True)
    ]


def answer_block(text: str) -> str | None:
    """The content of the first `<answer>...</answer>` block, or None (MiniMind: `<answer>(.*?)</answer>`)."""
    start = text.find(ANSWER_OPEN)
    if start == -1:
        return None
    end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
    return None if end == -1 else text[start + len(ANSWER_OPEN) : end]


def answer_match(completions: Sequence[Any], answer: Sequence[str | None] | None = None, **kwargs) -> list:
    """`exact_match` on the content of the reply's `<answer>` block (0.0 when it has none): checks a reasoning
    reply's answer, as MiniMind scores the answer block apart."""
    answers = answer if answer is not None else [None] * len(completions)
    scores = []
    for c, expected in zip(completions, answers, strict=True):
        block = answer_block(completion_text(c))
        scores.append(None if expected is None else float(block is not None and block.strip() == expected.strip()))
    return scores


def _matches_reasoning_format(text: str) -> bool:
    """Whether MiniMind's two patterns match, `re.match` with `re.S`:

        ^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$
        ^<think>\\n.*?\\n</think>\\n\\n<answer>\\n.*?\\n</answer>$

    The lazy groups are free, so a match is the fixed prefix, the fixed suffix (`$` also matches before a final
    newline) and one of the two separators somewhere in between. Decided here by string search, which is linear;
    the regular expression backtracks over every separator in a long reply (quadratic). Tested against it.
    """
    prefix, separators = THINK_OPEN + "\n", ("\n" + THINK_CLOSE + "\n" + ANSWER_OPEN + "\n",)
    separators += ("\n" + THINK_CLOSE + "\n\n" + ANSWER_OPEN + "\n",)
    if not text.startswith(prefix):
        return False
    for suffix in ("\n" + ANSWER_CLOSE, "\n" + ANSWER_CLOSE + "\n"):
        if text.endswith(suffix) and len(text) >= len(prefix) + len(suffix):
            middle = text[len(prefix) : len(text) - len(suffix)]
            if any(separator in middle for separator in separators):
                return True
    return False


def reasoning_format(completions: Sequence[Any], **kwargs) -> list[float]:
    """0.5 for a reply of MiniMind's reasoning form `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` (a blank
    line may separate the blocks), else 0.0: MiniMind's `reasoning_model_reward`, first part."""
    return [0.5 if _matches_reasoning_format(completion_text(c)) else 0.0 for c in completions]


def reasoning_tags(completions: Sequence[Any], **kwargs) -> list[float]:
    """0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` that occurs exactly once in the reply:
    MiniMind's `mark_num`."""
    texts = [completion_text(c) for c in completions]
    return [0.25 * sum(text.count(tag) == 1 for tag in REASONING_TAGS) for text in texts]


def word_repetition_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """MiniMind-3's repetition penalty: with `dup` the number of repeated word n-grams among `total`,
    `min(cap, dup * cap * 2 / total)` (a text half made of repeats gets the whole cap); 0 below n words."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams))


def thinking_and_answer(text: str) -> tuple[str | None, str]:
    """A MiniMind-3 reply split at its first `</think>`: (thinking, answer), or (None, reply) without one."""
    if THINK_CLOSE not in text:
        return None, text.strip()
    thinking, answer = text.split(THINK_CLOSE, 1)
    return thinking.strip(), answer.strip()


def _minimind3_text_reward(text: str, min_chars: int = 20, penalty: Callable[[str], float] | None = None) -> float:
    reward = 0.5 if min_chars <= len(text.strip()) <= 800 else -0.5
    thinking, answer = thinking_and_answer(text)
    if thinking is not None:
        reward += 1.0 if 20 <= len(thinking) <= 300 else -0.5
        reward += 0.25 if text.count(THINK_CLOSE) == 1 else -0.25
    return reward - (penalty or word_repetition_penalty)(answer)


def minimind3_reward(completions: Sequence[Any], **kwargs) -> list[float]:
    """MiniMind-3's `train_grpo.py` rule reward (its reward model's score is the separate `reward_model_name_or_path`
    function): +0.5 for a 20-800 character reply, else -0.5; with `</think>`, +1.0 for 20-300 characters of thinking
    (else -0.5) and +0.25 when `</think>` occurs exactly once (else -0.25); minus `word_repetition_penalty` of the
    answer (the text after `</think>`, or the whole reply)."""
    return [_minimind3_text_reward(completion_text(completion)) for completion in completions]


# --- MiniMind-3's agent reward (`train_agent.py`'s `calculate_rewards`) -------------------------------------------

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_AGENT_TOKENS = re.compile(r"\w+|[^\w\s]")


def agent_repetition_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """`train_agent.py`'s `rep_penalty`: `word_repetition_penalty` over lower-cased word and punctuation tokens
    (its GRPO twin splits on whitespace), so Chinese text without spaces is counted too."""
    tokens = _AGENT_TOKENS.findall(text.lower())
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0


def _after_think(turn: str) -> str:
    return turn.split(THINK_CLOSE, 1)[-1].strip() if THINK_CLOSE in turn else turn.strip()


def _call_is_valid(call: Any, valid: Callable[[str, dict], bool]) -> bool:
    if not isinstance(call, dict):
        return False
    name, arguments = call.get("name", ""), call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = {}
    return isinstance(name, str) and isinstance(arguments, dict) and bool(valid(name, arguments))


def agent_trajectory_reward(
    turns: Sequence[str], gt: Sequence[Any], valid: Callable[[str, dict], bool], unfinished: bool = False
) -> float:
    """The original's reward of one trajectory, from the model's own text of each turn (`turns`, tool replies not
    included), the expected answers `gt`, `valid(name, arguments)` (the tool is among the row's and its required
    arguments are there) and whether the trajectory was still calling tools when it had to stop.

    -0.5 per unbalanced `<tool_call>` tag (each turn's text after `</think>`); without any tool call, the last turn
    is scored as `minimind3_reward` scores a reply (but a 5-800 character reply, as `train_agent.py` has it);
    otherwise `gap = |valid calls - len(gt)| + invalid calls` gives +0.5 at 0 and -0.5 per unit, +2.5 x the share
    of `gt` found in the final answer (the last turn's text after its last `</tool_call>`; none when unfinished),
    -0.5 when unfinished, minus the repetition penalty; clipped to +-3."""
    turns = [str(turn) for turn in turns] or [""]
    answers = [_after_think(turn) for turn in turns]
    reward = -0.5 * sum(abs(a.count(CALL_OPEN) - a.count(CALL_CLOSE)) for a in answers)
    calls = [call for a in answers for call in parse_call_blocks(a)]
    if not calls:
        reward += _minimind3_text_reward(turns[-1], min_chars=5, penalty=agent_repetition_penalty)
        return max(-3.0, min(3.0, reward))
    valid_calls = sum(_call_is_valid(call, valid) for call in calls)
    gap = abs(valid_calls - len(gt)) + (len(calls) - valid_calls)
    reward += 0.5 if gap == 0 else -0.5 * gap
    answer = answers[-1]
    final = "" if unfinished else answer.split(CALL_CLOSE)[-1]
    if gt:
        reward += 2.5 * len(gt_found(final, gt)) / len(gt)
    if unfinished:
        reward -= 0.5
    reward -= agent_repetition_penalty(final or answer)
    return max(-3.0, min(3.0, reward))


def assistant_turn_text(message: dict) -> str:
    """An assistant message of a TRL trajectory as the text the model wrote: reasoning (when TRL split it off),
    content and tool calls as MiniMind-3's template writes them."""
    text = message.get("content") or ""
    if not isinstance(text, str):
        text = ""
    if message.get("reasoning_content"):
        text = f"{message['reasoning_content']}\n{THINK_CLOSE}\n\n{text}"
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        body = json.dumps(
            {"name": function.get("name"), "arguments": function.get("arguments", {})}, ensure_ascii=False
        )
        text += ("\n" if text else "") + f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"
    return text


def trajectory_turns(completion: Any) -> tuple[list[str], bool]:
    """(the model's turns, unfinished) of a TRL completion: a list of assistant and tool messages (or one string).
    Unfinished: it ends with an assistant turn whose calls were never answered (the turn limit, or no room left)."""
    if not isinstance(completion, list):
        return [completion_text(completion)], False
    turns = [assistant_turn_text(m) for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
    last = completion[-1] if completion and isinstance(completion[-1], dict) else {}
    unfinished = last.get("role") == "assistant" and bool(last.get("tool_calls"))
    return turns, unfinished


def row_tool_schemas(prompt: Any) -> list[dict]:
    """The tool schemas on a prompt's system message (JSON strings, a JSON list string, or objects)."""
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[0], dict):
        return []
    tools = prompt[0].get("tools") or []
    if isinstance(tools, str):
        tools = json.loads(tools)
    return [json.loads(tool) if isinstance(tool, str) else tool for tool in tools]


def agent_reward(
    completions: Sequence[Any], gt: Sequence[Sequence[Any]] | None = None, prompts: Sequence[Any] | None = None, **kw
) -> list[float | None]:
    """MiniMind-3's agent reward (`agent_trajectory_reward`) of TRL trajectories: the row's tools come from its
    prompt's system message, the required arguments from the tool registry (`minimind_hf.agent_tools`), as the
    original's `CHECK_ARGS` does. None for a row without `gt` (not an agent row)."""
    rewards: list[float | None] = []
    prompts = prompts if prompts is not None else [None] * len(completions)
    gts = gt if gt is not None else [None] * len(completions)
    for completion, prompt, expected in zip(completions, prompts, gts, strict=True):
        if expected is None:
            rewards.append(None)
            continue
        names = {schema.get("function", schema).get("name") for schema in row_tool_schemas(prompt)}

        def valid(name: str, arguments: dict, names: set = names) -> bool:
            return name in names and name in TOOLS and TOOLS[name].valid_arguments(arguments)

        turns, unfinished = trajectory_turns(completion)
        rewards.append(agent_trajectory_reward(turns, list(expected), valid, unfinished))
    return rewards


class RewardModelScore:
    """A local reward model as a reward function: the prompt plus the reply's answer (the text after `</think>`,
    as MiniMind-3 scores it) as a chat, scored and clipped to +-`clip`.

    Two kinds of directory: a sequence classifier (`AutoModelForSequenceClassification`, the score is its one
    logit on the reward tokenizer's chat rendering), or a remote-code model with `get_score(tokenizer, messages)`
    (InternLM2-1.8B-Reward, the original's), whose code is run only from that local directory. Never downloaded.
    """

    def __init__(self, path: str, clip: float | None = 3.0):
        from pathlib import Path

        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        self.__name__ = Path(path).name  # TRL logs `rewards/<name>/mean`
        self.clip = clip
        # Read as JSON: asking AutoConfig would already refuse (or run) the directory's code.
        remote = "auto_map" in json.loads((Path(path) / "config.json").read_text())
        if remote:
            # Remote code from this local directory only: `local_files_only` forbids any download.
            self.model = AutoModel.from_pretrained(path, trust_remote_code=True, local_files_only=True)
            if not hasattr(self.model, "get_score"):
                raise ValueError(f"{path}: a remote-code reward model needs a get_score(tokenizer, messages) method")
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
        self.model.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.remote = remote
        self._torch = torch

    def score(self, messages: list[dict]) -> float:
        if self.remote:
            return float(self.model.get_score(self.tokenizer, messages))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        with self._torch.no_grad():
            return float(self.model(**inputs).logits[0, 0])

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float]:
        scores = []
        # Prompts the GRPO stage rendered itself (`thinking_ratio`) are text; their messages come as a column.
        rendered = kwargs.get("prompt_messages") or [None] * len(prompts)
        for prompt, completion, messages in zip(prompts, completions, rendered, strict=True):
            if messages is None:
                messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            answer = thinking_and_answer(completion_text(completion))[1]
            value = self.score([*messages, {"role": "assistant", "content": answer}])
            scores.append(value if self.clip is None else max(-self.clip, min(self.clip, value)))
        return scores


def _trl_reward(name: str) -> Callable[[Any], RewardFunc]:
    def build(training_args: Any) -> RewardFunc:
        import trl.rewards

        if name in ("accuracy_reward", "reasoning_accuracy_reward"):
            from trl.import_utils import is_math_verify_available

            if not is_math_verify_available():
                raise ValueError(f"reward '{name}' needs the math_verify package (pip install math-verify)")
        return getattr(trl.rewards, name)

    return build


def _soft_overlong_punishment(training_args: Any) -> RewardFunc:
    """DAPO's length penalty (`trl.rewards.get_soft_overlong_punishment`) over the recipe's own completion budget:
    0 up to 80% of `max_completion_length`, then down to -1 at the limit."""
    from trl.rewards import get_soft_overlong_punishment

    limit = training_args.max_completion_length
    return get_soft_overlong_punishment(max_completion_len=limit, soft_punish_cache=max(1, limit // 5))


def _repetition_penalty(training_args: Any) -> RewardFunc:
    from trl.rewards import get_repetition_penalty_reward

    return get_repetition_penalty_reward()


def _plain(func: RewardFunc) -> Callable[[Any], RewardFunc]:
    return lambda training_args: func


# Name -> a builder taking the recipe's GRPOConfig (some rewards are sized by it).
REWARD_FUNCS: dict[str, Callable[[Any], RewardFunc]] = {
    "exact_match": _plain(exact_match),
    "answer_match": _plain(answer_match),
    "reasoning_format": _plain(reasoning_format),
    "reasoning_tags": _plain(reasoning_tags),
    "minimind3_reward": _plain(minimind3_reward),
    "agent_reward": _plain(agent_reward),
    "think_format_reward": _trl_reward("think_format_reward"),
    "accuracy_reward": _trl_reward("accuracy_reward"),
    "reasoning_accuracy_reward": _trl_reward("reasoning_accuracy_reward"),
    "soft_overlong_punishment": _soft_overlong_punishment,
    "repetition_penalty": _repetition_penalty,
}


def resolve_reward_funcs(names: Sequence[str], training_args: Any = None) -> list[RewardFunc]:
    """The reward functions for `names`: registry names, or `package.module.function` import paths (the current
    directory is importable, as in TRL's grpo script). An unknown name or a path that does not import is a
    `ValueError` naming it and the registry."""
    funcs = []
    for name in names:
        if name in REWARD_FUNCS:
            funcs.append(REWARD_FUNCS[name](training_args))
            continue
        if "." not in name:
            raise ValueError(f"unknown reward '{name}': one of {', '.join(REWARD_FUNCS)}, or a module.function path")
        module_path, attribute = name.rsplit(".", 1)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            func = getattr(importlib.import_module(module_path), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward '{name}' cannot be imported: {err}") from err
        if not callable(func):
            raise ValueError(f"reward '{name}' is not callable")
        funcs.append(func)
    return funcs


def main(argv: list[str] | None = None) -> dict:
    """Mean reward per task of a model's greedy replies to the prompts of an evaluation file."""
    parser = argparse.ArgumentParser(prog="python -m minimind_hf.rewards", description=main.__doc__)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="evaluation rows (conversations, task, answer)")
    parser.add_argument("--rewards", nargs="+", default=["reasoning_format", "reasoning_tags", "answer_match"])
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--out", help="write the scores and every reply as JSON")
    args = parser.parse_args(argv)
    try:
        funcs = resolve_reward_funcs(args.rewards, argparse.Namespace(max_completion_length=args.max_new_tokens))
        rows = load_eval_rows(args.data)
    except ValueError as err:
        parser.exit(1, f"error: {err}\n")
    model, tokenizer = load_from_args(args, parser)
    replies = []
    for start in range(0, len(rows), args.batch_size):
        batch = [row["prompt"] for row in rows[start : start + args.batch_size]]
        replies += generate_replies(model, tokenizer, batch, max_new_tokens=args.max_new_tokens, greedy=True)
    columns = {"answer": [row["answer"] for row in rows], "task": [row["task"] for row in rows]}
    scores = {name: func(replies, **columns) for name, func in zip(args.rewards, funcs, strict=True)}
    by_task = defaultdict(lambda: defaultdict(list))
    for name, values in scores.items():
        for row, value in zip(rows, values, strict=True):
            if value is not None:
                by_task[row["task"]][name].append(value)
                by_task["overall"][name].append(value)
    table = {task: {name: sum(v) / len(v) for name, v in named.items()} for task, named in by_task.items()}
    print(f"{'task':<10} " + " ".join(f"{name:>18}" for name in args.rewards))
    for task in sorted(table, key=lambda t: (t == "overall", t)):
        print(f"{task:<10} " + " ".join(f"{table[task].get(name, float('nan')):>18.3f}" for name in args.rewards))
    samples = [{"prompt": row["prompt"], "reply": reply} for row, reply in zip(rows, replies, strict=True)]
    report = {"mean": table, "samples": samples}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
    return report


if __name__ == "__main__":
    main()
