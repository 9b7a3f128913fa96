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

Agent rows (the agent RL format: tools on the system message and a `gt` list; `minimind_hf.stages.agent`) are
recognised by those two keys on the first row and scored by tool use instead (`evaluate_agent`): the model runs
greedily with the tools of `minimind_hf.agent_tools`, its calls are executed and answered, for up to
`--max_turns` turns; a row is solved when every `gt` item is in the final answer (`rewards.gt_found`: a
substring, or a number within 1e-6). Reported: solved overall and per tool offered, calls and valid calls per tool,
the share of replies with a valid call, and the share of rows still calling tools at the last turn (unfinished).
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

from .agent_rows import tool_names
from .agent_tools import TOOLS, run_tool
from .chat import generate_replies
from .cli_options import add_model_arguments, device_problem, load_from_args, non_negative_int, positive_int
from .configuration_minimind import config_overrides_problem
from .data import IGNORE_INDEX, InvalidRecord, encode_conversation, load_records, scan
from .errors import DataError
from .replies import gt_found, parse_call_blocks, split_reply
from .t2t import uses_t2t, validate_messages


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
            tools = None
            if uses_t2t(messages):  # MiniMind-3 rows: tools and calls are JSON strings in the file
                row["conversations"] = validate_messages(messages)
                tools = row["conversations"][0].get("tools")
                messages = [
                    {k: v for k, v in row["conversations"][0].items() if k != "tools"},
                    *row["conversations"][1:],
                ]
            rows.append({**row, "prompt": messages[:-1], "tools": tools, "line": number})
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
    """Greedy answers to each row's prompt, in batches of similar length (less left padding) and the same tools."""

    tools = [json.dumps(row.get("tools"), sort_keys=True) for row in rows]  # a batch renders with one `tools`
    order = sorted(range(len(rows)), key=lambda i: (tools[i], sum(len(m["content"]) for m in rows[i]["prompt"])))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    batches = [
        [i for i in batch if tools[i] == key] for batch in batches for key in dict.fromkeys(tools[i] for i in batch)
    ]
    predictions = [""] * len(rows)
    for indices in tqdm(batches, desc="generating", unit="batch"):
        kwargs = {"tools": rows[indices[0]]["tools"]} if rows[indices[0]].get("tools") else None
        replies = generate_replies(
            model, tokenizer, [rows[i]["prompt"] for i in indices], max_new_tokens=max_new_tokens, greedy=True,
            template_kwargs=kwargs,
        )  # fmt: skip
        for i, reply in zip(indices, replies, strict=True):
            predictions[i] = reply
    return predictions


def is_agent_file(path: str | Path) -> bool:
    """Whether the first row of a JSON Lines file is an agent row: a `gt` list and tools on its system message."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return False
                messages = row.get("conversations") if isinstance(row, dict) else None
                first = messages[0] if isinstance(messages, list) and messages else None
                return "gt" in row and isinstance(first, dict) and bool(first.get("tools"))
    return False


def load_agent_rows(path: str | Path) -> list[dict]:
    """Agent rows validated as the agent stage validates them (`file:line` errors), with their tool schemas."""

    def check(row: dict) -> None:
        for name in tool_names(row):
            if name not in TOOLS:
                raise InvalidRecord("unknown_tool", f"tool {name!r} is not in the tool registry")

    rows = []
    for row in load_records(path, "agent", check=check):
        prompt = [{k: v for k, v in m.items() if v is not None} for m in row["prompt"]]
        schemas = [json.loads(tool) for tool in prompt[0].pop("tools")]
        for message in prompt:
            for call in message.get("tool_calls", []):
                call["arguments"] = json.loads(call["arguments"])
        rows.append({"prompt": prompt, "tools": schemas, "gt": row["gt"]})
    return rows


def run_agents(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    max_turns: int,
    max_new_tokens: int,
    sampling: dict | None = None,
) -> list[dict]:
    """One trajectory per row, all rows in step: each turn the replies of the rows still going are generated as one
    batch, their calls are run (`agent_tools.run_tool`) and answered as `tool` messages; a row stops when a reply
    calls nothing or after `max_turns` replies. Greedy unless `sampling` (generate_replies' temperature, top_p)
    is given. Each trajectory: `turns` (the replies), `calls` (each reply's calls), `unfinished`, `final`."""
    runs = [{"messages": list(row["prompt"]), "turns": [], "calls": [], "unfinished": False} for row in rows]
    going = list(range(len(rows)))
    for turn in range(max_turns):
        if not going:
            break
        # Rows with the same tool list form one batch (the template takes one `tools` per call).
        groups: dict[str, list[int]] = {}
        for i in going:
            groups.setdefault(json.dumps(rows[i]["tools"], sort_keys=True), []).append(i)
        still = []
        for indices in groups.values():
            texts = generate_replies(
                model, tokenizer, [runs[i]["messages"] for i in indices], max_new_tokens=max_new_tokens,
                greedy=sampling is None, **(sampling or {}), template_kwargs={"tools": rows[indices[0]]["tools"]},
            )  # fmt: skip
            for i, text in zip(indices, texts, strict=True):
                if _take_turn(runs[i], rows[i], text, last=turn == max_turns - 1):
                    still.append(i)
        going = sorted(still)
    for run in runs:
        run["final"] = (
            "" if run["unfinished"] else split_reply(run["turns"][-1], tools=True).content.split("</tool_call>")[-1]
        )
        del run["messages"]
    return runs


def _take_turn(run: dict, row: dict, text: str, last: bool) -> bool:
    """Record a reply and run its calls; whether the trajectory goes on."""
    names = {schema.get("function", schema).get("name") for schema in row["tools"]}
    run["turns"].append(text)
    run["calls"].append([])  # this reply's calls
    reply = split_reply(text, tools=True)
    blocks = [call for call in parse_call_blocks(reply.content) if isinstance(call, dict)]
    if not reply.tool_calls and not blocks:
        return False
    run["unfinished"] = last
    parsed = reply.tool_calls or [
        {"name": str(call.get("name", "")), "arguments": call.get("arguments", {})} for call in blocks
    ]
    run["messages"].append(
        {"role": "assistant", "content": reply.content if reply.tool_calls else "", "tool_calls": parsed}
    )
    for call in parsed:
        arguments = call["arguments"] if isinstance(call["arguments"], dict) else {}
        result = run_tool(call["name"], arguments)
        valid = call["name"] in names and call["name"] in TOOLS and TOOLS[call["name"]].valid_arguments(arguments)
        run["calls"][-1].append({"name": call["name"], "valid": valid, "error": '"error"' in result[:10]})
        run["messages"].append({"role": "tool", "content": result})
    return not last


def solved(run: dict, row: dict) -> bool:
    """Every `gt` item is in the trajectory's final answer."""
    return set(map(str, row["gt"])) <= gt_found(run["final"], row["gt"])


def evaluate_agent(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    max_turns: int = 3,
    max_new_tokens: int = 256,
    batch_size: int = 32,
) -> dict:
    """Tool-use figures of greedy trajectories over agent rows (see the module doc)."""
    per_tool: dict[str, Counter] = {}
    n_solved = replies = replies_with_valid_call = unfinished = 0
    samples = []
    for start in tqdm(range(0, len(rows), batch_size), desc="agent", unit="batch"):
        batch = rows[start : start + batch_size]
        for row, run in zip(batch, run_agents(model, tokenizer, batch, max_turns, max_new_tokens), strict=True):
            ok = solved(run, row)
            n_solved += ok
            unfinished += run["unfinished"]
            replies += len(run["turns"])
            for made in run["calls"]:
                replies_with_valid_call += any(call["valid"] for call in made)
                for call in made:
                    counts = per_tool.setdefault(call["name"], Counter())
                    counts["calls"] += 1
                    counts["valid_calls"] += call["valid"]
                    counts["errors"] += call["error"]
            for schema in row["tools"]:
                counts = per_tool.setdefault(schema.get("function", schema).get("name"), Counter())
                counts["rows"] += 1
                counts["solved"] += ok
            samples.append({"prompt": row["prompt"], "gt": row["gt"], "turns": run["turns"], "solved": ok})
    n = len(rows)
    tools = {
        name: {**{k: counts[k] for k in ("rows", "solved", "calls", "valid_calls", "errors")},
               "solved_rate": counts["solved"] / counts["rows"] if counts["rows"] else None}
        for name, counts in sorted(per_tool.items())
    }  # fmt: skip
    return {
        "n": n,
        "solved": n_solved,
        "solved_rate": n_solved / n if n else math.nan,
        "valid_call_share": replies_with_valid_call / replies if replies else math.nan,
        "unfinished_share": unfinished / n if n else math.nan,
        "tools": tools,
        "samples": samples,
    }


def format_agent_table(results: dict) -> str:
    lines = [f"{'tool':<22}{'rows':>6}{'solved':>9}{'calls':>7}{'valid':>7}{'errors':>8}"]
    for name, row in results["tools"].items():
        rate = "" if row["solved_rate"] is None else f"{100 * row['solved_rate']:.1f}%"
        lines.append(f"{name:<22}{row['rows']:>6}{rate:>9}{row['calls']:>7}{row['valid_calls']:>7}{row['errors']:>8}")
    lines.append(f"solved: {results['solved']}/{results['n']} ({100 * results['solved_rate']:.1f}%)")
    lines.append(f"replies with a valid call: {100 * results['valid_call_share']:.1f}%")
    lines.append(f"unfinished: {100 * results['unfinished_share']:.1f}%")
    return "\n".join(lines)


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
    parser.add_argument("--max_turns", type=positive_int, default=3, help="agent rows: replies per trajectory")
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

    if not args.sft and Path(args.data).is_file() and is_agent_file(args.data):
        return _main_agent(args, parser)
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


def _main_agent(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    try:
        rows = load_agent_rows(args.data)
        rows = (sample_rows(rows, args.sample, args.seed) if args.sample else rows)[: args.limit]
    except (DataError, FileNotFoundError) as err:
        parser.exit(1, f"error: {err}\n")
    model, tokenizer = load_from_args(args, parser)
    results = evaluate_agent(model, tokenizer, rows, args.max_turns, args.max_new_tokens, args.batch_size)
    samples = results.pop("samples")
    results["samples"] = samples[: args.samples]
    print(format_agent_table(results))
    if args.out:
        record = {"model": args.model, "data": args.data, **results}
        for key in ("solved_rate", "valid_call_share", "unfinished_share"):
            record[key] = None if isinstance(record[key], float) and math.isnan(record[key]) else record[key]
        Path(args.out).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
