"""Benchmark: generation speed of a merged model against the base plus its unmerged LoRA adapter.

Trains a short QLoRA adapter on the support-bot dataset through agentpeft's train stage (the recipe's
settings, ``--steps`` steps), then alternately (A B A B ...) loads it merged (``load_tuned(merge=True)``)
and unmerged, both in fp32, and where the CPU computes bf16 natively also merged and set up as
``load_llm`` serves it (``for_inference``: bf16 matmuls), and times greedy generation of ``--new-tokens``
tokens for a batch of held-out questions (agentpeft's batched ``generate``). Reports generated tokens per
second for each and the ratios.

    OMP_NUM_THREADS=2 python bench/inference.py --steps 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="training steps for the adapter")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--base", help="model folder (default: the smollm2-135m alias)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "inference.json"))
    args = parser.parse_args()

    from datasets import load_from_disk

    from agentpeft.models import for_inference, inference_bf16, inference_precision, load_tokenizer, load_tuned, \
        resolve_base
    from agentpeft.pipeline.dataset import build_dataset
    from agentpeft.pipeline.evaluate import generate
    from agentpeft.pipeline.ingest import ingest
    from agentpeft.pipeline.train import train
    from agentpeft.recipe import configure

    base = Path(args.base) if args.base else resolve_base("smollm2-135m")
    recipe = configure("support-bot", max_steps=args.steps)
    tokenizer = load_tokenizer(base)
    kinds = {"merged": (True, False), "unmerged": (False, False)}  # (merge, bf16 inference)
    if inference_bf16():
        kinds["merged, served"] = (True, True)
    rows = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        data = build_dataset(ingest(recipe.kb_path), recipe.data.generators, tokenizer, recipe.system_prompt,
                             Path(tmp) / "data").path
        adapter = train(base, data, Path(tmp) / "run", recipe.train, log=lambda s: None).adapter_dir
        held_out = [s for s in load_from_disk(str(data)) if s != "train"][0]
        questions = load_from_disk(str(data))[held_out].select(range(args.questions))
        chats = [[{"role": "system", "content": recipe.system_prompt}, {"role": "user", "content": q}]
                 for q in questions["question"]]
        for _ in range(args.rounds):
            for kind, (merge, served) in kinds.items():
                model = load_tuned(base, adapter, merge=merge)
                model = for_inference(model) if served else model
                start = time.perf_counter()
                replies = generate(model, tokenizer, chats, args.new_tokens)
                seconds = time.perf_counter() - start
                tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
                rows[kind].append({"seconds": round(seconds, 2), "tokens": tokens,
                                   "tokens_per_second": round(tokens / seconds, 1)})
                print(kind, rows[kind][-1], flush=True)
    summary = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in rows.items()}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": base.name,
              "questions": args.questions, "new_tokens": args.new_tokens, "tokens_per_second": summary,
              "ratio_merged_to_unmerged": round(summary["merged"] / summary["unmerged"], 3),
              **({"served_precision": inference_precision(),
                  "ratio_served_to_merged": round(summary["merged, served"] / summary["merged"], 3)}
                 if "merged, served" in summary else {}), "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
