"""The demo's tool tasks: questions whose answers only a tool can give, in MiniMind-3's t2t and agent formats.

`data/make_data.py` writes them (this module only draws rows):

- `tool_sft.jsonl`: t2t SFT rows. The system message carries the tool schemas (a JSON string, as the original's
  `sft_t2t` rows), the user asks, the assistant calls `calculate_math` (`tool_calls`), the tool's reply follows
  (`tool`, written by the registry's own tool, so it is byte for byte what a rollout or an evaluation gets back)
  and the assistant answers with the bare value.
- `agent_rl.jsonl`: the original's agent RL rows (the last assistant turn empty, `gt` the expected answers), for
  the agent stage: the same tasks and wordings as the SFT rows, other draws.
- `eval_agent.jsonl`: agent rows held out by construction: question wordings nothing else uses (`EVAL_WORDINGS`)
  and number pairs no other file asks about.
- `pretrain_tools.jsonl`: tool conversations as pretraining text (`{"text": ...}`), rendered by MiniMind-3's
  template without the system message, as the original pretrains on chat-formatted text.

The tasks are multiplication of two 2-digit numbers and addition and subtraction of 3-digit numbers: a small model
cannot hold the results, so it must call the tool, copy the numbers from the question into the call, and copy
the tool's value into its answer. Each row offers `calculate_math` beside `unit_converter`, in a drawn order,
sometimes with a third tool that does not help.

Copying is what a model this small learns last (docs/demo_experiments.md, "MiniMind-3 and tool tasks"): 600 tool
rows trained 5 epochs gave well-formed calls with wrong numbers (1 of 160 held-out tasks solved); texts that say a
number twice taught copying only in their own sentence forms (`benchmarks/copy_learning.py`). What worked: the
tool conversations' own text in pretraining (`pretrain_tools.jsonl`, 4,000 rows), then SFT on the tool rows; the
SFT model then solves 70.6% of the held-out tasks (README, "The demo"). The wordings keep the two numbers at the
end of the question, one word apart (an opening, `x <word> y`, one mark).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from minimind_hf.agent_tools import TOOLS

KINDS = ["multiply", "add", "subtract"]
LANGUAGES = ["en", "zh"]
OFFERED = ["calculate_math", "unit_converter"]  # every row; the task needs the first
DISTRACTORS = ["get_current_weather", "get_exchange_rate"]
SYSTEM = {
    "en": ["You are a helpful assistant.", "You are MiniMind. Use the tools when they help.", "Answer briefly."],
    "zh": ["你是一个乐于助人的助手。", "你是MiniMind，需要时使用工具。", "请简短回答。"],
}
# {x} {y}: the numbers. Every wording ends with `{x} <one word> {y}` and one mark (see the module doc).
SFT_WORDINGS = {
    "multiply": {
        "en": ["What is {x} times {y}?", "What is {x} * {y}?", "Multiply {x} by {y}.", "Calculate {x} * {y}.",
               "How much is {x} times {y}?", "What is the product of {x} and {y}?", "Compute {x} times {y}."],
        "zh": ["计算{x}乘{y}。", "请算一下{x}*{y}。", "求{x}乘{y}。", "算一算{x}乘{y}？", "{x}乘{y}？", "问{x}*{y}。"],
    },
    "add": {
        "en": ["What is {x} plus {y}?", "What is {x} + {y}?", "Add {x} and {y}.", "Calculate {x} + {y}.",
               "What is the sum of {x} and {y}?", "How much is {x} plus {y}?", "Compute {x} plus {y}."],
        "zh": ["计算{x}加{y}。", "请算一下{x}+{y}。", "求{x}加{y}。", "算一算{x}加{y}？", "{x}加{y}？", "问{x}+{y}。"],
    },
    "subtract": {
        "en": ["What is {x} minus {y}?", "What is {x} - {y}?", "Calculate {x} - {y}.", "How much is {x} minus {y}?",
               "Compute {x} minus {y}.", "Work out {x} - {y}."],
        "zh": ["计算{x}减{y}。", "请算一下{x}-{y}。", "求{x}减{y}。", "算一算{x}减{y}？", "{x}减{y}？", "问{x}-{y}。"],
    },
}  # fmt: skip
EVAL_WORDINGS = {  # held out: no training row is worded so (the operation's word is one training uses)
    "multiply": {"en": ["Tell me {x} times {y}.", "Please work out {x} * {y}."],
                 "zh": ["告诉我{x}乘{y}。", "帮我算出{x}*{y}。"]},
    "add": {"en": ["Tell me {x} plus {y}.", "Please work out {x} + {y}."],
            "zh": ["告诉我{x}加{y}。", "帮我算出{x}+{y}。"]},
    "subtract": {"en": ["Tell me {x} minus {y}.", "Please work out {x} - {y}."],
                 "zh": ["告诉我{x}减{y}。", "帮我算出{x}-{y}。"]},
}  # fmt: skip
PREFIXES = {  # openings of training questions (closings would move the numbers away from the end)
    "en": ["", "", "", "Hi, ", "Quick question: ", "Please, ", "Hey! ", "I need help. ", "Homework: ", "Sorry, "],
    "zh": ["", "", "", "你好，", "请问，", "问一下：", "帮个忙，", "作业题："],
}


def schema(name: str) -> dict:
    """The registry's schema of a tool without what a caller does not need (the return type and the argument
    descriptions): the template prints every schema into every prompt, and on a 2-core CPU each token counts."""
    function = {k: v for k, v in TOOLS[name].schema["function"].items() if k != "return"}
    properties = {key: {"type": spec["type"]} for key, spec in function["parameters"]["properties"].items()}
    return {"type": "function", "function": {**function, "parameters": {**function["parameters"],
                                                                           "properties": properties}}}  # fmt: skip


def schemas(names: list[str]) -> str:
    """The system message's `tools`: the schemas as one JSON string."""
    return json.dumps([schema(name) for name in names], ensure_ascii=False)


class ToolTasks:
    """Draws tool rows from one seeded stream; the eval items are drawn first and never asked in training rows."""

    def __init__(self, seed: int, n_eval: int):
        self.rng = random.Random(seed)
        plan = [(kind, lang) for _ in range(n_eval // 6) for kind in KINDS for lang in LANGUAGES]
        self.eval_items = [(kind, lang, self.item(kind)) for kind, lang in plan]
        self.held_out = {self.key(kind, item) for kind, _, item in self.eval_items}

    def item(self, kind: str) -> dict:
        rng = self.rng
        if kind == "multiply":
            return {"x": rng.randint(12, 99), "y": rng.randint(12, 99)}
        if kind == "add":
            return {"x": rng.randint(100, 999), "y": rng.randint(100, 999)}
        x = rng.randint(200, 999)  # subtract: a positive difference
        return {"x": x, "y": rng.randint(100, x - 1)}

    @staticmethod
    def key(kind: str, item: dict) -> tuple:
        if kind in ("multiply", "add"):  # either order asks the same
            return (kind, *sorted((item["x"], item["y"])))
        return (kind, item["x"], item["y"])

    def training_item(self, kind: str) -> dict:
        while True:
            item = self.item(kind)
            if self.key(kind, item) not in self.held_out:
                return item

    @staticmethod
    def call(kind: str, item: dict) -> dict:
        op = {"multiply": "*", "add": "+", "subtract": "-"}[kind]
        return {"name": "calculate_math", "arguments": {"expression": f"{item['x']}{op}{item['y']}"}}

    def question(self, kind: str, lang: str, item: dict, held_out: bool) -> str:
        """A held-out wording as it is, or a training one with an opening and its case varied."""
        text = self.rng.choice((EVAL_WORDINGS if held_out else SFT_WORDINGS)[kind][lang]).format(**item)
        if held_out:
            return text
        prefix = self.rng.choice(PREFIXES[lang])
        if prefix and lang == "en" and prefix.rstrip()[-1] in ",:":
            text = text[0].lower() + text[1:]
        text = prefix + text
        roll = self.rng.random()
        return text.lower() if roll < 0.1 else text.upper() if roll < 0.13 else text

    def prompt(self, kind: str, lang: str, item: dict, held_out: bool) -> tuple[list[dict], dict, str]:
        """(system and user messages, the call that answers, the tool's reply)."""
        names = list(OFFERED)
        if self.rng.random() < 0.3:
            names.append(self.rng.choice(DISTRACTORS))
        self.rng.shuffle(names)
        question = self.question(kind, lang, item, held_out)
        system = {"role": "system", "content": self.rng.choice(SYSTEM[lang]), "tools": schemas(names)}
        call = self.call(kind, item)
        return [system, {"role": "user", "content": question}], call, TOOLS[call["name"]](**call["arguments"])

    def draw(self) -> tuple[str, str, dict]:
        kind, lang = self.rng.choice(KINDS), self.rng.choice(LANGUAGES)
        return kind, lang, self.training_item(kind)

    def sft(self) -> dict:
        kind, lang, item = self.draw()
        return self.conversation(kind, lang, item)

    def conversation(self, kind: str, lang: str, item: dict) -> dict:
        messages, call, reply = self.prompt(kind, lang, item, held_out=False)
        answer = str(json.loads(reply)["result"])
        messages += [
            {"role": "assistant", "content": "", "tool_calls": json.dumps([call], ensure_ascii=False)},
            {"role": "tool", "content": reply},
            {"role": "assistant", "content": answer},
        ]
        return {"conversations": messages, "task": kind}

    def agent_row(self, kind: str, lang: str, item: dict, held_out: bool) -> dict:
        messages, _, reply = self.prompt(kind, lang, item, held_out)
        messages.append({"role": "assistant", "content": ""})
        return {"conversations": messages, "gt": [str(json.loads(reply)["result"])], "task": kind}

    def agent_rl(self) -> dict:
        return self.agent_row(*self.draw(), held_out=False)

    def eval_rows(self) -> list[dict]:
        return [self.agent_row(kind, lang, item, held_out=True) for kind, lang, item in self.eval_items]

    def pretrain(self, render: Callable[[list[dict]], str]) -> dict:
        """A tool conversation without its system message, as pretraining text (`render`: the chat template)."""
        row = self.conversation(*self.draw())
        system, user, call, tool, answer = row["conversations"]
        calls = [{"type": "function", "function": c} for c in json.loads(call["tool_calls"])]
        return {"text": render([user, {"role": "assistant", "content": "", "tool_calls": calls}, tool, answer])}
