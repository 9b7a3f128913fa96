"""lm-evaluation-harness hooks for `minimind_eval`: the held-out rows of `data/eval.jsonl`, scored as
`python -m minimind_hf.evaluate` scores them.

Rows are read and validated by `minimind_hf.evaluate.load_eval_rows`. The prompt is every message before the
last one, rendered with MiniMind's chat template and its generation prompt; the harness must not apply a chat
template of its own (no `--apply_chat_template`). The template is `minimind_hf.tokenizer.CHAT_TEMPLATE`, the one
`load_tokenizer` gives every MiniMind tokenizer (the original's renders the same text). A reply is right when
it equals `answer`, both stripped, by `minimind_hf.evaluate.score` itself.

`--metadata '{"data": "other.jsonl"}'` evaluates another file with the same task names.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import datasets
from transformers.utils.chat_template_utils import render_jinja_template

from minimind_hf.evaluate import load_eval_rows, score
from minimind_hf.tokenizer import CHAT_TEMPLATE

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "data" / "eval.jsonl"
# One harness subtask per task of data/eval.jsonl (the `*.yaml` beside this file).
TASKS = ("add", "capital", "colour", "compare", "convert", "count", "parity", "sound")


@cache
def _rows(data: str) -> tuple[dict, ...]:
    rows = load_eval_rows(data)
    unknown = sorted({row["task"] for row in rows} - set(TASKS))
    if unknown:
        raise ValueError(
            f"{data}: rows of tasks {unknown} have no minimind_eval subtask (known: {', '.join(TASKS)}); "
            "add a yaml for each beside minimind_eval.yaml"
        )
    return tuple(rows)


def load_rows(task: str, data: str | None = None, **_metadata) -> datasets.DatasetDict:
    """The `test` split: the rows of `data` (default: the shipped `data/eval.jsonl`) whose task is `task`."""
    path = str(data or DEFAULT_DATA)
    rows = [
        {"line": row["line"], "task": row["task"], "prompt": row["prompt"], "answer": row["answer"]}
        for row in _rows(path)
        if row["task"] == task
    ]
    if not rows:
        raise ValueError(f"{path}: no rows of task {task!r}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_text(doc: dict) -> str:
    rendered, _ = render_jinja_template([doc["prompt"]], chat_template=CHAT_TEMPLATE, add_generation_prompt=True)
    return rendered[0]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": score(results[:1], [doc])["overall"]["exact_match"]}
