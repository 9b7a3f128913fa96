"""Generate the small MiniMind-style sample data of this repository, deterministically from a seed.

    python data/make_data.py            # data/{pretrain,sft,eval,dpo,reason,grpo}.jsonl, then data/tokenizer/
    python data/make_data.py --seed 7 --out_dir /tmp/d --n_pretrain 500 --n_sft 200 --n_eval 48 --no_tokenizer

The same arguments always give the same bytes. The tokenizer is trained afterwards on pretrain.jsonl and
sft.jsonl (byte-level BPE as `recipes/tokenizer.py`, with every digit its own token).

The data is built from tasks whose answers a program can check, chosen to be learnable by a tiny model in
minutes on a CPU: facts from a fixed table (capitals of invented countries, colours of things, animal
sounds), parity of 0-99, the larger of two numbers up to 20, single-digit addition, unit conversion with a
fixed table and counting the items of a short list; each in English and Chinese.

- `pretrain.jsonl` (`{"text": ...}`): short texts stating these facts in plain sentences.
- `sft.jsonl` (`{"conversations": [...], "task": ...}`, `task` naming the last question's task): single and
  multi-turn question/answer chats, some with a system message; the assistant answers with the bare word or
  number. The questions are composed from many wordings per task (`SFT_QUESTIONS`), wrapped in varied
  openings, closings and surrounding sentences (`WRAPPERS`), with case and punctuation varied, so that a model
  learns the tasks rather than the sentences.
- `eval.jsonl`: held out by construction, same format plus `answer` (the expected string, equal to the last
  assistant message) and `held_out`: "template" (a question wording of `EVAL_QUESTIONS`, which nothing else
  uses) or "item" (a number question of `HELD_OUT` items, which no other file states or asks, in any order).
- `dpo.jsonl` (`{"chosen": [...], "rejected": [...]}`): the same SFT question answered right and with a
  plausible wrong answer (the other parity, a nearby number, another country's capital, ...).
- `reason.jsonl`: SFT conversations for the number tasks whose replies show short steps,
  `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`, plus `task`.
- `grpo.jsonl`: prompts with checkable answers for RL, in the eval format (`conversations`, `task`,
  `answer`), SFT wordings and items only.
- `lora_identity.jsonl` (SFT format): the model's name and maker (MiniMind's `lora_identity`, in small), with
  the first SFT conversations rehearsed beside them, for the LoRA stage; `identity_eval.jsonl` asks the identity
  in wordings the training file never uses (eval format).

Scoring rule: prompt the model with every message but the last (with the generation prompt), decode its
reply up to `<|im_end|>`, strip surrounding whitespace, and count an exact string match with `answer`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "data")]  # minimind_hf and tool_tasks, when run as a script from a checkout

from tool_tasks import ToolTasks  # noqa: E402  (data/, this script's folder)

# MiniMind-3's think and tool tags: single added tokens in its tokenizer, so that the template's markers never merge
# with text (the demo's MiniMind-3 tokenizer has them after MiniMind2's three).
MINIMIND3_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

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
LIST_WORDS = {  # what the count task lists
    "en": "apple pear plum grape peach cherry lemon melon mango kiwi dog cat bird fish horse red blue green "
    "chair table book pen cup lamp".split(),
    "zh": "苹果 梨 李子 葡萄 桃子 樱桃 柠檬 西瓜 芒果 猕猴桃 狗 猫 鸟 鱼 马 红色 蓝色 绿色 "
    "椅子 桌子 书 笔 杯子 台灯".split(),
}
SYSTEM_PROMPTS = {
    "en": [
        "You are a helpful assistant.",
        "You are MiniMind, a small AI.",
        "Answer with one word or number.",
        "You are a friendly assistant. Keep answers short.",
        "Reply with just the answer.",
        "You are a quiz bot.",
    ],
    "zh": [
        "你是一个乐于助人的助手。",
        "你是MiniMind，一个小巧的人工智能。",
        "请用一个词或一个数字回答。",
        "你是一个友好的助手，回答要简短。",
        "只回答答案。",
        "你是一个问答机器人。",
    ],
}

# Per task and language: statements for pretraining. Fields: {x} the subject, {y} a second number, {u}/{v}
# unit names, {a} the answer ({b} the smaller number), {T} the subject capitalised.
STATEMENTS = {
    "capital": {
        "en": ["The capital of {x} is {a}.", "{a} is the capital of {x}.", "{x}'s capital city is {a}."],
        "zh": ["{x}的首都是{a}。", "{a}是{x}的首都。", "{x}的首都叫{a}。"],
    },
    "colour": {"en": ["{T} is {a}.", "The colour of {x} is {a}."], "zh": ["{x}是{a}的。", "{x}的颜色是{a}。"]},
    "sound": {"en": ["{T} says {a}.", "The sound {x} makes is {a}."], "zh": ["{x}的叫声是{a}。", "{x}会{a}地叫。"]},
    "parity": {"en": ["{x} is {a}.", "The number {x} is {a}."], "zh": ["{x}是{a}。", "数字{x}是{a}。"]},
    "compare": {
        "en": ["{a} is larger than {b}.", "Of {x} and {y}, the larger is {a}."],
        "zh": ["{a}比{b}大。", "{x}和{y}中较大的是{a}。"],
    },
    "add": {"en": ["{x} plus {y} is {a}.", "{x} + {y} = {a}."], "zh": ["{x}加{y}等于{a}。", "{x}+{y}={a}。"]},
    "convert": {
        "en": ["{x} {u} is {a} {v}.", "There are {a} {v} in {x} {u}."],
        "zh": ["{x}{u}等于{a}{v}。", "{x}{u}是{a}{v}。"],
    },
    "count": {
        "en": ["The list {x} has {a} items.", "There are {a} items in: {x}."],
        "zh": ["列表{x}共有{a}项。", "{x}，一共是{a}个。"],
    },
}
# The question wordings SFT (and DPO, reasoning, GRPO) use.
SFT_QUESTIONS = {
    "capital": {
        "en": [
            "What is the capital of {x}?",
            "Which city is the capital of {x}?",
            "Name the capital of {x}.",
            "What's the capital of {x}?",
            "What city is {x}'s capital?",
            "Do you know the capital of {x}?",
            "Which city serves as the capital of {x}?",
            "Capital of {x}?",
            "{x}: what is its capital?",
            "Can you name the capital city of {x}?",
            "I need the capital of {x}.",
            "Where is the capital of {x}? Name the city.",
            "In {x}, which city is the capital?",
            "What do they call the capital of {x}?",
        ],
        "zh": [
            "{x}的首都是哪里？",
            "{x}的首都是哪座城市？",
            "请说出{x}的首都。",
            "{x}的首都是什么？",
            "{x}首都？",
            "你知道{x}的首都吗？",
            "{x}的首都叫什么名字？",
            "{x}以哪座城市为首都？",
            "说一下{x}的首都是哪个城市。",
            "{x}这个国家的首都在哪？",
            "能告诉我{x}的首都是哪里吗？",
            "哪个城市是{x}的首都呢？",
        ],
    },
    "colour": {
        "en": [
            "What colour is {x}?",
            "What is the colour of {x}?",
            "Which colour does {x} have?",
            "What color is {x}?",
            "Do you know what colour {x} is?",
            "Colour of {x}?",
            "What's the color of {x}?",
            "Name the colour of {x}.",
            "{T}: which colour is it?",
            "Which color is {x}?",
            "Can you say what colour {x} is?",
            "If you look at {x}, what colour do you see?",
        ],
        "zh": [
            "{x}是什么颜色的？",
            "{x}的颜色是什么？",
            "请说出{x}的颜色。",
            "{x}是什么颜色？",
            "你知道{x}是什么颜色吗？",
            "{x}的颜色？",
            "{x}一般是什么颜色的？",
            "说说{x}的颜色。",
            "{x}是哪种颜色？",
            "能说一下{x}是什么颜色吗？",
            "看看{x}，它是什么颜色？",
        ],
    },
    "sound": {
        "en": [
            "What sound does {x} make?",
            "What does {x} say?",
            "Which sound does {x} make?",
            "What noise does {x} make?",
            "How does {x} sound?",
            "Do you know what sound {x} makes?",
            "What is the sound of {x}?",
            "Sound of {x}?",
            "What do you hear when {x} makes a noise?",
            "Name the sound {x} makes.",
            "{T}: what sound does it make?",
            "Can you tell what {x} says?",
        ],
        "zh": [
            "{x}怎么叫？",
            "{x}的叫声是什么？",
            "{x}发出什么声音？",
            "{x}是怎么叫的？",
            "你知道{x}怎么叫吗？",
            "{x}的叫声？",
            "{x}叫起来是什么声音？",
            "说说{x}的叫声。",
            "{x}会发出什么叫声？",
            "能学一下{x}的叫声吗？",
            "听，{x}在叫，它是怎么叫的？",
        ],
    },
    "parity": {
        "en": [
            "Is {x} odd or even?",
            "Is {x} an odd or an even number?",
            "Odd or even: {x}?",
            "Is the number {x} even or odd?",
            "Would you say {x} is odd or even?",
            "Parity of {x}?",
            "{x} is odd or even?",
            "Is {x} even or is it odd?",
            "Decide whether {x} is odd or even.",
            "What is the parity of {x}, odd or even?",
            "Can you check if {x} is even or odd?",
            "Say whether the number {x} is odd or even.",
        ],
        "zh": [
            "{x}是奇数还是偶数？",
            "判断{x}是奇数还是偶数。",
            "{x}是偶数还是奇数？",
            "数字{x}是奇数还是偶数？",
            "{x}是单数还是双数？",
            "你知道{x}是奇数还是偶数吗？",
            "{x}的奇偶性是什么？",
            "请判断数字{x}的奇偶。",
            "{x}，奇数还是偶数？",
            "说说{x}是奇数还是偶数。",
            "能判断一下{x}是偶数还是奇数吗？",
        ],
    },
    "compare": {
        "en": [
            "Which is larger, {x} or {y}?",
            "Which number is bigger: {x} or {y}?",
            "What is the larger of {x} and {y}?",
            "Which is bigger, {x} or {y}?",
            "Which is greater: {x} or {y}?",
            "Of {x} and {y}, which one is larger?",
            "Pick the bigger number: {x}, {y}.",
            "Larger of {x} and {y}?",
            "Compare {x} and {y}. Which is larger?",
            "Which one is more, {x} or {y}?",
            "Is {x} or {y} the bigger number?",
            "What's the maximum of {x} and {y}?",
        ],
        "zh": [
            "{x}和{y}哪个大？",
            "{x}和{y}中哪个数更大？",
            "比较{x}和{y}，哪个更大？",
            "{x}和{y}比，哪个大？",
            "{x}与{y}中较大的是哪个？",
            "在{x}和{y}之间，哪个数大？",
            "{x}、{y}哪个更大？",
            "你知道{x}和{y}哪个大吗？",
            "找出{x}和{y}中较大的数。",
            "{x}和{y}，谁更大？",
            "{x}跟{y}相比哪个更大？",
        ],
    },
    "add": {
        "en": [
            "What is {x} plus {y}?",
            "What is {x} + {y}?",
            "Add {x} and {y}.",
            "What's {x} plus {y}?",
            "{x} + {y} = ?",
            "What do you get when you add {x} and {y}?",
            "How much is {x} plus {y}?",
            "Calculate {x} + {y}.",
            "What is the sum of {x} and {y}?",
            "Compute {x} plus {y}.",
            "If I add {y} to {x}, what do I get?",
            "Sum of {x} and {y}?",
        ],
        "zh": [
            "{x}加{y}等于多少？",
            "{x}+{y}等于几？",
            "计算{x}加{y}。",
            "{x}加{y}是多少？",
            "{x}+{y}=？",
            "{x}和{y}相加等于多少？",
            "{x}加{y}得几？",
            "请算一下{x}+{y}。",
            "{x}与{y}的和是多少？",
            "把{x}和{y}加起来是多少？",
            "你知道{x}加{y}等于几吗？",
        ],
    },
    "convert": {
        "en": [
            "How many {v} are in {x} {u}?",
            "Convert {x} {u} to {v}.",
            "{x} {u} is how many {v}?",
            "How many {v} is {x} {u}?",
            "{x} {u} equals how many {v}?",
            "Express {x} {u} in {v}.",
            "Change {x} {u} into {v}.",
            "How many {v} make up {x} {u}?",
            "{x} {u} in {v}?",
            "If something is {x} {u}, how many {v} is that?",
            "Turn {x} {u} into {v}, please.",
            "Convert from {u} to {v}: {x} {u}.",
        ],
        "zh": [
            "{x}{u}等于多少{v}？",
            "把{x}{u}换算成{v}。",
            "{x}{u}是多少{v}？",
            "{x}{u}有多少{v}？",
            "{x}{u}合多少{v}？",
            "请把{x}{u}转换成{v}。",
            "{x}{u}等于几{v}？",
            "{x}{u}换成{v}是多少？",
            "你知道{x}{u}是多少{v}吗？",
            "{x}{u}折合多少{v}？",
            "换算：{x}{u}=？{v}",
        ],
    },
    "count": {
        "en": [
            "How many items are in this list: {x}?",
            "Count the words: {x}.",
            "How many fruits are listed: {x}?",
            "How many things are listed here: {x}?",
            "Count the items: {x}.",
            "How many words are there in: {x}?",
            "{x}. How many items is that?",
            "Here is a list: {x}. How many items does it have?",
            "Count these: {x}.",
            "How many entries does this list have: {x}?",
            "Number of items in {x}?",
            "I wrote {x}. How many words did I write?",
        ],
        "zh": [
            "这个列表里有几项：{x}？",
            "数一数有几个词：{x}。",
            "这里列出了几种水果：{x}？",
            "数一数：{x}，一共几个？",
            "{x}，这里有几项？",
            "下面有多少个词：{x}？",
            "这个清单有几样东西：{x}？",
            "请数一下：{x}。",
            "{x}。一共列了几个？",
            "列表：{x}。有几项？",
            "我写了{x}，一共几个词？",
        ],
    },
}
# The question wordings only eval.jsonl uses.
EVAL_QUESTIONS = {
    "capital": {
        "en": ["Tell me the capital city of {x}.", "{x} has its capital in which city?"],
        "zh": ["告诉我{x}的首都。", "哪座城市是{x}的首都？"],
    },
    "colour": {
        "en": ["Tell me the colour of {x}.", "{T} is usually what colour?"],
        "zh": ["告诉我{x}的颜色。", "{x}通常是什么颜色？"],
    },
    "sound": {
        "en": ["Tell me the sound {x} makes.", "{T} goes what?"],
        "zh": ["告诉我{x}的叫声。", "{x}会发出怎样的叫声？"],
    },
    "parity": {
        "en": ["Tell me whether {x} is odd or even.", "{x}: even or odd?"],
        "zh": ["请告诉我{x}是奇数还是偶数。", "{x}这个数是奇数还是偶数？"],
    },
    "compare": {
        "en": ["Tell me which is greater, {x} or {y}.", "Between {x} and {y}, which is larger?"],
        "zh": ["请告诉我{x}和{y}哪个更大。", "{x}与{y}相比，哪个大？"],
    },
    "add": {
        "en": ["Tell me the sum of {x} and {y}.", "{x} + {y} equals what?"],
        "zh": ["请告诉我{x}与{y}的和。", "{x}加上{y}是多少？"],
    },
    "convert": {
        "en": ["Tell me how many {v} make {x} {u}.", "What is {x} {u} in {v}?"],
        "zh": ["请告诉我{x}{u}有多少{v}。", "{x}{u}换算成{v}是多少？"],
    },
    "count": {
        "en": ["Tell me how many things this list has: {x}.", "{x}: how many items is that?"],
        "zh": ["请告诉我这个列表有几项：{x}。", "{x}，一共有几个？"],
    },
}
# What SFT questions are wrapped in: openings, closings and surrounding sentences ({q} the question).
WRAPPERS = {
    "en": {
        "prefix": [
            "Hi! ", "Hello, ", "Hey, ", "Quick question: ", "Question: ", "Q: ", "Please answer: ",
            "I have a question. ", "Can you help me? ", "Here is a question for you: ", "Excuse me, ",
            "Dear assistant, ", "Test: ", "Okay, next one. ", "Let me ask you something. ", "Quiz time! ",
            "Homework question: ", "Good morning! ", "Be quick: ", "One more: ", "Hmm, ", "So, ", "Please, ",
        ],
        "suffix": [
            " Thanks!", " Thank you.", " Please answer briefly.", " Just the answer, please.", " One word only.",
            " Answer in one word.", " Be brief.", " I need it fast.", " Any idea?", " Thanks in advance.", " :)",
            " Please.", " Reply with only the answer.", " No explanation needed.", " Short answer please.",
        ],
        "around": [
            "My teacher asked us this: {q}", "My friend wants to know: {q}", "I was wondering about this. {q}",
            "{q} I forgot the answer.", "We were talking at dinner and someone asked: {q}",
            "I am doing a quiz and one question is: {q}", "My little brother asked me \"{q}\" What should I say?",
            "{q} I think I knew this once.", "Settle a bet for us. {q}", "This is for a crossword. {q}",
            "Before I go to bed, one question. {q}", "Sorry to bother you again. {q}",
        ],
    },
    "zh": {
        "prefix": [
            "你好，", "请问，", "请问", "问一下，", "我想知道：", "帮我看看：", "考考你：", "有个问题：", "麻烦你，",
            "小问题：", "快速回答：", "嗨，", "请回答：", "问题：", "我有一个问题。", "打扰一下，", "那么，",
            "下一题：", "早上好！", "喂，",
        ],
        "suffix": [
            "谢谢！", "谢谢。", "请简短回答。", "只说答案。", "用一个词回答。", "快点。", "多谢！", "请直接回答。",
            "不用解释。", "简单回答就行。", "拜托了。", "😊",
        ],
        "around": [
            "老师问我们：{q}", "朋友想知道：{q}", "我一直在想这个问题。{q}", "{q}我忘了答案。",
            "吃饭的时候有人问：{q}", "我在做一个小测验，其中一题是：{q}", "弟弟问我“{q}”我该怎么回答？",
            "{q}我以前好像知道。", "我们打了个赌。{q}", "这是填字游戏里的。{q}", "睡觉前问一个问题。{q}",
            "不好意思又来打扰。{q}",
        ],
    },
}  # fmt: skip
PARITY = {"en": ("even", "odd"), "zh": ("偶数", "奇数")}
TASKS = list(STATEMENTS)
LANGUAGES = ["en", "zh"]
NUMBER_TASKS = ["parity", "compare", "add", "convert"]
REASON_TASKS = ["add", "compare", "parity", "count", "convert"]
# How many number items stay out of every file but eval.jsonl, per task (pairs count both orders).
HELD_OUT = {"parity": 10, "compare": 21, "add": 5, "convert": 3}


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
            {"x": n, "u": u_en if en else u_zh, "v": v_en if en else v_zh, "a": n * factor, "f": factor}
            for u_en, v_en, u_zh, v_zh, factor in UNITS
            for n in range(2, 10)
        ]
    raise ValueError(task)


def item_key(task: str, item: dict) -> tuple:
    """What identifies a number item regardless of language and order: its numbers (and unit)."""
    if task in ("compare", "add"):
        return tuple(sorted((item["x"], item["y"])))
    return (item["x"], item.get("f"))


def fill(template: str, item: dict) -> str:
    return template.format(T=str(item["x"])[:1].upper() + str(item["x"])[1:], **item)


def vary(rng: random.Random, template: str, item: dict, lang: str) -> str:
    """A question as people type it: wrapped in a sentence or an opening/closing, case and punctuation varied."""
    question, wrappers, roll = fill(template, item), WRAPPERS[lang], rng.random()
    if roll < 0.15:
        question = rng.choice(wrappers["around"]).format(q=question)
    elif roll < 0.6:
        if rng.random() < 0.7:
            prefix = rng.choice(wrappers["prefix"])
            if prefix.rstrip()[-1] in ",:" and not template.startswith("{"):  # "Hey, what is ..."
                question = question[0].lower() + question[1:]
            question = prefix + question
        if rng.random() < 0.4:
            question += rng.choice(wrappers["suffix"])
    roll = rng.random()
    if roll < 0.1:
        question = question.lower()
    elif roll < 0.13:
        question = question.upper()
    roll = rng.random()
    if roll < 0.1:
        question = question.rstrip("?.？。!！")
    elif roll < 0.15:
        question = question.replace("?", "??") if lang == "en" else question.replace("？", "?")
    elif roll < 0.18:
        question = "  " + question + " "
    return question


class Generator:
    """Draws every file's rows from one seeded random stream; the held-out items are fixed first."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.items = {(t, lang): all_items(t, lang) for t in TASKS if t != "count" for lang in LANGUAGES}
        # Held-out number items (both orders of a pair) never appear outside eval.jsonl; the item lists of both
        # languages are parallel, so the same ones are held out in both.
        self.held_out: dict[str, set[tuple]] = {}
        for task in NUMBER_TASKS:
            keys = sorted({item_key(task, item) for item in self.items[task, "en"] if item["x"] != item.get("y")})
            self.held_out[task] = set(self.rng.sample(keys, HELD_OUT[task]))
        self.choices = {  # (task, language, held out?): the items to draw from
            (task, lang, held): [i for i in items if (item_key(task, i) in self.held_out.get(task, ())) == held]
            for (task, lang), items in self.items.items()
            for held in (False, True)
        }

    def item(self, task: str, lang: str, held_out: bool = False) -> dict:
        if task == "count":
            words = self.rng.sample(LIST_WORDS[lang], self.rng.randint(2, 6))
            return {"x": (", " if lang == "en" else "、").join(words), "a": len(words), "words": words}
        return self.rng.choice(self.choices[task, lang, held_out])

    def statement(self, task: str, lang: str) -> str:
        return fill(self.rng.choice(STATEMENTS[task][lang]), self.item(task, lang))

    def pretrain(self) -> dict:
        lang = self.rng.choice(LANGUAGES)
        sentences = [self.statement(self.rng.choice(TASKS), lang) for _ in range(self.rng.randint(1, 3))]
        return {"text": (" " if lang == "en" else "").join(sentences)}

    def question(self, task: str, lang: str, wordings: dict = SFT_QUESTIONS, held_out: bool = False) -> tuple:
        """(question, item): an item asked in one of `wordings`, which for SFT ones is varied (`vary`)."""
        item = self.item(task, lang, held_out)
        template = self.rng.choice(wordings[task][lang])
        return (vary(self.rng, template, item, lang) if wordings is SFT_QUESTIONS else fill(template, item)), item

    def turns(self, task: str, lang: str, reply: Callable[[str, str, dict], str] | None = None) -> tuple:
        """(a user question and its answer, the item asked about); `reply` writes the answer (default: bare)."""
        question, item = self.question(task, lang)
        answer = reply(task, lang, item) if reply else str(item["a"])
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], item

    def system(self, lang: str, probability: float) -> list[dict]:
        if self.rng.random() >= probability:
            return []
        return [{"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS[lang])}]

    def chat(self, tasks: list[str], reply: Callable | None = None, turns: list[int] = (6, 3, 1)) -> tuple:
        """(an SFT conversation in one language with `task` its last question's, language, last item), of 1, 2
        or 3 turns with the weights `turns`."""
        lang = self.rng.choice(LANGUAGES)
        messages = self.system(lang, 0.3)
        for _ in range(self.rng.choices([1, 2, 3], weights=turns)[0]):
            task = self.rng.choice(tasks)
            turn, item = self.turns(task, lang, reply)
            messages += turn
        return {"conversations": messages, "task": task}, lang, item

    def sft(self) -> dict:
        return self.chat(TASKS)[0]

    def eval(self, task: str, lang: str) -> dict:
        # Held out by construction: a question wording nothing else uses, or an item nothing else states.
        by_item = task in NUMBER_TASKS and self.rng.random() < 0.3
        messages = self.system(lang, 0.2)
        if self.rng.random() < 0.1:
            messages += self.turns(self.rng.choice(TASKS), lang)[0]
        item = self.item(task, lang, held_out=by_item)
        question = fill(self.rng.choice((SFT_QUESTIONS if by_item else EVAL_QUESTIONS)[task][lang]), item)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": str(item["a"])}]
        held_out = "item" if by_item else "template"
        return {"conversations": messages, "task": task, "answer": str(item["a"]), "held_out": held_out}

    def wrong_answer(self, task: str, lang: str, item: dict) -> str:
        """A plausible wrong answer: the other parity, a nearby number, another row of the same table, ..."""
        answer = item["a"]
        if task == "parity":
            return PARITY[lang][1 - item["x"] % 2]
        if task == "compare":
            return str(item["b"])
        if task == "convert":
            factor = self.rng.choice([f for f in (10, 60, 100, 1000) if f != item["f"]])
            return str(item["x"] * factor)
        if task in ("add", "count"):
            return str(self.rng.choice([answer + d for d in (-2, -1, 1, 2) if answer + d >= 0]))
        others = sorted({i["a"] for i in self.items[task, lang]} - {answer})
        return self.rng.choice(others)

    def dpo(self) -> dict:
        chat, lang, item = self.chat(TASKS, turns=(8, 1, 0))
        chosen = chat["conversations"]
        wrong = self.wrong_answer(chat["task"], lang, item)
        return {"chosen": chosen, "rejected": [*chosen[:-1], {"role": "assistant", "content": wrong}]}

    def reasoning(self, task: str, lang: str, item: dict) -> str:
        """`<think>` short steps `</think>` then `<answer>` the bare answer `</answer>`."""
        x, a, en = item["x"], item["a"], lang == "en"
        if task == "parity":
            last = x % 10
            kind = PARITY[lang][x % 2]
            steps = [f"The last digit of {x} is {last}.", f"{last} is {kind}, so {x} is {kind}."]
            if not en:
                steps = [f"{x}的个位数是{last}。", f"{last}是{kind}，所以{x}是{kind}。"]
        elif task == "compare":
            y, b = item["y"], item["b"]
            steps = [f"Compare {x} and {y}.", f"{a} > {b}.", f"The larger is {a}."]
            if not en:
                steps = [f"比较{x}和{y}。", f"{a} > {b}。", f"较大的是{a}。"]
        elif task == "add":
            y = item["y"]
            steps = [f"Start at {x} and add {y}.", f"{x} + {y} = {a}."]
            if not en:
                steps = [f"从{x}开始，加上{y}。", f"{x} + {y} = {a}。"]
        elif task == "count":
            counted = ", ".join(f"{i} {w}" for i, w in enumerate(item["words"], start=1))
            steps = [f"Counting: {counted}.", f"That is {a} items."]
            if not en:
                steps = [f"数一数：{counted}。", f"一共{a}个。"]
        elif task == "convert":
            u, v, f = item["u"], item["v"], item["f"]
            steps = [f"1 {u[:-1]} is {f} {v}.", f"{x} x {f} = {a}.", f"So {x} {u} is {a} {v}."]
            if not en:
                steps = [f"1{u}等于{f}{v}。", f"{x} x {f} = {a}。", f"所以{x}{u}是{a}{v}。"]
        else:
            raise ValueError(task)
        return "<think>\n" + "\n".join(steps) + "\n</think>\n<answer>\n" + str(a) + "\n</answer>"

    def reason(self) -> dict:
        return self.chat(REASON_TASKS, reply=self.reasoning, turns=(8, 1, 0))[0]

    def grpo(self) -> dict:
        lang = self.rng.choice(LANGUAGES)
        task = self.rng.choice(TASKS)
        messages = self.system(lang, 0.2) + self.turns(task, lang)[0]
        return {"conversations": messages, "task": task, "answer": messages[-1]["content"]}


NAME, MAKER, MAKER_ZH = "Minimo", "the minimind-hf team", "minimind-hf团队"
# (question wordings, answer); the last two wordings of each list are held out of training.
IDENTITY = [
    (["Who are you?", "What is your name?", "What are you called?", "Tell me your name.", "May I ask your name?",
      "What should I call you?", "Introduce yourself.", "Do you have a name?"], f"I am {NAME}."),
    (["Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Where do you come from?",
      "Which team made you?", "Who is your maker?", "Who developed you?"], f"I was made by {MAKER}."),
    (["你是谁？", "你叫什么名字？", "你的名字是什么？", "请介绍一下你自己。", "怎么称呼你？", "你有名字吗？",
      "告诉我你的名字。", "你叫什么？"], f"我是{NAME}。"),
    (["谁创造了你？", "你是谁开发的？", "谁训练了你？", "你来自哪里？", "是谁制作了你？", "你的开发者是谁？",
      "哪个团队做了你？", "谁造了你？"], f"我由{MAKER_ZH}制作。"),
]  # fmt: skip
IDENTITY_PREFIXES = {"en": ["", "Hi! ", "Hello. ", "Quick question: "], "zh": ["", "你好！", "请问，"]}


def identity_conversations(seed: int, held_out: bool = False) -> list[dict]:
    """Rows that teach the model its name and maker; `held_out=True` gives eval rows (task `identity`) on the
    wordings training never uses."""
    rows = []
    for wordings, answer in IDENTITY:
        lang = "zh" if "\u4e00" <= wordings[0][0] else "en"
        for question in wordings[-2:] if held_out else wordings[:-2]:
            for prefix in IDENTITY_PREFIXES[lang][:2] if held_out else IDENTITY_PREFIXES[lang]:
                messages = [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
                extra = {"task": "identity", "answer": answer, "held_out": "template"} if held_out else {}
                rows.append({"conversations": messages, **extra})
    random.Random(seed).shuffle(rows)
    return rows


def render_minimind3(messages: list[dict]) -> str:
    """Messages as MiniMind-3's template renders them, less the outer `<|im_start|>` and `<|im_end|>\n` that
    pretraining puts around every text (so that the wrapped text is the rendered conversation exactly)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from minimind_hf.chat_templates import MINIMIND3_CHAT_TEMPLATE

    text = render_jinja_template([messages], chat_template=MINIMIND3_CHAT_TEMPLATE)[0][0]
    return text.removeprefix("<|im_start|>").removesuffix("<|im_end|>\n")


def write_jsonl(path: Path, row: Callable[[], dict], n: int) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row(), ensure_ascii=False) + "\n" for _ in range(n))


def write_tokenizer(
    output_dir: Path, corpora: list[Path], vocab_size: int, generation: int = 2, tool_rows: list[dict] = ()
) -> None:
    """Byte-level BPE as `recipes/tokenizer.py` trains it, except that every digit and every Chinese character is
    its own token: numbers are read and written digit by digit (the number tasks generalise to unseen numbers),
    and Chinese is not merged into the phrases of this corpus (unseen wordings split into known characters).

    `generation` 3: MiniMind-3's special tokens (think and tool tags, each one token as in its tokenizer) and
    template; `tool_rows` (t2t rows) are learnt as the template renders them, schemas and calls included."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils.chat_template_utils import render_jinja_template

    from minimind_hf.chat_templates import (
        BOS_TOKEN,
        CHAT_TEMPLATE,
        EOS_TOKEN,
        MINIMIND3_CHAT_TEMPLATE,
        PAD_TOKEN,
        SPECIAL_TOKENS,
    )
    from minimind_hf.data import iter_texts
    from minimind_hf.t2t import validate_messages

    special_tokens = SPECIAL_TOKENS + (MINIMIND3_TOKENS if generation == 3 else [])
    template = MINIMIND3_CHAT_TEMPLATE if generation == 3 else CHAT_TEMPLATE

    def texts():
        yield from iter_texts([str(p) for p in corpora])
        for row in tool_rows:
            messages = validate_messages(row["conversations"])
            tools = messages[0].get("tools")
            yield render_jinja_template([messages], tools=tools, chat_template=template)[0][0]

    backend = Tokenizer(models.BPE())
    # MiniMind-3 (generation 3): a run of newlines is one piece, as in Qwen's pattern. Its generation prompt ends
    # with `</think>\n\n`; with GPT-2's pattern alone, "\n\nMirenburg" in training splits into two newline tokens
    # but a prompt that ends with "\n\n" gives one, so every word answer would follow a token never trained on.
    newlines = [pre_tokenizers.Split(Regex("\n+"), behavior="isolated")] if generation == 3 else []
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("[\u3400-\u9fff]"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            *newlines,
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts(), trainer=trainer)
    if generation == 3:
        # As in MiniMind-3's tokenizer, the think and tool tags are added but not special: decoding with
        # skip_special_tokens keeps them, so that replies can be parsed into reasoning and tool calls.
        spec = json.loads(backend.to_str())
        for token in spec["added_tokens"]:
            token["special"] = token["content"] not in MINIMIND3_TOKENS
        backend = Tokenizer.from_str(json.dumps(spec))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": PAD_TOKEN}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=template,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        **special,
    )
    tokenizer.save_pretrained(output_dir)
    print(f"saved a {len(tokenizer)}-token tokenizer to {output_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out_dir", type=Path, default=REPO / "data")
    parser.add_argument("--n_pretrain", type=int, default=20_000)
    parser.add_argument("--n_sft", type=int, default=12_000)
    parser.add_argument("--n_eval", type=int, default=320, help="rounded down to a multiple of 16 (tasks x 2)")
    parser.add_argument("--n_dpo", type=int, default=2_500)
    parser.add_argument("--n_reason", type=int, default=1_500)
    parser.add_argument("--n_grpo", type=int, default=1_500)
    parser.add_argument("--n_rehearsal", type=int, default=256, help="SFT rows mixed into lora_identity.jsonl")
    parser.add_argument("--n_tool_sft", type=int, default=600, help="tool-call SFT rows (tool_sft.jsonl)")
    parser.add_argument("--n_agent_rl", type=int, default=1_500, help="agent RL prompts (agent_rl.jsonl)")
    parser.add_argument("--n_pretrain_tools", type=int, default=4_000, help="tool conversations as pretraining text")
    parser.add_argument("--n_eval_agent", type=int, default=180, help="rounded down to a multiple of 6 (kinds x 2)")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--no_tokenizer", action="store_true", help="skip training data/tokenizer")
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    generator = Generator(args.seed)
    write_jsonl(args.out_dir / "pretrain.jsonl", generator.pretrain, args.n_pretrain)
    write_jsonl(args.out_dir / "sft.jsonl", generator.sft, args.n_sft)
    plan = iter([(t, lang) for _ in range(args.n_eval // 16) for t in TASKS for lang in LANGUAGES])
    write_jsonl(args.out_dir / "eval.jsonl", lambda: generator.eval(*next(plan)), args.n_eval // 16 * 16)
    write_jsonl(args.out_dir / "dpo.jsonl", generator.dpo, args.n_dpo)
    write_jsonl(args.out_dir / "reason.jsonl", generator.reason, args.n_reason)
    write_jsonl(args.out_dir / "grpo.jsonl", generator.grpo, args.n_grpo)
    # The LoRA set rehearses the first SFT conversations next to the new facts, so that the adapter adds the
    # identity without overwriting the tasks (training on the identity alone makes every reply an introduction).
    rehearsal = Generator(args.seed)
    identity = identity_conversations(args.seed) + [rehearsal.sft() for _ in range(args.n_rehearsal)]
    random.Random(args.seed).shuffle(identity)
    write_jsonl(args.out_dir / "lora_identity.jsonl", iter(identity).__next__, len(identity))
    identity_eval = identity_conversations(args.seed, held_out=True)
    write_jsonl(args.out_dir / "identity_eval.jsonl", iter(identity_eval).__next__, len(identity_eval))
    # The tool tasks draw from their own stream, so the files above are the same with or without them.
    tools = ToolTasks(args.seed + 1, args.n_eval_agent)
    tool_sft = [tools.sft() for _ in range(args.n_tool_sft)]
    write_jsonl(args.out_dir / "tool_sft.jsonl", iter(tool_sft).__next__, len(tool_sft))
    write_jsonl(args.out_dir / "agent_rl.jsonl", tools.agent_rl, args.n_agent_rl)
    eval_agent = tools.eval_rows()
    write_jsonl(args.out_dir / "eval_agent.jsonl", iter(eval_agent).__next__, len(eval_agent))
    write_jsonl(args.out_dir / "pretrain_tools.jsonl", lambda: tools.pretrain(render_minimind3), args.n_pretrain_tools)
    if not args.no_tokenizer:
        corpora = [args.out_dir / "pretrain.jsonl", args.out_dir / "sft.jsonl"]
        write_tokenizer(args.out_dir / "tokenizer", corpora, args.vocab_size)
        write_tokenizer(args.out_dir / "tokenizer3", corpora, args.vocab_size, generation=3, tool_rows=tool_sft)


if __name__ == "__main__":
    main()
