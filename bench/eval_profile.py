"""Benchmark: where greedy decoding spends its time in the evaluation stage (torch profiler, CPU).

Asks the base model the first 64 questions of the forgetting probe in one batch, as the evaluation
does, and records the wall time of 32 new tokens and the profiler's top operators for 16 new tokens.

    python bench/eval_profile.py --base $AGENTPEFT_HOME/models/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="the base model folder")
    parser.add_argument("--out", default=str(RESULTS / "eval_profile.json"))
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from agentpeft.models import load_model, load_tokenizer
    from agentpeft.pipeline.evaluate import chat_rows, forgetting_probe, generate

    model, tokenizer = load_model(args.base).eval(), load_tokenizer(args.base)
    prompts = [r["prompt"] for r in chat_rows(forgetting_probe(), None)[:64]]
    start = time.perf_counter()
    generate(model, tokenizer, prompts, 32, 64)
    seconds = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, tokenizer, prompts, 16, 64)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
              "batch": len(prompts), "seconds_32_new_tokens": round(seconds, 2),
              "top_ops_16_new_tokens": [{"op": e.key, "self_share": round(e.self_cpu_time_total / total, 3),
                                         "calls": e.count, "avg_ms": round(e.self_cpu_time_total / e.count / 1e3, 3)}
                                        for e in events[:8]]}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
