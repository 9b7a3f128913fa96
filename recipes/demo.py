"""The whole MiniMind-3 path on the shipped data, in minutes on a CPU: pretrain, SFT, agent RL, DPO, LoRA, GRPO,
score, chat, plot.

    make demo          # or: python recipes/demo.py [--out out/demo]

The demo is a list of stages (`STAGES`); each trains with the project's own command line, run as a subprocess
exactly as a user would type it (under `torch.distributed.run`, 2 processes), so the demo is also a check that the
documented commands work together. After each stage, `python -m minimind_hf.evaluate` (its `main`, called in
this process) scores the stage's model twice by exact match, per task:
"fit" on a seeded sample of the SFT data it learnt from, "held-out" on data/eval.jsonl (question wordings and
number items that no training file contains); the SFT and agent models are also run with the tools on
data/eval_agent.jsonl (held-out tool tasks: solved when the final answer holds the tool's value). To add a stage,
write `recipes/<name>.py` and `recipes/demo/<name>.yaml` and append a `DemoStage` naming the stage whose model
it starts from (`source`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import openai

from minimind_hf import chat, evaluate, plot
from minimind_hf.agent_client import run_with_tools

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of Amberland?", "Is 7 odd or even?", "4 plus 5 equals what?", "猫会怎么叫？"]
FIT = ["--data", "data/sft.jsonl", "--sft", "--sample", "320", "--seed", "0"]  # the fit sample: 320 SFT rows
HELD_OUT = ["--data", "data/eval.jsonl"]
# Every training stage runs as 2 single-threaded processes (DDP over gloo): on a model this small they do ~1.2x
# the steps of one process with 2 threads (docs/demo_experiments.md), so the demo's recipes give each process
# half of a step's rows. Two processes whatever the cores, so the figures do not depend on the machine.
PROCESSES = 2


MAX_NEW_TOKENS = "16"  # enough for every bare answer
AGENT_MAX_NEW_TOKENS = "64"  # per turn of a tool task: a call is ~30 tokens


@dataclass
class DemoStage:
    """One training run of the demo: `recipes/<name>.py --config recipes/demo/<name>.yaml`, starting from the model
    of the stage `source` (if any) and writing its own to `{out}/<name>`, which is then scored."""

    name: str
    title: str
    source: str | None = None
    extra: tuple[str, ...] = ()  # more evaluation files this stage's model is scored on (by file stem)

    def command(self, out: Path) -> list[str]:
        """The stage's recipe under `torch.distributed.run`, replacing what an earlier demo left in its output."""
        start = ["--model_name_or_path", str(out / self.source)] if self.source else []
        recipe = [f"recipes/{self.name}.py", "--config", f"recipes/demo/{self.name}.yaml", *start]
        # --standalone: a free rendezvous port, so two demos can run side by side.
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}"]
        return [*launcher, *recipe, "--output_dir", str(out / self.name), "--overwrite_output_dir", "true"]


STAGES = [
    DemoStage("pretrain", "pretrain a small MiniMind-3 on data/pretrain.jsonl and data/pretrain_tools.jsonl"),
    DemoStage(
        "sft",
        "SFT from the pretrained model on data/sft.jsonl and data/tool_sft.jsonl",
        "pretrain",
        extra=("data/eval_agent.jsonl", "data/identity_eval.jsonl"),
    ),
    DemoStage(
        "agent",
        "agent RL from the SFT model on data/agent_rl.jsonl: call a tool, read its reply, answer",
        "sft",
        extra=("data/eval_agent.jsonl",),
    ),
    DemoStage(
        "dpo", "DPO from the SFT model on data/dpo.jsonl (right answer preferred to a plausible wrong one)", "sft"
    ),
    DemoStage(
        "lora",
        "LoRA on the SFT model: its name and maker (data/lora_identity.jsonl); the SFT model stays as it was",
        "sft",
        extra=("data/identity_eval.jsonl",),
    ),
    DemoStage("grpo", "GRPO from the SFT model on data/grpo.jsonl, rewarded by exact match", "sft"),
]
CHAT_MODEL = "sft"  # the stage whose model answers the demo's chat prompts


def run(title: str, *args: str) -> float:
    """Run `python *args` with one OpenMP thread per process (see PROCESSES); the seconds it took."""
    print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
    start = time.time()
    subprocess.run([sys.executable, *args], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.time() - start


def call(title: str, main: Callable[[list[str]], object], module: str, *args: str) -> float:
    """`python -m module *args`, run in this process through the module's `main(argv)`: the same code without a new
    interpreter's start-up (5-6 s each, ~1.5 minutes over the demo's scoring, chats and plots); the seconds it
    took."""
    print(f"\n=== {title}\n$ -m {module} {' '.join(args)}", flush=True)
    start = time.time()
    main(list(args))
    return time.time() - start


def score(stage: DemoStage, out: Path) -> tuple[dict, float]:
    """The stage's model scored on the fit sample and on the held-out set: ({"fit": ..., "held_out": ...}, s)."""
    results, seconds = {}, 0.0
    extra = [(Path(path).stem, ["--data", path]) for path in stage.extra]
    for kind, data in (("fit", FIT), ("held_out", HELD_OUT), *extra):
        path = out / f"eval_{stage.name}_{kind}.json"
        tokens = AGENT_MAX_NEW_TOKENS if evaluate.is_agent_file(data[1]) else MAX_NEW_TOKENS
        seconds += call(
            f"score {stage.name} ({kind.replace('_', '-')})", evaluate.main, "minimind_hf.evaluate",
            "--model", str(out / stage.name), *data, "--max_new_tokens", tokens, "--out", str(path),
        )  # fmt: skip
        results[kind] = json.loads(path.read_text(encoding="utf-8"))
    return results, seconds


def serve_round_trip(model: Path, rows: int = 16) -> dict:
    """`python -m minimind_hf.serve <model>` in its own process, asked by the `openai` client with the tools of the
    first `rows` held-out tool tasks, plain and streamed: the client runs the calls the server returns and sends
    their results (`agent_client.run_with_tools`). A task counts when the final answer holds every `gt` item."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "minimind_hf.serve", str(model), "--port", str(port), "--log_level", "warning"]
    server = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "2"})
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:  # until the server answers
            try:
                api.models.list()
                break
            except openai.APIConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(argv)} did not start") from None
                time.sleep(0.5)
        solved = {"plain": 0, "streamed": 0}
        for row in evaluate.load_agent_rows("data/eval_agent.jsonl")[:rows]:
            for kind in solved:
                answer, _ = run_with_tools(
                    api, str(model), row["prompt"], row["tools"], stream=kind == "streamed", temperature=0,
                    max_tokens=int(AGENT_MAX_NEW_TOKENS),
                )  # fmt: skip
                solved[kind] += all(str(item) in answer for item in row["gt"])
        print(f"served {model}: tool tasks solved through the openai client: {solved} of {rows} each")
        return {"rows": rows, **solved}
    finally:
        server.terminate()
        server.wait(timeout=30)


def percent(result: dict) -> str:
    """Exact match of a scored file, or the solved share of a tool-task file."""
    if "solved_rate" in result:
        return f"{100 * result['solved_rate']:.0f}%"
    return f"{100 * (result['overall'] if 'overall' in result else result)['exact_match']:.0f}%"


def summary(scores: dict[str, dict], timings: dict[str, float]) -> str:
    """Fit and held-out exact match of every scored stage, overall, per held-out kind and per task."""
    tasks = sorted({task for s in scores.values() for task in s["held_out"]["tasks"]})
    kinds = sorted({kind for s in scores.values() for kind in s["held_out"].get("held_out", {})})
    extras = sorted({name for s in scores.values() for name in s} - {"fit", "held_out"})
    header = ["stage", "fit", "held-out", *[f"[{kind}]" for kind in kinds], *tasks, *extras]
    lines = ["  ".join(f"{h:>9}" for h in header)]
    for name, s in scores.items():
        held = s["held_out"]
        cells = [name, percent(s["fit"]["overall"]), percent(held["overall"])]
        cells += [percent(held["held_out"][kind]) if kind in held.get("held_out", {}) else "-" for kind in kinds]
        cells += [percent(held["tasks"][task]) if task in held["tasks"] else "-" for task in tasks]
        cells += [percent(s[name]) if name in s else "-" for name in extras]
        lines.append("  ".join(f"{c:>9}" for c in cells))
    fit_tasks = "; ".join(
        f"{name}: " + ", ".join(f"{task} {percent(r)}" for task, r in s["fit"]["tasks"].items())
        for name, s in scores.items()
    )
    lines.append(f"fit per task ({FIT[FIT.index('--sample') + 1]} SFT rows) -- {fit_tasks}")
    lines.append("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    lines.append(f"total: {sum(timings.values()) / 60:.1f} min")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/demo", help="where the runs go")
    names = [stage.name for stage in STAGES]
    parser.add_argument(
        "--only", nargs="+", choices=names, default=names, help="run these stages (earlier ones' models must exist)"
    )
    args = parser.parse_args(argv)
    stages = [stage for stage in STAGES if stage.name in args.only]
    os.chdir(REPO)  # every path of the stages (data/, recipes/, --out) is relative to the repository
    out = Path(args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("SWANLAB_MODE", "local")
    # On a shared CPU, OpenMP threads that spin while waiting make training several times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    timings: dict[str, float] = {}
    scores: dict[str, dict] = {}
    served: dict = {}
    for number, stage in enumerate(stages, start=1):
        title = f"{number}/{len(stages)} {stage.title}"
        timings[stage.name] = run(title, *stage.command(out))
        scores[stage.name], timings[f"score_{stage.name}"] = score(stage, out)
    prompts = [item for prompt in PROMPTS for item in ("--prompt", prompt)]
    chat_args = ["--model", str(out / CHAT_MODEL), "--greedy", *prompts]
    timings["chat"] = call(f"chat with the {CHAT_MODEL} model", chat.main, "minimind_hf.chat", *chat_args)
    if any(stage.name == "lora" for stage in stages):
        who = ["--prompt", "Who are you?", "--prompt", "你是谁开发的？", "--prompt", "Is 7 odd or even?"]
        title = "chat with the LoRA adapter (name, maker, and a task it was not trained on)"
        lora_args = ["--model", str(out / "lora"), "--greedy", *who]
        timings["chat_lora"] = call(title, chat.main, "minimind_hf.chat", *lora_args)
    if any(stage.name == "agent" for stage in stages):
        start = time.time()
        print(f"\n=== serve the agent model; the openai client asks with tools\n$ -m minimind_hf.serve {out}/agent")
        served = serve_round_trip(out / "agent")
        timings["serve_agent"] = time.time() - start
    for stage in stages:
        title = f"plot the {stage.name} curves"
        timings[f"plot_{stage.name}"] = call(title, plot.main, "minimind_hf.plot", str(out / stage.name))

    text = summary(scores, timings)
    if served:
        text += f"\nserved agent, tool tasks solved through the openai client: {served}"
    print("\n=== summary (exact match: fit = a sample of the SFT data, held-out = data/eval.jsonl)\n" + text)
    (out / "summary.json").write_text(
        json.dumps({"scores": scores, "served": served, "timings": timings}, indent=2, ensure_ascii=False)
    )
    print(f"loss curves: {out}/*/loss.png; figures: {out}/summary.json")


if __name__ == "__main__":
    main()
