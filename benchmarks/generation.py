"""GRPO's cost is generation: completions per second of the demo-sized MiniMind on this machine, path by path.

    python benchmarks/generation.py --out benchmarks/results/generation_cpu.json
    python benchmarks/generation.py --model out/demo/sft --max_new_tokens 16

Without vLLM, TRL's `GRPOTrainer` generates with `model.generate` (`_generate_single_turn`): once every
`steps_per_generation` optimizer steps, one left-padded batch of the whole generation batch (`generation_batch_size`
completions: its prompts, each repeated `num_generations` times), KV cache on (`DynamicCache`), sampling with its
own `GenerationConfig`, in the model's dtype (float32 here: generation runs outside the training autocast). This
benchmark times the same call on the same prompts at several batch sizes, and the slower paths it replaces:

- `no_cache_1`: one completion at a time, recomputing the whole prefix every token (`use_cache=False`);
- `cache_1`: one completion at a time with the KV cache;
- `cache_B`: B completions in one batched `generate` (B = num_generations = one prompt's group; B = the
  generation batch of `recipes/demo/grpo.yaml`; larger);
- `cache_B_bf16`: the same batch under bf16 autocast (what the weights would see if generation ran inside it).

Every completion is forced to `--max_new_tokens` tokens (`min_new_tokens`), so that paths compare on equal work
whatever the weights; the reported rate is completions (and new tokens) per second, best of `--repeat` runs (a
shared machine only ever slows a run down). The model is fresh (demo sizes: hidden 256, 4 layers, 4 heads, 2 KV
heads, vocabulary 2048) unless `--model` names one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import GenerationConfig

from minimind_hf.configuration_minimind import MiniMindConfig
from minimind_hf.loading import load_model
from minimind_hf.modeling_minimind import MiniMindForCausalLM
from minimind_hf.tokenizer import load_tokenizer

DEMO_SIZES = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 2048,
}


def prompts(path: Path, tokenizer, n: int) -> list[list[int]]:
    """The first `n` prompts of a GRPO/eval file, rendered as GRPOTrainer renders them."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]
    return [
        tokenizer.apply_chat_template(row["conversations"][:-1], add_generation_prompt=True, return_dict=False)
        for row in rows
    ]


def generation_config(tokenizer, max_new_tokens: int, use_cache: bool) -> GenerationConfig:
    """GRPOTrainer's own sampling config (its `generation_kwargs` without vLLM), with the length forced."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=0.8,
        top_p=1.0,
        top_k=0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id],
        use_cache=use_cache,
        disable_compile=True,
    )


def left_padded(batch: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in batch])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in batch])
    return {"input_ids": ids, "attention_mask": mask}


def time_path(model, tokenizer, prompt_ids, batch: int, total: int, max_new_tokens: int, cache: bool, bf16: bool):
    """Seconds to generate `total` completions in batches of `batch` (each prompt repeated, as GRPO groups are)."""
    config = generation_config(tokenizer, max_new_tokens, cache)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    start = time.perf_counter()
    done, index = 0, 0
    with torch.no_grad(), context:
        while done < total:
            rows = [prompt_ids[(index + i // 8) % len(prompt_ids)] for i in range(batch)]
            index += max(1, batch // 8)
            out = model.generate(**left_padded(rows, tokenizer.pad_token_id), generation_config=config)
            assert out.shape[1] - max(len(r) for r in rows) == max_new_tokens
            done += batch
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="an HF model directory (default: a fresh demo-sized model)")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--data", default="data/grpo.jsonl", help="prompts (eval-format or RLAIF rows)")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--batches", default="8,64,128", help="batch sizes of the batched path")
    parser.add_argument("--total", type=int, default=128, help="completions per measurement (batched paths)")
    parser.add_argument("--single_total", type=int, default=16, help="completions per one-at-a-time measurement")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.model:
        model = load_model(args.model)
    else:
        model = MiniMindForCausalLM(MiniMindConfig(**DEMO_SIZES))
    model.eval()
    prompt_ids = prompts(Path(args.data), tokenizer, 64)
    paths = [("no_cache_1", 1, False, False), ("cache_1", 1, True, False)]
    for b in (int(x) for x in args.batches.split(",")):
        paths += [(f"cache_{b}", b, True, False), (f"cache_{b}_bf16", b, True, True)]

    time_path(model, tokenizer, prompt_ids, 8, 8, 4, True, False)  # warm-up
    results = {}
    for name, batch, cache, bf16 in paths:
        total = args.single_total if batch == 1 else max(args.total, batch)
        seconds = min(
            time_path(model, tokenizer, prompt_ids, batch, total, args.max_new_tokens, cache, bf16)
            for _ in range(args.repeat)
        )
        results[name] = {
            "batch": batch,
            "kv_cache": cache,
            "bf16_autocast": bf16,
            "completions": total,
            "seconds": round(seconds, 3),
            "completions_per_s": round(total / seconds, 2),
            "new_tokens_per_s": round(total * args.max_new_tokens / seconds, 1),
        }
        print(f"{name:>16}: {results[name]['completions_per_s']:8.2f} completions/s")
    report = {
        "model": args.model or f"fresh {DEMO_SIZES}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_new_tokens": args.max_new_tokens,
        "mean_prompt_tokens": round(sum(map(len, prompt_ids)) / len(prompt_ids), 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
