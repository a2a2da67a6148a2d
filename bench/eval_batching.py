"""Benchmark: batched (left-padded) greedy generation against one prompt at a time.

Same model (the default base), same held-out support-bot questions, same greedy settings;
reports the speed-up and whether every answer is identical. Writes bench/results/eval_batching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from agentpeft.models import load_model, load_tokenizer, resolve_base
from agentpeft.pipeline.dataset import build_dataset
from agentpeft.pipeline.evaluate import generate
from agentpeft.pipeline.ingest import ingest
from agentpeft.recipe import get_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_batching.json"))
    args = parser.parse_args()

    recipe = get_recipe("support-bot")
    base = resolve_base(recipe.base_model)
    tokenizer = load_tokenizer(base)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "agentpeft-bench-eval"
    data = build_dataset(ingest(recipe.kb_path), recipe.data.generators, tokenizer, recipe.system_prompt, out)
    from datasets import load_from_disk

    prompts = [row["prompt"] for row in load_from_disk(str(data.path))["eval"]][: args.questions]
    model = load_model(base)
    generate(model, tokenizer, prompts[:2], 4, 2)  # warm-up
    timings, answers = {}, {}
    for label, batch in (("sequential", 1), ("batched", args.batch_size)):
        start = time.perf_counter()
        answers[label] = generate(model, tokenizer, prompts, args.max_new_tokens, batch)
        timings[label] = time.perf_counter() - start
    same = sum(a == b for a, b in zip(answers["sequential"], answers["batched"]))
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "questions": len(prompts), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "sequential_seconds": round(timings["sequential"], 1), "batched_seconds": round(timings["batched"], 1),
        "speedup": round(timings["sequential"] / timings["batched"], 2),
        "identical_answers": same,
        "differing": [{"sequential": a, "batched": b} for a, b in zip(answers["sequential"], answers["batched"]) if a != b],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "differing"}, indent=2))


if __name__ == "__main__":
    main()
