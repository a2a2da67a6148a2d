"""Benchmark: two set-ups of a model for generation, alternately (A B, B A, ...), on the evaluate stage's questions.

The model of the registered build ``--ref`` (its base, or with ``--tuned`` its merged model) is loaded and
set up as each variant says, then answers the build's held-out questions (recipe's system prompt, 48
new tokens) and the forgetting probe (32 new tokens) with agentpeft's batched ``generate``. A variant is
``NAME=JSON`` with code switches: ``"cast_head": true`` leaves the output head fp32 for autocast to cast
in every call (``for_inference`` before session 19), ``"fp32": true`` skips bf16 inference altogether.
Records seconds per run and whether every reply equals the first variant's. Writes
``bench/results/generate_ab.json`` (or ``--out``).

    AGENTPEFT_HOME=/tmp/H python bench/generate_ab.py --ref support-bot@73 --a 'bf16_head={}' \\
        --b 'cast_head={"cast_head": true}' --rounds 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
from train_ab import variant

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="a registered build, NAME@VERSION (its questions; its model "
                                                     "with --tuned)")
    parser.add_argument("--tuned", action="store_true", help="the build's merged model instead of the base")
    parser.add_argument("--a", type=variant, required=True, metavar="NAME=JSON")
    parser.add_argument("--b", type=variant, required=True, metavar="NAME=JSON")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs, the order swapped every round")
    parser.add_argument("--out", default=str(RESULTS / "generate_ab.json"))
    args = parser.parse_args()

    from datasets import load_from_disk

    from agentpeft import models, registry
    from agentpeft.pipeline.evaluate import chat_rows, forgetting_probe

    manifest, entry = registry.show(args.ref), registry.resolve(args.ref)
    base = Path(manifest["base_model"]["path"])
    tokenizer = models.load_tokenizer(base)
    held_out = [r["prompt"] for r in load_from_disk(str(Path(manifest["build_dir"]) / "data" / "dataset"))["eval"]]
    probe = [r["prompt"] for r in chat_rows(forgetting_probe(), None)]
    cast = models.frozen_linears_to_bf16

    def run(settings: dict) -> tuple[float, list[str]]:
        model = models.load_tuned(base, entry / "adapter", merge=True) if args.tuned else models.load_model(base)
        if settings.get("cast_head"):
            models.frozen_linears_to_bf16 = lambda model, head=False: cast(model)
        try:
            model = model if settings.get("fp32") else models.for_inference(model)
        finally:
            models.frozen_linears_to_bf16 = cast
        start = time.perf_counter()
        replies = models.generate(model, tokenizer, held_out, 48) + models.generate(model, tokenizer, probe, 32)
        return time.perf_counter() - start, replies

    runs, first = [], {}
    for round_ in range(args.rounds):
        for name, settings in (args.a, args.b) if round_ % 2 == 0 else (args.b, args.a):
            seconds, replies = run(settings)
            first.setdefault(name, replies)
            runs.append({"round": round_, "variant": name, "seconds": round(seconds, 1),
                         "replies_equal_to_a": sum(x == y for x, y in zip(replies, first.get(args.a[0], replies)))})
            print(json.dumps(runs[-1]), flush=True)
    mean = {name: sum(r["seconds"] for r in runs if r["variant"] == name) / args.rounds for name in (args.a[0], args.b[0])}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {psutil.cpu_count()} cores", "ref": args.ref,
              "model": "tuned, merged" if args.tuned else "base", "questions": len(held_out) + len(probe),
              "variants": dict((args.a, args.b)), "runs": runs, "mean_seconds": {k: round(v, 1) for k, v in mean.items()},
              "speedup_a_over_b": round(mean[args.b[0]] / mean[args.a[0]], 3),
              "same_replies": all(r["replies_equal_to_a"] == len(held_out) + len(probe) for r in runs)}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
