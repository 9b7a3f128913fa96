"""The whole MiniMind path on the shipped data, in minutes on a CPU: pretrain, SFT, score, chat, plot.

    make demo          # or: python recipes/demo.py [--out out/demo]

Each stage is the project's own command line, run as a subprocess exactly as a user would type it, so the
demo is also a check that the documented commands work together.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of Amberland?", "Is 7 odd or even?", "4 plus 5 equals what?", "猫会怎么叫？"]


def stage(title: str, *args: str) -> float:
    print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
    start = time.time()
    subprocess.run([sys.executable, *args], check=True, cwd=REPO)
    return time.time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/demo", help="where the runs go")
    args = parser.parse_args(argv)
    out = Path(args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("SWANLAB_MODE", "local")
    timings = {}
    timings["pretrain"] = stage(
        "1/5 pretrain a small MiniMind on data/pretrain.jsonl",
        "recipes/pretrain.py", "--config", "recipes/demo/pretrain.yaml", "--output_dir", str(out / "pretrain"),
    )  # fmt: skip
    timings["sft"] = stage(
        "2/5 SFT from the pretrained model on data/sft.jsonl",
        "recipes/sft.py", "--config", "recipes/demo/sft.yaml",
        "--model_name_or_path", str(out / "pretrain"), "--output_dir", str(out / "sft"),
    )  # fmt: skip
    scores = {}
    for name in ("pretrain", "sft"):
        result = out / f"eval_{name}.json"
        timings[f"eval_{name}"] = stage(
            f"3/5 score the {name} model on the held-out data/eval.jsonl",
            "-m", "minimind_hf.evaluate", "--model", str(out / name), "--data", "data/eval.jsonl", "--out", str(result),
        )  # fmt: skip
        scores[name] = json.loads(result.read_text())["overall"]
    prompts = [item for prompt in PROMPTS for item in ("--prompt", prompt)]
    timings["chat"] = stage("4/5 chat with the SFT model", "-m", "minimind_hf.chat", "--model", str(out / "sft"),
                            "--greedy", *prompts)  # fmt: skip
    for name in ("pretrain", "sft"):
        timings[f"plot_{name}"] = stage(f"5/5 plot the {name} curves", "-m", "minimind_hf.plot", str(out / name))

    print("\n=== summary")
    for name, score in scores.items():
        print(f"{name:>9}: exact match {score}")
    print("   timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"     total: {sum(timings.values()) / 60:.1f} min; loss curves: {out}/*/loss.png")


if __name__ == "__main__":
    main()
