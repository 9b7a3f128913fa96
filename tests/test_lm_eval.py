"""The shipped lm-evaluation-harness task `minimind_eval` scores a model exactly as `minimind_hf.evaluate` does."""

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from minimind_hf import MiniMindConfig, MiniMindForCausalLM
from minimind_hf import evaluate as evaluate_module
from minimind_hf.evaluate import load_eval_rows, predict
from minimind_hf.tokenizer import load_tokenizer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "minimind_hf" / "lm_eval_tasks"
MAX_NEW_TOKENS = 16
ROWS_PER_TASK = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> dict:
    """A tiny random model saved as an HF directory, and an eval file built from `data/eval.jsonl` on which it
    scores differently per task: in the k-th task the first k % 4 rows get the model's own greedy reply as
    their answer, so both scorers must reproduce its generations exactly to agree."""
    torch.manual_seed(0)
    config = MiniMindConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2
    )
    model = MiniMindForCausalLM(config).eval()
    tokenizer = load_tokenizer(tokenizer_dir)
    root = tmp_path_factory.mktemp("tiny_lm_eval")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")

    by_task = defaultdict(list)
    for row in load_eval_rows(REPO / "data" / "eval.jsonl"):
        if len(by_task[row["task"]]) < ROWS_PER_TASK:
            by_task[row["task"]].append(row)
    rows = [row for task in sorted(by_task) for row in by_task[task]]
    predictions = predict(model, tokenizer, rows, MAX_NEW_TOKENS, batch_size=32)
    lines = []
    for k, task in enumerate(sorted(by_task)):
        for i, row in enumerate(by_task[task]):
            prediction = predictions[rows.index(row)]
            answer = prediction if i < k % 4 and prediction.strip() else row["answer"]
            conversations = [*row["prompt"], {"role": "assistant", "content": answer}]
            lines.append(
                json.dumps({"conversations": conversations, "task": task, "answer": answer}, ensure_ascii=False)
            )
    data = root / "eval.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"model": root / "model", "data": data, "predictions": predictions, "rows": rows}


@pytest.mark.slow
def test_lm_eval_scores_equal_minimind_evaluate_per_task(tiny):
    ours = evaluate_module.main(
        ["--model", str(tiny["model"]), "--data", str(tiny["data"]), "--max_new_tokens", str(MAX_NEW_TOKENS)]
    )
    harness = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny["model"]), "dtype": "float32"},
        tasks=["minimind_eval"],
        task_manager=TaskManager(include_path=str(TASKS_DIR), metadata={"data": str(tiny["data"])}),
        gen_kwargs={"max_gen_toks": MAX_NEW_TOKENS},
        batch_size=4,
        device="cpu",
        log_samples=True,
    )
    per_task = {task: harness["results"][f"minimind_eval_{task}"]["exact_match,none"] for task in ours["tasks"]}
    assert per_task == {task: row["exact_match"] for task, row in ours["tasks"].items()}
    assert {task: harness["n-samples"][f"minimind_eval_{task}"]["effective"] for task in ours["tasks"]} == {
        task: row["n"] for task, row in ours["tasks"].items()
    }
    assert harness["groups"]["minimind_eval"]["exact_match,none"] == pytest.approx(ours["overall"]["exact_match"])
    assert len(set(per_task.values())) >= 3, f"the scores should differ between tasks: {per_task}"

    # The generations themselves are the same strings (rows of the harness keep the file's order per task).
    replies = [
        sample["resps"][0][0]
        for task in sorted(ours["tasks"])
        for sample in sorted(harness["samples"][f"minimind_eval_{task}"], key=lambda s: s["doc_id"])
    ]
    assert replies == tiny["predictions"]


def test_prompt_is_the_tokenizers_chat_template_with_generation_prompt(tiny, tokenizer_dir):
    from minimind_hf.lm_eval_tasks.minimind_eval.utils import doc_to_text

    tokenizer = load_tokenizer(tokenizer_dir)
    for row in tiny["rows"]:
        assert doc_to_text(row) == tokenizer.apply_chat_template(
            row["prompt"], tokenize=False, add_generation_prompt=True
        )
    assert any(row["prompt"][0]["role"] == "system" or len(row["prompt"]) > 1 for row in tiny["rows"])


def test_rows_of_a_task_without_a_subtask_are_an_error_not_dropped(tmp_path):
    from minimind_hf.lm_eval_tasks.minimind_eval.utils import load_rows

    row = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({**row, "task": "poetry", "answer": "yo"}) + "\n")
    with pytest.raises(ValueError, match=r"tasks \['poetry'\] have no minimind_eval subtask"):
        load_rows("add", data=str(data))
