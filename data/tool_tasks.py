"""The demo's tool tasks: questions whose answers only a tool can give, in MiniMind-3's t2t and agent formats.

`data/make_data.py` writes them (this module only draws rows):

- `tool_sft.jsonl`: t2t SFT rows. The system message carries the tool schemas (a JSON string, as the original's
  `sft_t2t` rows), the user asks, the assistant calls one tool (`tool_calls`), the tool's reply follows (`tool`,
  written by the registry's own tool, so it is byte for byte what a rollout or an evaluation gets back) and the
  assistant answers with the bare value.
- `agent_rl.jsonl`: the original's agent RL rows (the last assistant turn empty, `gt` the expected answers), for
  the agent stage: the same tasks and wordings as the SFT rows, other draws.
- `eval_agent.jsonl`: agent rows held out by construction: question wordings nothing else uses (`EVAL_WORDINGS`)
  and items (number pairs, values) no other file asks about.
- `pretrain_recall.jsonl`: pretraining texts that say a number (or an expression) and then say it again
  (`RECALL`). Using a tool means copying digits: from the question into the call, from the tool's reply into the
  answer. A 4-layer model learns to copy (attention that finds the earlier occurrence and reads on) only after a
  few hundred steps of text where copying is the only way to predict; measured on this model, 0.8M tokens of such
  text took digit-copy accuracy from 10% to 74%, while 600 tool rows trained 5 epochs left it near 15%. Texts in
  fixed sentence pairs taught copying in those pairs only (100% there, 10% in another wording), so unrelated
  sentences go between the two mentions. The demo pretrains on these beside data/pretrain.jsonl, and SFT teaches
  the tool format on top.

The tasks are multiplication of two 2-digit numbers, addition and subtraction of 3-digit numbers (through
`calculate_math`) and unit conversion of a value 2-99 (through `unit_converter`, whose factors like 0.621371 a
small model cannot hold). Each row offers both tools, in a drawn order, sometimes with a third that does not
help (the weather or an exchange rate), so the model must choose the tool and copy the arguments from the
question, then copy the value from the tool's reply.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from minimind_hf.agent_tools import TOOLS

KINDS = ["multiply", "add", "subtract", "convert"]
LANGUAGES = ["en", "zh"]
UNITS = [  # (from code, to code, en from, en to, zh from, zh to): unit_converter's codes and their names
    ("km", "miles", "kilometres", "miles", "公里", "英里"),
    ("miles", "km", "miles", "kilometres", "英里", "公里"),
    ("kg", "pounds", "kilograms", "pounds", "千克", "磅"),
    ("pounds", "kg", "pounds", "kilograms", "磅", "千克"),
    ("meters", "feet", "metres", "feet", "米", "英尺"),
    ("feet", "meters", "feet", "metres", "英尺", "米"),
]
DISTRACTORS = ["get_current_weather", "get_exchange_rate"]
SYSTEM = {
    "en": ["You are a helpful assistant.", "You are MiniMind. Use the tools when they help.", "Answer briefly."],
    "zh": ["你是一个乐于助人的助手。", "你是MiniMind，需要时使用工具。", "请简短回答。"],
}
# {x} {y}: the numbers; {u} {v}: the unit names (from, to).
SFT_WORDINGS = {
    "multiply": {
        "en": ["What is {x} times {y}?", "What is {x} * {y}?", "Multiply {x} by {y}.", "Calculate {x} x {y}.",
               "What do you get when you multiply {x} and {y}?", "How much is {x} times {y}?",
               "What is the product of {x} and {y}?", "{x} * {y} = ?"],
        "zh": ["{x}乘以{y}等于多少？", "{x}*{y}是多少？", "计算{x}乘{y}。", "{x}和{y}的积是多少？", "{x}乘{y}得几？",
               "请算一下{x}×{y}。"],
    },
    "add": {
        "en": ["What is {x} plus {y}?", "What is {x} + {y}?", "Add {x} and {y}.", "Calculate {x} + {y}.",
               "What is the sum of {x} and {y}?", "How much is {x} plus {y}?", "{x} + {y} = ?"],
        "zh": ["{x}加{y}等于多少？", "{x}+{y}是多少？", "计算{x}加{y}。", "{x}与{y}的和是多少？", "请算一下{x}+{y}。"],
    },
    "subtract": {
        "en": ["What is {x} minus {y}?", "What is {x} - {y}?", "Subtract {y} from {x}.", "Calculate {x} - {y}.",
               "How much is {x} minus {y}?", "What is the difference of {x} and {y}?", "{x} - {y} = ?"],
        "zh": ["{x}减{y}等于多少？", "{x}-{y}是多少？", "计算{x}减{y}。", "{x}减去{y}是多少？", "请算一下{x}-{y}。"],
    },
    "convert": {
        "en": ["How many {v} is {x} {u}?", "Convert {x} {u} to {v}.", "What does {x} {u} come to in {v}?",
               "{x} {u} is how many {v}?", "Change {x} {u} into {v}.", "How much is {x} {u} in {v}?"],
        "zh": ["{x}{u}是多少{v}？", "把{x}{u}换算成{v}。", "{x}{u}等于多少{v}？", "{x}{u}合多少{v}？",
               "请把{x}{u}转换为{v}。"],
    },
}  # fmt: skip
EVAL_WORDINGS = {  # held out: no training row is worded so (the operation's word is one training uses)
    "multiply": {"en": ["Tell me {x} times {y}.", "Please work out the product of {x} and {y}."],
                 "zh": ["告诉我{x}乘{y}的值。", "帮我算出{x}和{y}的积。"]},
    "add": {"en": ["Tell me {x} plus {y}.", "Please work out the sum of {x} and {y}."],
            "zh": ["告诉我{x}加{y}的值。", "帮我算出{x}与{y}的和。"]},
    "subtract": {"en": ["Tell me {x} minus {y}.", "Please work out {x} - {y}."],
                 "zh": ["告诉我{x}减{y}的值。", "帮我算出{x}减去{y}。"]},
    "convert": {"en": ["Tell me {x} {u} in {v}.", "Please work out how many {v} are in {x} {u}."],
                "zh": ["告诉我{x}{u}换成{v}的值。", "帮我算出{x}{u}是多少{v}。"]},
}  # fmt: skip

# (a first mention, a later one), with 0-2 unrelated sentences between; {a} {b}: numbers, {e}: an expression
RECALL = {
    "en": [("The code is {a}.", "Once more, the code is {a}."),
           ("Write down {a} and {b}.", "Did you write {a} and {b}?"),
           ("Ticket {a} is ready.", "Ticket {a}, please come to the desk."),
           ("I read {e} on the board.", "So I wrote {e} in my notebook."),
           ("The answer was {a}.", "She said it again: {a}."),
           ("Room {a}?", "Yes, room {a}."), ("The tool said {a}.", "So the result is {a}."),
           ("First {a}, then {b}.", "Again: {a}, then {b}."), ("We need {e}.", "Right, {e}.")],
    "zh": [("号码是{a}。", "再说一遍，号码是{a}。"), ("记下{a}和{b}。", "你记下{a}和{b}了吗？"),
           ("黑板上写着{e}。", "我在本子上也写了{e}。"), ("答案是{a}。", "他又说了一遍：{a}。"),
           ("工具返回了{a}。", "所以结果是{a}。"), ("先是{a}，然后是{b}。", "再说一次：{a}，然后是{b}。")],
}  # fmt: skip


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
    """Draws tool rows from one seeded stream; the eval items are drawn first and never asked in training rows.

    `vary(rng, template, item, lang)` words a training question as people type it (make_data's `vary`)."""

    def __init__(self, seed: int, n_eval: int, vary: Callable[[random.Random, str, dict, str], str]):
        self.rng = random.Random(seed)
        self.vary = vary
        plan = [(kind, lang) for _ in range(n_eval // 8) for kind in KINDS for lang in LANGUAGES]
        self.eval_items = [(kind, lang, self.item(kind)) for kind, lang in plan]
        self.held_out = {self.key(kind, item) for kind, _, item in self.eval_items}

    def item(self, kind: str) -> dict:
        rng = self.rng
        if kind == "multiply":
            return {"x": rng.randint(12, 99), "y": rng.randint(12, 99)}
        if kind == "add":
            return {"x": rng.randint(100, 999), "y": rng.randint(100, 999)}
        if kind == "subtract":
            x = rng.randint(200, 999)
            return {"x": x, "y": rng.randint(100, x - 1)}
        return {"x": rng.randint(2, 99), "unit": rng.randrange(len(UNITS))}

    @staticmethod
    def key(kind: str, item: dict) -> tuple:
        if kind in ("multiply", "add"):  # either order asks the same
            return (kind, *sorted((item["x"], item["y"])))
        return (kind, item["x"], item.get("y", item.get("unit")))

    def training_item(self, kind: str) -> dict:
        while True:
            item = self.item(kind)
            if self.key(kind, item) not in self.held_out:
                return item

    @staticmethod
    def call(kind: str, item: dict) -> dict:
        if kind == "convert":
            code_from, code_to = UNITS[item["unit"]][:2]
            return {"name": "unit_converter", "arguments": {"value": item["x"], "from_unit": code_from,
                                                            "to_unit": code_to}}  # fmt: skip
        op = {"multiply": "*", "add": "+", "subtract": "-"}[kind]
        return {"name": "calculate_math", "arguments": {"expression": f"{item['x']}{op}{item['y']}"}}

    def fields(self, kind: str, item: dict, lang: str) -> dict:
        fields = {"x": item["x"], "y": item.get("y")}
        if kind == "convert":
            names = UNITS[item["unit"]][2:4] if lang == "en" else UNITS[item["unit"]][4:6]
            fields.update(u=names[0], v=names[1])
        return fields

    def prompt(self, kind: str, lang: str, item: dict, held_out: bool) -> tuple[list[dict], dict, str]:
        """(system and user messages, the call that answers, the tool's reply)."""
        needed = "unit_converter" if kind == "convert" else "calculate_math"
        names = ["calculate_math", "unit_converter"]
        if self.rng.random() < 0.3:
            names.append(self.rng.choice(DISTRACTORS))
        self.rng.shuffle(names)
        template = self.rng.choice((EVAL_WORDINGS if held_out else SFT_WORDINGS)[kind][lang])
        fields = self.fields(kind, item, lang)
        question = template.format(**fields) if held_out else self.vary(self.rng, template, fields, lang)
        system = {"role": "system", "content": self.rng.choice(SYSTEM[lang]), "tools": schemas(names)}
        call = self.call(kind, item)
        assert call["name"] == needed
        return [system, {"role": "user", "content": question}], call, TOOLS[call["name"]](**call["arguments"])

    def draw(self) -> tuple[str, str, dict]:
        kind, lang = self.rng.choice(KINDS), self.rng.choice(LANGUAGES)
        return kind, lang, self.training_item(kind)

    def sft(self) -> dict:
        kind, lang, item = self.draw()
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

    def number(self) -> str:
        """A number as tool tasks show them: 2 to 5 digits, or a value with decimals like unit_converter's."""
        if self.rng.random() < 0.3:
            return str(round(self.rng.uniform(0.1, 999), self.rng.randint(1, 4)))
        return str(self.rng.randint(10, 99_999))

    def recall(self, filler: Callable[[str], str]) -> dict:
        """A pretraining text that says a number or an expression twice (`RECALL`), with 0-2 sentences of
        `filler(lang)` between: the distance varies, so only finding the earlier mention predicts the digits."""
        lang = self.rng.choice(LANGUAGES)
        op = self.rng.choice("*+-")
        fields = {
            "a": self.number(),
            "b": self.number(),
            "e": f"{self.rng.randint(10, 999)}{op}{self.rng.randint(10, 999)}",
        }
        first, again = self.rng.choice(RECALL[lang])
        between = [filler(lang) for _ in range(self.rng.choice([0, 1, 1, 2]))]
        return {"text": (" " if lang == "en" else "").join([first, *between, again]).format(**fields)}

    def eval_rows(self) -> list[dict]:
        return [self.agent_row(kind, lang, item, held_out=True) for kind, lang, item in self.eval_items]
