"""How fast the demo's model shape learns to copy a number it has read: the skill every tool call and answer needs.

    python benchmarks/copy_learning.py --form fixed --steps 400
    python benchmarks/copy_learning.py --form fillers --steps 400
    python benchmarks/copy_learning.py --form random --steps 400

A fresh MiniMind-3 of the demo's shape (4 layers, 256 wide, data/tokenizer3) is trained on texts that say a number
and then say it again, 16 x 128 tokens a step (one process), and every 50 steps scored by the share of digits it
predicts right in the second mention, after the first digit (which only finding the earlier mention gives):

- `fixed`: one sentence pair, "The code is 4821. Once more, the code is 4821." (the copy is always the same
  distance back, given the number's length);
- `fillers`: the same pair with 0-2 sentences of data/pretrain.jsonl between the mentions;
- `random`: an 8-24 digit string, 0-2 such sentences, the string again.

"seen form" scores new numbers in the training form, "unseen form" in a sentence pair it never saw ("My number is
...", a sentence, "Later: ..."). The demo's tool wordings (data/tool_tasks.py) follow from what this shows.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from minimind_hf import MiniMind3Config, MiniMind3ForCausalLM
from minimind_hf.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def training_text(form: str, rng: random.Random, fillers: list[str]) -> str:
    between = " ".join(rng.sample(fillers, rng.randint(0, 2))) if form != "fixed" else ""
    if form == "random":
        number = digits(rng, rng.randint(8, 24))
        return f"{number} {between} {number}"
    number = str(rng.randint(10, 99_999))
    return f"The code is {number}. {between} Once more, the code is {number}.".replace("  ", " ")


def copy_accuracy(model, tokenizer, texts: list[tuple[str, str]]) -> float:
    """Right digits after the first in each text's second part (`texts`: (first part, second part))."""
    right = total = 0
    model.eval()
    with torch.no_grad():
        for first, second in texts:
            start = len(tokenizer(first)["input_ids"]) + 1
            ids = [tokenizer.bos_token_id, *tokenizer(first + second)["input_ids"]]
            predicted = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1)
            tokens = tokenizer.convert_ids_to_tokens(ids)
            seen_digit = False
            for j in range(start, len(ids)):
                if tokens[j].isdigit():
                    if seen_digit:
                        total += 1
                        right += int(predicted[j - 1] == ids[j])
                    seen_digit = True
    model.train()
    return right / total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--form", choices=["fixed", "fillers", "random"], default="fixed")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the curve as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng, probe = random.Random(args.seed), random.Random(args.seed + 1)
    tokenizer = load_tokenizer(REPO / "data" / "tokenizer3")
    config = MiniMind3Config(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        vocab_size=len(tokenizer),
    )  # fmt: skip
    model = MiniMind3ForCausalLM(config).train()
    fillers = [json.loads(line)["text"] for line in (REPO / "data" / "pretrain.jsonl").open(encoding="utf-8")]
    numbers = [str(probe.randint(100, 99_999)) for _ in range(60)]
    seen = [(f"The code is {n}.", f" Once more, the code is {n}.") for n in numbers]
    unseen = [(f"My number is {n}. {probe.choice(fillers)}", f" Later: {n}.") for n in numbers]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    curve, start = [], time.time()
    for step in range(1, args.steps + 1):
        ids: list[int] = []
        while len(ids) < 16 * 128:
            text = training_text(args.form, rng, fillers)
            ids += [tokenizer.bos_token_id, *tokenizer(text)["input_ids"], tokenizer.eos_token_id]
        batch = torch.tensor(ids[: 16 * 128]).view(16, 128)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            point = {
                "step": step,
                "loss": round(loss.item(), 3),
                "seen_form": copy_accuracy(model, tokenizer, seen),
                "unseen_form": copy_accuracy(model, tokenizer, unseen),
                "seconds": round(time.time() - start),
            }
            curve.append(point)
            print(json.dumps(point), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"form": args.form, "curve": curve}, indent=2) + "\n", encoding="utf-8")
    return {"form": args.form, "curve": curve}


if __name__ == "__main__":
    main()
