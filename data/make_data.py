"""Generate the small MiniMind-style sample data of this repository, deterministically from a seed.

    python data/make_data.py            # data/{pretrain,sft,eval}.jsonl, then data/tokenizer/
    python data/make_data.py --seed 7 --out_dir /tmp/d --n_pretrain 500 --n_sft 200 --n_eval 50 --no_tokenizer

The same arguments always give the same bytes. The tokenizer is trained afterwards on pretrain.jsonl and
sft.jsonl by `recipes/tokenizer.py` (run here as a subprocess).

The data is built from tasks whose answers a program can check, chosen to be learnable by a tiny model in
minutes on a CPU: facts from a fixed table (capitals of invented countries, colours of things, animal
sounds), parity of 0-99, the larger of two numbers up to 20, single-digit addition, unit conversion with a
fixed table and counting the items of a short list; each in English and Chinese.

- `pretrain.jsonl` (`{"text": ...}`): short texts stating these facts in plain sentences, so that a
  pretrained model already "knows" them; it covers every fact and number pair.
- `sft.jsonl` (`{"conversations": [...]}`): single and multi-turn question/answer chats, some with a system
  message; the assistant answers with the bare word or number. Some number pairs are kept out of SFT.
- `eval.jsonl`: held out (no user question of it appears in sft.jsonl), same format plus `task` (the task
  name), `answer` (the expected string, equal to the last assistant message) and `held_out` ("template": a
  question wording never used in SFT, or "item": a number pair SFT never asked about).

Scoring rule: prompt the model with every message but the last (with the generation prompt), decode its
reply up to `<|im_end|>`, strip surrounding whitespace, and count an exact string match with `answer`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COUNTRIES = [  # (en country, en capital, zh country, zh capital), all invented
    ("Valdoria", "Mirenburg", "瓦尔多利亚", "米伦堡"),
    ("Kestrand", "Olvik", "凯斯特兰", "奥尔维克"),
    ("Zorvania", "Tilsen", "佐尔瓦尼亚", "蒂尔森"),
    ("Brelund", "Hask", "布雷伦德", "哈斯克"),
    ("Quorin", "Dalmere", "阔林", "达尔米尔"),
    ("Ostravia", "Penkel", "奥斯特拉维亚", "彭克尔"),
    ("Lumeria", "Solvend", "卢梅利亚", "索尔文德"),
    ("Tarkesh", "Irrun", "塔尔克什", "伊伦"),
    ("Gelmark", "Vossa", "格尔马克", "沃萨"),
    ("Amberland", "Corvel", "琥珀兰", "科尔维尔"),
    ("Nesvia", "Brakka", "涅斯维亚", "布拉卡"),
    ("Drovenia", "Halt", "德罗维尼亚", "哈尔特"),
    ("Ithria", "Mossgate", "伊瑟里亚", "莫斯盖特"),
    ("Fennmoor", "Quill", "芬穆尔", "奎尔"),
    ("Sarnel", "Ovari", "萨尔内尔", "奥瓦里"),
    ("Ulvaro", "Dessin", "乌尔瓦罗", "德辛"),
]
COLOURS = [  # (en thing, en colour, zh thing, zh colour)
    ("a banana", "yellow", "香蕉", "黄色"),
    ("grass", "green", "草", "绿色"),
    ("snow", "white", "雪", "白色"),
    ("coal", "black", "煤", "黑色"),
    ("the sky", "blue", "天空", "蓝色"),
    ("a tomato", "red", "西红柿", "红色"),
    ("an orange", "orange", "橙子", "橙色"),
    ("a carrot", "orange", "胡萝卜", "橙色"),
    ("milk", "white", "牛奶", "白色"),
    ("a lemon", "yellow", "柠檬", "黄色"),
    ("a strawberry", "red", "草莓", "红色"),
    ("an eggplant", "purple", "茄子", "紫色"),
    ("chocolate", "brown", "巧克力", "棕色"),
    ("a crow", "black", "乌鸦", "黑色"),
    ("a leaf", "green", "树叶", "绿色"),
    ("the sea", "blue", "大海", "蓝色"),
]
SOUNDS = [  # (en animal, en sound, zh animal, zh sound)
    ("a dog", "woof", "狗", "汪汪"),
    ("a cat", "meow", "猫", "喵喵"),
    ("a cow", "moo", "牛", "哞哞"),
    ("a duck", "quack", "鸭子", "嘎嘎"),
    ("a sheep", "baa", "羊", "咩咩"),
    ("a frog", "ribbit", "青蛙", "呱呱"),
    ("a mouse", "squeak", "老鼠", "吱吱"),
    ("a chicken", "cluck", "鸡", "咯咯"),
    ("an owl", "hoot", "猫头鹰", "咕咕"),
    ("a snake", "hiss", "蛇", "嘶嘶"),
]
UNITS = [  # (en from, en to, zh from, zh to, factor)
    ("kilometres", "metres", "千米", "米", 1000),
    ("metres", "centimetres", "米", "厘米", 100),
    ("kilograms", "grams", "千克", "克", 1000),
    ("hours", "minutes", "小时", "分钟", 60),
]
FRUITS = {
    "en": ["apple", "pear", "plum", "grape", "peach", "cherry", "lemon", "melon", "mango", "kiwi"],
    "zh": ["苹果", "梨", "李子", "葡萄", "桃子", "樱桃", "柠檬", "西瓜", "芒果", "猕猴桃"],
}
SYSTEM_PROMPTS = {
    "en": ["You are a helpful assistant.", "You are MiniMind, a small AI.", "Answer with one word or number."],
    "zh": ["你是一个乐于助人的助手。", "你是MiniMind，一个小巧的人工智能。", "请用一个词或一个数字回答。"],
}

# Per task and language: (statements for pretraining, SFT question templates, eval-only question templates).
# Fields: {x} the subject, {y} a second number, {u}/{v} unit names, {T} the subject capitalised.
TEMPLATES = {
    "capital": {
        "en": (
            ["The capital of {x} is {a}.", "{a} is the capital of {x}.", "{x}'s capital city is {a}."],
            ["What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital of {x}."],
            ["Tell me the capital city of {x}.", "{x} has its capital in which city?"],
        ),
        "zh": (
            ["{x}的首都是{a}。", "{a}是{x}的首都。", "{x}的首都叫{a}。"],
            ["{x}的首都是哪里？", "{x}的首都是哪座城市？", "请说出{x}的首都。"],
            ["告诉我{x}的首都。", "哪座城市是{x}的首都？"],
        ),
    },
    "colour": {
        "en": (
            ["{T} is {a}.", "The colour of {x} is {a}."],
            ["What colour is {x}?", "What is the colour of {x}?", "Which colour does {x} have?"],
            ["Tell me the colour of {x}.", "{T} is usually what colour?"],
        ),
        "zh": (
            ["{x}是{a}的。", "{x}的颜色是{a}。"],
            ["{x}是什么颜色的？", "{x}的颜色是什么？", "请说出{x}的颜色。"],
            ["告诉我{x}的颜色。", "{x}通常是什么颜色？"],
        ),
    },
    "sound": {
        "en": (
            ["{T} says {a}.", "The sound {x} makes is {a}."],
            ["What sound does {x} make?", "What does {x} say?", "Which sound does {x} make?"],
            ["Tell me the sound {x} makes.", "{T} goes what?"],
        ),
        "zh": (
            ["{x}的叫声是{a}。", "{x}会{a}地叫。"],
            ["{x}怎么叫？", "{x}的叫声是什么？", "{x}发出什么声音？"],
            ["告诉我{x}的叫声。", "{x}会发出怎样的叫声？"],
        ),
    },
    "parity": {
        "en": (
            ["{x} is {a}.", "The number {x} is {a}."],
            ["Is {x} odd or even?", "Is {x} an odd or an even number?", "Odd or even: {x}?"],
            ["Tell me whether {x} is odd or even.", "{x}: even or odd?"],
        ),
        "zh": (
            ["{x}是{a}。", "数字{x}是{a}。"],
            ["{x}是奇数还是偶数？", "判断{x}是奇数还是偶数。", "{x}是偶数还是奇数？"],
            ["请告诉我{x}是奇数还是偶数。", "{x}这个数是奇数还是偶数？"],
        ),
    },
    "compare": {
        "en": (
            ["{a} is larger than {b}.", "Of {x} and {y}, the larger is {a}."],
            [
                "Which is larger, {x} or {y}?",
                "Which number is bigger: {x} or {y}?",
                "What is the larger of {x} and {y}?",
            ],
            ["Tell me which is greater, {x} or {y}.", "Between {x} and {y}, which is larger?"],
        ),
        "zh": (
            ["{a}比{b}大。", "{x}和{y}中较大的是{a}。"],
            ["{x}和{y}哪个大？", "{x}和{y}中哪个数更大？", "比较{x}和{y}，哪个更大？"],
            ["请告诉我{x}和{y}哪个更大。", "{x}与{y}相比，哪个大？"],
        ),
    },
    "add": {
        "en": (
            ["{x} plus {y} is {a}.", "{x} + {y} = {a}."],
            ["What is {x} plus {y}?", "What is {x} + {y}?", "Add {x} and {y}."],
            ["Tell me the sum of {x} and {y}.", "{x} + {y} equals what?"],
        ),
        "zh": (
            ["{x}加{y}等于{a}。", "{x}+{y}={a}。"],
            ["{x}加{y}等于多少？", "{x}+{y}等于几？", "计算{x}加{y}。"],
            ["请告诉我{x}与{y}的和。", "{x}加上{y}是多少？"],
        ),
    },
    "convert": {
        "en": (
            ["{x} {u} is {a} {v}.", "There are {a} {v} in {x} {u}."],
            ["How many {v} are in {x} {u}?", "Convert {x} {u} to {v}.", "{x} {u} is how many {v}?"],
            ["Tell me how many {v} make {x} {u}.", "What is {x} {u} in {v}?"],
        ),
        "zh": (
            ["{x}{u}等于{a}{v}。", "{x}{u}是{a}{v}。"],
            ["{x}{u}等于多少{v}？", "把{x}{u}换算成{v}。", "{x}{u}是多少{v}？"],
            ["请告诉我{x}{u}有多少{v}。", "{x}{u}换算成{v}是多少？"],
        ),
    },
    "count": {
        "en": (
            ["The list {x} has {a} items.", "There are {a} items in: {x}."],
            ["How many items are in this list: {x}?", "Count the words: {x}.", "How many fruits are listed: {x}?"],
            ["Tell me how many things this list has: {x}.", "{x}: how many items is that?"],
        ),
        "zh": (
            ["列表{x}共有{a}项。", "{x}，一共是{a}个。"],
            ["这个列表里有几项：{x}？", "数一数有几个词：{x}。", "这里列出了几种水果：{x}？"],
            ["请告诉我这个列表有几项：{x}。", "{x}，一共有几个？"],
        ),
    },
}
PARITY = {"en": ("even", "odd"), "zh": ("偶数", "奇数")}
TASKS = list(TEMPLATES)
LANGUAGES = ["en", "zh"]
NUMBER_TASKS = ["parity", "compare", "add", "convert"]


def all_items(task: str, lang: str) -> list[dict]:
    """Every question of a task as template fields, with `a` the answer (count lists are drawn instead)."""
    en = lang == "en"
    if task in ("capital", "colour", "sound"):
        table = {"capital": COUNTRIES, "colour": COLOURS, "sound": SOUNDS}[task]
        return [{"x": row[0] if en else row[2], "a": row[1] if en else row[3]} for row in table]
    if task == "parity":
        return [{"x": n, "a": PARITY[lang][n % 2]} for n in range(100)]
    if task == "compare":
        pairs = [(x, y) for x in range(21) for y in range(21) if x != y]
        return [{"x": x, "y": y, "a": max(x, y), "b": min(x, y)} for x, y in pairs]
    if task == "add":
        return [{"x": x, "y": y, "a": x + y} for x in range(10) for y in range(10)]
    if task == "convert":
        return [
            {"x": n, "u": u_en if en else u_zh, "v": v_en if en else v_zh, "a": n * factor}
            for u_en, v_en, u_zh, v_zh, factor in UNITS
            for n in range(2, 10)
        ]
    raise ValueError(task)


def count_item(rng: random.Random, lang: str) -> dict:
    words = rng.sample(FRUITS[lang], rng.randint(2, 6))
    return {"x": (", " if lang == "en" else "、").join(words), "a": len(words)}


def fill(template: str, item: dict) -> str:
    return template.format(T=str(item["x"])[:1].upper() + str(item["x"])[1:], **item)


class Generator:
    """Draws pretraining texts, SFT chats and eval rows from one seeded random stream."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.items = {(t, lang): all_items(t, lang) for t in TASKS if t != "count" for lang in LANGUAGES}
        # A tenth of the number questions stay out of SFT (pretraining still states them) for eval; the
        # item lists of both languages are parallel, so the same ones are held out in both.
        self.reserved = {
            t: self.rng.sample(range(len(self.items[t, "en"])), len(self.items[t, "en"]) // 10) for t in NUMBER_TASKS
        }

    def item(self, task: str, lang: str, reserved: bool = False) -> dict:
        if task == "count":
            return count_item(self.rng, lang)
        items, held = self.items[task, lang], self.reserved.get(task, [])
        if reserved:
            return items[self.rng.choice(held)]
        return items[self.rng.choice([i for i in range(len(items)) if i not in held])]

    def statement(self, task: str, lang: str) -> str:
        item = count_item(self.rng, lang) if task == "count" else self.rng.choice(self.items[task, lang])
        return fill(self.rng.choice(TEMPLATES[task][lang][0]), item)

    def pretrain(self) -> dict:
        lang = self.rng.choice(LANGUAGES)
        sentences = [self.statement(self.rng.choice(TASKS), lang) for _ in range(self.rng.randint(1, 4))]
        return {"text": (" " if lang == "en" else "").join(sentences)}

    def turn(self, task: str, lang: str, templates: int, reserved: bool = False) -> list[dict]:
        item = self.item(task, lang, reserved)
        question = fill(self.rng.choice(TEMPLATES[task][lang][templates]), item)
        return [{"role": "user", "content": question}, {"role": "assistant", "content": str(item["a"])}]

    def system(self, lang: str, probability: float) -> list[dict]:
        if self.rng.random() >= probability:
            return []
        return [{"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS[lang])}]

    def sft(self) -> dict:
        lang = self.rng.choice(LANGUAGES)
        turns = self.rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
        messages = self.system(lang, 0.3)
        for _ in range(turns):
            messages += self.turn(self.rng.choice(TASKS), lang, templates=1)
        return {"conversations": messages}

    def eval(self, task: str, lang: str) -> dict:
        # Held out by construction: a question wording SFT never uses, or an item SFT never asks about.
        by_item = task in NUMBER_TASKS and self.rng.random() < 0.3
        messages = self.system(lang, 0.2)
        if self.rng.random() < 0.1:
            messages += self.turn(self.rng.choice(TASKS), lang, templates=1)
        messages += self.turn(task, lang, templates=1 if by_item else 2, reserved=by_item)
        answer = messages[-1]["content"]
        return {
            "conversations": messages,
            "task": task,
            "answer": answer,
            "held_out": "item" if by_item else "template",
        }


def write_jsonl(path: Path, row: Callable[[], dict], n: int) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row(), ensure_ascii=False) + "\n" for _ in range(n))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out_dir", type=Path, default=REPO / "data")
    parser.add_argument("--n_pretrain", type=int, default=20_000)
    parser.add_argument("--n_sft", type=int, default=10_000)
    parser.add_argument("--n_eval", type=int, default=320, help="rounded down to a multiple of 16 (tasks x 2)")
    parser.add_argument("--no_tokenizer", action="store_true", help="skip training data/tokenizer")
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    generator = Generator(args.seed)
    write_jsonl(args.out_dir / "pretrain.jsonl", generator.pretrain, args.n_pretrain)
    write_jsonl(args.out_dir / "sft.jsonl", generator.sft, args.n_sft)
    plan = iter([(t, lang) for _ in range(args.n_eval // 16) for t in TASKS for lang in LANGUAGES])
    write_jsonl(args.out_dir / "eval.jsonl", lambda: generator.eval(*next(plan)), args.n_eval // 16 * 16)
    if not args.no_tokenizer:
        corpora = [str(args.out_dir / "pretrain.jsonl"), str(args.out_dir / "sft.jsonl")]
        command = [sys.executable, str(REPO / "recipes/tokenizer.py"), "--config", str(REPO / "recipes/tokenizer.yaml")]
        command += ["--files", *corpora, "--output_dir", str(args.out_dir / "tokenizer")]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
