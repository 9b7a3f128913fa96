"""Time, memory and disk from a JSON Lines SFT file to the dataset the trainer trains on.

    python benchmarks/data_loading.py --samples 100000 --out benchmarks/results/data_loading_100k.json
    python benchmarks/data_loading.py --samples 1000000 --num_proc 2 --out benchmarks/results/data_loading_1m.json

Writes `--samples` synthetic conversations with the length mix of MiniMind's `sft_mini_512` (`make_bench_data.py`
with a median of 140 tokens: mean about 172, a tail past 512), then, each in a fresh process with an empty datasets
cache, runs the SFT recipe's data path as `run_recipe` does (`recipes/sft.py`'s `load_datasets`, then TRL's
`SFTTrainer` preparation: packing into rows of `max_length`) up to the first optimizer step of a tiny model, twice:
cold (empty cache) and warm (the cache of the first run). Reported per run: seconds to the trainer-ready dataset
and to the end of the first step, the peak resident memory of the process and of its dataset workers, the size of
the datasets cache against the input file, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import make_bench_data  # noqa: E402

# make_bench_data's median of 130 tokens gives a mean of about 160; MiniMind's sft_mini_512 averages about 172.
MEDIAN_TOKENS = 140


class _MemoTemplate:
    """The tokenizer's chat template with the rendered length of each conversation skeleton memoised:
    `make_conversation` measures the skeleton of every conversation, and there are only a few dozen of them."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def apply_chat_template(self, messages, **kwargs):
        key = tuple((m["role"], m["content"]) for m in messages)
        if key not in self.cache:
            self.cache[key] = self.tokenizer.apply_chat_template(messages, **kwargs)
        return self.cache[key]


def write_data(path: Path, tokenizer, samples: int, seed: int = 0) -> Path:
    """`samples` conversations of `make_bench_data.make_conversation`, deterministic for a seed."""
    make_bench_data.MEDIAN_TOKENS = MEDIAN_TOKENS
    pools = make_bench_data.ZH_QUESTIONS + make_bench_data.ZH_SENTENCES
    pools += make_bench_data.EN_QUESTIONS + make_bench_data.EN_SENTENCES
    costs = {text: len(tokenizer.encode(text, add_special_tokens=False)) for text in pools}
    rng, memo = random.Random(seed), _MemoTemplate(tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(samples):
            f.write(json.dumps(make_bench_data.make_conversation(rng, memo, costs), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _peak_rss_mb() -> tuple[float, float]:
    """Peak resident set of this process and of the largest of its finished child processes (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def _cpu_seconds() -> float:
    """User and system CPU time of this process and of its finished children (the dataset workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(data: Path, work: Path, num_proc: int | None, max_length: int, skip_invalid: bool = False) -> dict:
    """One run of the recipe's data path in this process, up to the end of the first optimizer step."""
    start = time.perf_counter()
    os.environ["HF_DATASETS_CACHE"] = str(work / "cache")
    import datasets
    from transformers import TrainerCallback

    from minimind_hf.stages.sft import SFT
    from minimind_hf.tokenizer import load_tokenizer
    from minimind_hf.training import PROJECT_DEFAULTS, Stage, parse_recipe
    from minimind_hf.training import load_recipe_model as load_model

    datasets.disable_progress_bars()
    imported = time.perf_counter()
    argv = ["--data_path", str(data), "--output_dir", str(work / "out"), "--max_length", str(max_length),
            "--hidden_size", "32", "--num_hidden_layers", "2", "--config_overrides",
            "num_attention_heads=4,num_key_value_heads=2", "--per_device_train_batch_size", "4", "--max_steps", "1",
            "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
            "--dataloader_num_workers", "0"]  # fmt: skip
    if num_proc is not None:
        argv += ["--dataset_num_proc", str(num_proc)]
    if skip_invalid:
        argv += ["--skip_invalid", "true"]
    stage: Stage = SFT
    args, training_args = parse_recipe((stage.arguments_class, stage.config_class), argv, stage.defaults)
    assert PROJECT_DEFAULTS["packing"] and training_args.packing
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or "data/tokenizer")
    train, _ = stage.load_datasets(args, training_args, tokenizer)
    loaded = time.perf_counter()
    report = train.load_report
    model = load_model(args)
    trainer = stage.build_trainer(model, tokenizer, training_args, train, None, [], args)
    ready = time.perf_counter()
    first_step = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            first_step.setdefault("t", time.perf_counter())

    trainer.add_callback(FirstStep())
    trainer.train()
    own, children = _peak_rss_mb()
    packed = trainer.train_dataset
    return {
        "seconds_import": round(imported - start, 2),
        "seconds_to_tokenized_dataset": round(loaded - start, 2),
        "seconds_to_trainer_ready_dataset": round(ready - start, 2),
        "seconds_to_first_step": round(first_step["t"] - start, 2),
        "peak_rss_mb": round(own, 1),
        "peak_rss_worker_mb": round(children, 1),
        "conversations": report.lines,
        "dropped_unsupervised": report.skipped.get("unsupervised", 0),
        "git_commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "tokenized_rows": len(train),
        "packed_rows": len(packed),
        "tokens": int(sum(packed.with_format("arrow")["seq_lengths"].combine_chunks().flatten().to_numpy())),
        "cpu_seconds": round(_cpu_seconds(), 1),
        "cache_bytes": _tree_bytes(work / "cache"),
        "features": {name: str(feature) for name, feature in train.features.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--num_proc", type=int, default=None, help="dataset_num_proc (default: the recipe's)")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--work_dir", default="out/bench_data_loading")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--skip_invalid", action="store_true", help="the recipe's skip_invalid (older loaders)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), work, args.num_proc, args.max_length, args.skip_invalid)))
        return

    from minimind_hf.tokenizer import load_tokenizer

    data = work / f"sft_{args.samples}.jsonl"
    if not data.is_file():
        started = time.perf_counter()
        write_data(data, load_tokenizer(REPO / "data" / "tokenizer"), args.samples)
        print(f"wrote {data} in {time.perf_counter() - started:.0f} s")
    shutil.rmtree(work / "cache", ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    runs = {}
    for name in ("cold", "warm"):
        load_before = os.getloadavg()
        command = [sys.executable, __file__, "--measure", str(data), "--work_dir", str(work)]
        command += ["--max_length", str(args.max_length)]
        command += ["--num_proc", str(args.num_proc)] if args.num_proc is not None else []
        command += ["--skip_invalid"] if args.skip_invalid else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, check=False)
        if result.returncode != 0:
            sys.exit(f"{name} run failed:\n{result.stderr[-4000:]}")
        runs[name] = json.loads(result.stdout.strip().splitlines()[-1])
        runs[name]["load_average_before"] = [round(x, 2) for x in load_before]
        runs[name]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        print(name, json.dumps(runs[name], indent=1))
    size = data.stat().st_size
    report = {
        "samples": args.samples,
        "input_bytes": size,
        "num_proc": args.num_proc,
        "max_length": args.max_length,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cache_vs_input": round(runs["warm"]["cache_bytes"] / size, 2),
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
