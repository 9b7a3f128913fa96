"""How much an exact-match GRPO could raise a model's score: greedy exact match against pass@k, where a prompt counts
when any of k samples (drawn as GRPO draws them: temperature 1, no top-p/top-k) is right.

    python benchmarks/grpo_headroom.py --model out/demo/sft --data data/eval.jsonl --k 8 \
        --out benchmarks/results/grpo_headroom_demo_sft.json

GRPO with an exact-match reward gives no gradient on a prompt whose k samples are all wrong (every completion has
the same reward), so pass@k bounds what sharpening the model's own samples can reach.

Agent rows (`gt` and tools, as data/eval_agent.jsonl) are run with the tools, as `minimind_hf.evaluate` runs them:
a prompt counts when its greedy trajectory, or any of k sampled ones, ends with every `gt` item in the answer.

    python benchmarks/grpo_headroom.py --model out/demo/sft --data data/eval_agent.jsonl --k 8 --max_new_tokens 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import set_seed

from minimind_hf.chat import add_model_arguments, generate_replies, load_from_args
from minimind_hf.evaluate import (
    evaluate_agent,
    is_agent_file,
    load_agent_rows,
    load_eval_rows,
    predict,
    run_agents,
    score,
    solved,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="evaluation rows (conversations, task, answer)")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt (GRPO's num_generations)")
    parser.add_argument("--temperature", type=float, default=1.0, help="GRPO's sampling temperature")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--max_turns", type=int, default=3, help="agent rows: replies per trajectory")
    args = parser.parse_args(argv)
    if is_agent_file(args.data):
        return agent_headroom(args, parser)
    rows = load_eval_rows(args.data)
    model, tokenizer = load_from_args(args, parser)
    set_seed(args.seed)

    greedy = predict(model, tokenizer, rows, args.max_new_tokens, batch_size=32)
    # A prompt's best sample: the right answer if any of its k samples is, else its first sample.
    best = []
    for row in rows:
        samples = generate_replies(
            model, tokenizer, [row["prompt"]] * args.k, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=1.0,
        )  # fmt: skip
        best.append(next((s for s in samples if s.strip() == row["answer"].strip()), samples[0]))
    results = {"greedy": score(greedy, rows), f"pass@{args.k}": score(best, rows)}
    for name, result in results.items():
        tasks = ", ".join(f"{task} {100 * r['exact_match']:.0f}%" for task, r in result["tasks"].items())
        print(f"{name}: {100 * result['overall']['exact_match']:.1f}% ({tasks})")
    if args.out:
        record = {"model": args.model, "data": args.data, "k": args.k, "temperature": args.temperature, **results}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return results


def agent_headroom(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Greedy against pass@k on agent rows: k sampled trajectories per row, run with the tools."""
    rows = load_agent_rows(args.data)
    model, tokenizer = load_from_args(args, parser)
    set_seed(args.seed)
    greedy = evaluate_agent(model, tokenizer, rows, args.max_turns, args.max_new_tokens)["solved_rate"]
    sampling = {"temperature": args.temperature, "top_p": 1.0}
    hits, per_batch = 0, max(1, 64 // args.k)  # rows whose k samples form one batch of about 64
    for start in range(0, len(rows), per_batch):
        chunk = rows[start : start + per_batch]
        copies = [row for row in chunk for _ in range(args.k)]
        runs = run_agents(model, tokenizer, copies, args.max_turns, args.max_new_tokens, sampling)
        hits += sum(any(solved(r, row) for r in runs[i * args.k : (i + 1) * args.k]) for i, row in enumerate(chunk))
    results = {"greedy": greedy, f"pass@{args.k}": hits / len(rows)}
    print(", ".join(f"{name}: {100 * rate:.1f}%" for name, rate in results.items()))
    if args.out:
        record = {"model": args.model, "data": args.data, "k": args.k, "temperature": args.temperature, **results}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
