"""Benchmark: the evaluate stage's generation, whole prompts padded against the shared-prefix path.

The default base answers the support-bot held-out questions (with the recipe's system prompt, 48 new
tokens, accuracy and ROUGE-L) and the forgetting probe (32 new tokens, accuracy) three ways, alternately
for ``--rounds``: ``padded`` (every prompt left-padded whole), ``shared`` (the prompt
prefix a batch shares runs once) and, for the probe, ``shared+settled`` (each reply also stops once its
accuracy is settled: its key followed by more text). Records seconds, figures, and how many replies
equal the padded ones. Writes ``bench/results/eval_speed.json``.

    AGENTPEFT_HOME=/tmp/H python bench/eval_speed.py --dataset $BUILD/data/dataset --rounds 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="a built support-bot dataset (eval split)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "eval_speed.json"))
    args = parser.parse_args()

    from datasets import load_from_disk

    from agentpeft.models import generate, load_model, load_tokenizer, resolve_base
    from agentpeft.pipeline import evaluate as stage

    base = resolve_base(args.base)
    model, tokenizer = load_model(base), load_tokenizer(base)
    held_out = list(load_from_disk(str(args.dataset))["eval"])  # rows with their chat prompts, as a build asks them
    sets = {"held_out": (held_out, ["accuracy", "rouge_l"], 48),
            "probe": (stage.chat_rows(stage.forgetting_probe(), None), ["accuracy"], 32)}
    ways = {"padded": {"share_prefix": False}, "shared": {}}

    def run(name: str, way: str) -> dict:
        rows, metrics, tokens = sets[name]
        options = ways.get(way, {})

        def plain(model, tokenizer, prompts, max_new_tokens, batch_size, progress, settled=None):
            return generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, None, **options)

        original = stage.generate
        if way != "shared+settled":
            stage.generate = plain
        try:
            start = time.perf_counter()
            figures, replies = stage.score_model(model, tokenizer, rows, metrics, tokens)
            seconds = time.perf_counter() - start
        finally:
            stage.generate = original
        return {"set": name, "way": way, "seconds": round(seconds, 1), "figures": figures, "replies": replies}

    runs = []
    for round_ in range(args.rounds):
        for name in sets:
            order = ["padded", "shared"] + (["shared+settled"] if name == "probe" else [])
            for way in order if round_ % 2 == 0 else order[::-1]:
                runs.append({"round": round_, **run(name, way)})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "replies"}), flush=True)
    summary = {}
    for name in sets:
        padded = next(r["replies"] for r in runs if r["set"] == name and r["way"] == "padded")
        for way in {r["way"] for r in runs if r["set"] == name}:
            mine = [r for r in runs if r["set"] == name and r["way"] == way]
            summary[f"{name}/{way}"] = {
                "mean_seconds": round(sum(r["seconds"] for r in mine) / len(mine), 1), "figures": mine[0]["figures"],
                "replies_equal_to_padded": sum(a == b for a, b in zip(mine[0]["replies"], padded)),
                "replies_that_start_the_padded_one": sum(b.startswith(a) for a, b in zip(mine[0]["replies"], padded)),
                "n": len(padded)}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {psutil.cpu_count()} cores", "summary": summary,
              "runs": [{k: v for k, v in r.items() if k != "replies"} for r in runs]}
    print(json.dumps(summary, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
