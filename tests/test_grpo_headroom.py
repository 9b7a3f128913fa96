"""benchmarks/grpo_headroom.py: pass@k is scored per prompt against that prompt's own answer."""

import json
from pathlib import Path

import torch

from minimind_hf import MiniMindConfig, MiniMindForCausalLM
from minimind_hf.evaluate import load_eval_rows, predict
from minimind_hf.testing import load_script
from minimind_hf.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
grpo_headroom = load_script(REPO / "benchmarks" / "grpo_headroom.py")


def test_near_greedy_sampling_scores_what_greedy_scores(tmp_path):
    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model, tokenizer = MiniMindForCausalLM(config).eval(), load_tokenizer(REPO / "data" / "tokenizer")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    questions = [f"{a} + {b}?" for a in range(3) for b in range(2)]
    rows = [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": "?"}]}
            for q in questions]  # fmt: skip
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({**r, "task": "add", "answer": "?"}) + "\n" for r in rows))
    greedy = predict(model, tokenizer, load_eval_rows(data), max_new_tokens=3, batch_size=8)
    # Half the rows expect what the model says greedily, half something it cannot say.
    with data.open("w") as f:
        for number, (row, reply) in enumerate(zip(rows, greedy, strict=True)):
            f.write(json.dumps({**row, "task": "add", "answer": reply if number % 2 else "no such reply"}) + "\n")

    out = tmp_path / "headroom.json"
    argv = ["--model", str(tmp_path / "model"), "--data", str(data), "--k", "3", "--temperature", "1e-6"]
    results = grpo_headroom.main([*argv, "--max_new_tokens", "3", "--out", str(out)])
    assert results["greedy"]["overall"]["correct"] == 3
    assert results["pass@3"]["overall"]["correct"] == 3
    assert json.loads(out.read_text())["pass@3"]["overall"]["exact_match"] == 0.5
