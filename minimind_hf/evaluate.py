"""Score a model on a held-out conversation set: exact-match accuracy per task, and the assistant-token loss.

    python -m minimind_hf.evaluate --model out/sft --data data/eval.jsonl --out out/sft/eval_results.json
    python -m minimind_hf.evaluate --model out/sft --data data/sft.jsonl --sft --sample 320 --seed 0   # fit

Rows are SFT conversations plus `task` (a name) and `answer` (the expected string). With `--sft` the file is
plain SFT data instead: the answer is each row's last assistant message and the task its `task` field when it
has one (else `--task`, default "all"); `--sample N` scores N rows drawn with `--seed` (e.g. how well a model
fits its own training data). The model answers greedily from every message before the last assistant message
(with the generation prompt); a prediction is right when it equals `answer`, both stripped of surrounding
whitespace. Rows with a `held_out` string (how they are held out) are also scored per kind. `mean_loss` is the
cross-entropy per supervised token over the whole conversations (teacher forcing), with the supervised
positions and the truncation of SFT training. The model options are those of `minimind_hf.chat` (an HF
directory or a `.pth`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, PreTrainedTokenizerBase

from .chat import generate_replies
from .cli_options import add_model_arguments, device_problem, load_from_args, non_negative_int, positive_int
from .configuration_minimind import config_overrides_problem
from .data import IGNORE_INDEX, encode_conversation, scan
from .errors import DataError


def load_eval_rows(path: str | Path, sft: bool = False, task: str | None = None) -> list[dict]:
    """The rows of an evaluation file, each with its `prompt` (the messages before the last assistant one).

    Conversations are validated as SFT data; a missing or non-string `task` / `answer`, or a conversation
    that does not end with the assistant's answer, is a `DataError` naming the file and line. With `sft` the
    answer is the last assistant message and a row without a `task` string gets `task` (default "all"); a given
    `task` names the task of every row in either case.
    """
    scan(path, "sft")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            messages = row["conversations"]
            if messages[-1]["role"] != "assistant":
                raise DataError(path, number, "bad_order", "the last message is not the assistant's answer")
            if sft:
                row = {**row, "answer": messages[-1]["content"]}
                if not isinstance(row.get("task"), str):
                    row["task"] = task or "all"
            if task is not None:
                row["task"] = task
            for key in ("task", "answer"):
                if not isinstance(row.get(key), str):
                    raise DataError(path, number, "missing_field", f'no "{key}" string (an evaluation row needs one)')
            rows.append({**row, "prompt": messages[:-1], "line": number})
    return rows


def sample_rows(rows: list[dict], n: int, seed: int) -> list[dict]:
    """`n` rows drawn without replacement by a `random.Random(seed)`, in file order (all of them if n >= rows)."""
    if n >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def score(predictions: list[str], rows: list[dict]) -> dict:
    """Exact match (whitespace-stripped) of each prediction with its row's `answer`, overall and per task, and
    per `held_out` kind for the rows that have one."""
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    total, correct, held_total, held_correct = Counter(), Counter(), Counter(), Counter()
    for prediction, row in zip(predictions, rows, strict=True):
        right = prediction.strip() == row["answer"].strip()
        total[row["task"]] += 1
        correct[row["task"]] += right
        if isinstance(row.get("held_out"), str):
            held_total[row["held_out"]] += 1
            held_correct[row["held_out"]] += right

    def summary(n: int, right: int) -> dict:
        return {"n": n, "correct": right, "exact_match": right / n if n else 0.0}

    results = {
        "overall": summary(total.total(), correct.total()),
        "tasks": {task: summary(total[task], correct[task]) for task in sorted(total)},
    }
    if held_total:
        results["held_out"] = {kind: summary(held_total[kind], held_correct[kind]) for kind in sorted(held_total)}
    return results


def mean_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    max_length: int | None,
    batch_size: int = 16,
) -> float:
    """Cross-entropy per supervised token over `conversations`, from the model's own (token-mean) loss."""
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(conversations), batch_size):
        batch = collator(
            [encode_conversation(m, tokenizer, max_length) for m in conversations[start : start + batch_size]]
        ).to(model.device)
        # The model's loss is a mean over the batch's shifted supervised targets: weight it by their count.
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if n:
            with torch.inference_mode():
                loss_sum += model(**batch, use_cache=False).loss.item() * n
            tokens += n
    return loss_sum / tokens if tokens else math.nan


def predict(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers to each row's prompt, in batches of similar length (less left padding)."""
    order = sorted(range(len(rows)), key=lambda i: sum(len(m["content"]) for m in rows[i]["prompt"]))
    predictions = [""] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch"):
        indices = order[start : start + batch_size]
        replies = generate_replies(
            model, tokenizer, [rows[i]["prompt"] for i in indices], max_new_tokens=max_new_tokens, greedy=True
        )
        for i, reply in zip(indices, replies, strict=True):
            predictions[i] = reply
    return predictions


def format_table(results: dict) -> str:
    lines = [f"{'task':<16}{'n':>6}{'exact match':>14}"]
    held_out = [(f"held out: {kind}", row) for kind, row in results.get("held_out", {}).items()]
    for name, row in [*results["tasks"].items(), ("overall", results["overall"]), *held_out]:
        lines.append(f"{name:<16}{row['n']:>6}{100 * row['exact_match']:>13.1f}%")
    lines.append(f"mean assistant-token loss: {results['mean_loss']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m minimind_hf.evaluate", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="JSON Lines evaluation set (conversations, task, answer)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--max_new_tokens", type=positive_int, default=64)
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--max_length", type=positive_int, default=512, help="truncation for the loss, as in training")
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N rows")
    parser.add_argument(
        "--samples", type=non_negative_int, default=5, help="rows copied into the JSON with their prediction"
    )
    parser.add_argument(
        "--sft", action="store_true", help="plain SFT data: the answer is the last assistant message of each row"
    )
    parser.add_argument("--task", help='the task of every row (default: its `task`; with --sft "all" if none)')
    parser.add_argument("--sample", type=positive_int, help="score N rows drawn at random (with --seed)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --sample")
    args = parser.parse_args(argv)
    # Checked before the model runs: a bad --out would otherwise fail only after the whole evaluation.
    if args.out and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a directory; name the JSON file to write")
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            parser.error(f"--out {args.out}: cannot write there ({err})")
        if not os.access(Path(args.out).parent, os.W_OK):
            parser.error(f"--out {args.out}: cannot write there (permission denied)")
    if problem := device_problem(args.device) or config_overrides_problem(args.config_overrides):
        parser.error(problem)

    try:
        rows = load_eval_rows(args.data, sft=args.sft, task=args.task)
        rows = (sample_rows(rows, args.sample, args.seed) if args.sample else rows)[: args.limit]
    except (DataError, FileNotFoundError) as err:
        parser.exit(1, f"error: {err}\n")
    model, tokenizer = load_from_args(args, parser)

    predictions = predict(model, tokenizer, rows, args.max_new_tokens, args.batch_size)
    results = score(predictions, rows)
    results["mean_loss"] = mean_loss(
        model, tokenizer, [row["conversations"] for row in rows], args.max_length, args.batch_size
    )
    results["samples"] = [
        {"line": row["line"], "task": row["task"], "prompt": row["prompt"], "answer": row["answer"], "prediction": p}
        for row, p in zip(rows[: args.samples], predictions, strict=False)
    ]
    print(format_table(results))
    if args.out:  # its directory was made by the check above
        # NaN (no supervised token at all) is not JSON: null instead.
        record = {"model": args.model, "data": args.data, "sample": args.sample, "seed": args.seed, **results}
        record["mean_loss"] = None if math.isnan(results["mean_loss"]) else results["mean_loss"]
        Path(args.out).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
