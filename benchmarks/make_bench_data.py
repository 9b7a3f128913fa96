"""A deterministic SFT set with the length mix of MiniMind's `sft_mini_512`, for the throughput benchmark.

    python benchmarks/make_bench_data.py out/bench/sft_bench.jsonl --tokenizer data/tokenizer --samples 3000

What matters for throughput is the distribution of lengths in tokens, so every conversation is built to a
target length drawn from a log-normal (median about 130 tokens, a long tail past 512 that truncation cuts),
in the tokenizer that will train on it. The text is Chinese (about 60%) and English chat, sentence by sentence
from fixed pools; one to three user/assistant turns, sometimes a system prompt, answers longer than questions.
The same arguments always write the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from transformers import PreTrainedTokenizerBase

ZH_QUESTIONS = [
    "请解释一下什么是机器学习。",
    "为什么天空是蓝色的？",
    "你能帮我写一首关于秋天的短诗吗？",
    "如何提高自己的写作能力？",
    "光合作用的过程是怎样的？",
    "请比较一下太阳能和风能的优缺点。",
    "我最近总是失眠，有什么建议吗？",
    "请用简单的话介绍一下量子计算。",
    "学习一门新语言最有效的方法是什么？",
    "中国的四大发明分别是什么？",
    "怎样才能养成良好的阅读习惯？",
    "请把下面这句话翻译成英文。",
    "什么是区块链技术？",
    "如何做一道简单的番茄炒蛋？",
    "请总结一下这篇文章的主要观点。",
    "地球为什么会有四季变化？",
]
ZH_SENTENCES = [
    "首先，我们需要明确问题的定义和范围。",
    "机器学习是人工智能的一个分支，它让计算机能够从数据中学习规律。",
    "简单来说，这个过程可以分为三个主要步骤。",
    "太阳光进入大气层后，波长较短的蓝光更容易被空气分子散射。",
    "因此，我们在白天看到的天空呈现出蓝色。",
    "植物通过叶绿体吸收光能，把二氧化碳和水转化为葡萄糖和氧气。",
    "坚持每天阅读半小时，是提高写作能力的好方法。",
    "此外，多练习、多修改也非常重要。",
    "太阳能的优点是清洁、可再生，但受天气和昼夜的影响较大。",
    "风能的成本较低，但对选址有比较高的要求。",
    "睡前尽量避免使用手机，保持卧室安静和适宜的温度。",
    "如果失眠的情况持续很久，建议及时咨询医生。",
    "量子计算利用量子比特的叠加和纠缠特性来进行运算。",
    "对于某些特定问题，它的速度可能远远超过传统计算机。",
    "学习语言时，沉浸式的环境和持续的练习都很关键。",
    "四大发明包括造纸术、印刷术、火药和指南针。",
    "它们对世界文明的发展产生了深远的影响。",
    "区块链是一种去中心化的分布式账本技术。",
    "每一个区块都记录着一段时间内的交易信息，并通过密码学方法相互连接。",
    "先把鸡蛋打散炒熟盛出，再炒番茄，最后把鸡蛋倒回去一起翻炒。",
    "地球的自转轴是倾斜的，所以在公转过程中不同地区接受的阳光不同。",
    "总的来说，这个问题没有唯一的答案，需要结合具体情况来分析。",
    "希望以上内容对你有所帮助，如果还有其他问题，欢迎继续提问。",
    "值得注意的是，不同的方法适用于不同的场景。",
    "我们可以从历史、经济和文化三个角度来理解这一现象。",
    "例如，在日常生活中，很多人已经在使用这类技术了。",
]
EN_QUESTIONS = [
    "Can you explain how a neural network learns?",
    "What are some tips for staying productive when working from home?",
    "Write a short story about a robot who learns to paint.",
    "How does the immune system fight infections?",
    "What is the difference between weather and climate?",
    "Summarize the main causes of the French Revolution.",
    "How do I make a simple budget?",
    "Why do cats purr?",
    "Give me three ideas for a birthday party.",
    "What does a compiler do?",
    "Translate the following sentence into Chinese.",
    "How can I improve my public speaking skills?",
]
EN_SENTENCES = [
    "A neural network adjusts its weights to reduce the error between its predictions and the targets.",
    "This is done with gradient descent, which follows the slope of the loss downhill.",
    "Set up a dedicated workspace and keep regular hours.",
    "Short breaks every hour help you stay focused for longer.",
    "Once upon a time, a small robot found a box of paints in an abandoned studio.",
    "At first its brush strokes were stiff and careful, but slowly they became bolder.",
    "White blood cells recognise invaders and produce antibodies that bind to them.",
    "Weather describes conditions over hours or days, while climate is the average over decades.",
    "Financial crisis, social inequality and new political ideas all played a part.",
    "List your income, then your fixed costs, and decide how much to save each month.",
    "Cats often purr when they are relaxed, but sometimes also when they are stressed or in pain.",
    "A compiler translates source code into machine code that the processor can run.",
    "Practice in front of a friend and record yourself to notice your habits.",
    "In short, there is no single right answer; it depends on the situation.",
    "For example, many people already use this technology every day without noticing.",
    "I hope this helps; feel free to ask if you have more questions.",
    "It is worth noting that each approach has its own trade-offs.",
    "First, let us define the problem clearly.",
]
SYSTEM_PROMPTS = [
    "你是一个乐于助人的AI助手。",
    "You are a helpful assistant.",
    "You are MiniMind, a small but capable language model.",
    "请用简洁、准确的语言回答用户的问题。",
]

MEDIAN_TOKENS = 130
LOG_SIGMA = 0.65


def _fill(rng: random.Random, pool: list[str], costs: dict[str, int], budget: int, sep: str) -> str:
    # Whole sentences while they fit, then the share of one more sentence that fills the budget (by characters).
    parts, used = [], 0
    while used < budget:
        sentence = rng.choice(pool)
        if used + costs[sentence] > budget:
            parts.append(sentence[: round(len(sentence) * (budget - used) / costs[sentence])])
            break
        parts.append(sentence)
        used += costs[sentence]
    return sep.join(parts).strip() or rng.choice(pool)[:2]


def make_conversation(rng: random.Random, tokenizer: PreTrainedTokenizerBase, costs: dict[str, int]) -> dict:
    """One conversation of a sampled length in tokens of `tokenizer` (`costs`: each pool sentence's length)."""
    target = round(MEDIAN_TOKENS * math.exp(rng.gauss(0.0, LOG_SIGMA)))
    chinese = rng.random() < 0.6
    questions, sentences, sep = (ZH_QUESTIONS, ZH_SENTENCES, "") if chinese else (EN_QUESTIONS, EN_SENTENCES, " ")
    turns = rng.choices([1, 2, 3], weights=[70, 22, 8])[0]
    skeleton = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.2 else []
    skeleton += [{"role": role, "content": ""} for _ in range(turns) for role in ("user", "assistant")]
    # Headers, end tokens and the system prompt (the template's default one when there is none) cost tokens too.
    overhead = len(tokenizer.apply_chat_template(skeleton, tokenize=True, return_dict=True)["input_ids"])
    budget_per_turn = max(8, (target - overhead) // turns)
    messages = skeleton[: len(skeleton) - 2 * turns]
    for _ in range(turns):
        question_budget = int(budget_per_turn * rng.uniform(0.1, 0.3))
        question = _fill(rng, questions + sentences, costs, question_budget, sep)
        answer = _fill(rng, sentences, costs, budget_per_turn - question_budget, sep)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"conversations": messages}


def write_bench_data(path: str | Path, tokenizer: PreTrainedTokenizerBase, samples: int = 3000, seed: int = 0) -> Path:
    """Write `samples` conversations to `path` (JSON Lines); deterministic for a given tokenizer and seed."""
    pools = ZH_QUESTIONS + ZH_SENTENCES + EN_QUESTIONS + EN_SENTENCES
    costs = {text: len(tokenizer.encode(text, add_special_tokens=False)) for text in pools}
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(samples):
            f.write(json.dumps(make_conversation(rng, tokenizer, costs), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    from minimind_hf.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the JSON Lines file to write")
    parser.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer directory the lengths are for")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_bench_data(args.output, load_tokenizer(args.tokenizer), args.samples, args.seed))


if __name__ == "__main__":
    main()
