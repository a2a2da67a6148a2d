"""Benchmark: the evaluate stage in fp32 against bf16 inference (``agentpeft.models.for_inference``).

For each registered build given (``NAME@VERSION``), runs the stage's own ``evaluate`` (base and tuned model,
held-out questions, forgetting probe, general-text perplexity) once with ``AGENTPEFT_INFERENCE_DTYPE=float32``
and once with the default (bf16 where the CPU computes it natively), alternating which goes first. The
base model's answers are cached per precision as in a build, so only the first build's evaluations ask the
base. Records the seconds of each evaluation (models loaded included), the figures, and how many replies
equal fp32's.

    AGENTPEFT_HOME=/tmp/H python bench/eval_precision.py support-bot@68 support-bot@69 --out F.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"
WAYS = {"fp32": "float32", "default": "auto"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("refs", nargs="+", help="registered builds, NAME@VERSION")
    parser.add_argument("--out", default=str(RESULTS / "eval_precision.json"))
    args = parser.parse_args()

    from datasets import load_from_disk

    from agentpeft import models, registry
    from agentpeft.pipeline import evaluate as stage
    from agentpeft.recipe import get_recipe

    scratch = Path(tempfile.mkdtemp(prefix="eval-precision-"))
    runs = []
    for i, ref in enumerate(args.refs):
        manifest, entry = registry.show(ref), registry.resolve(ref)
        recipe = get_recipe(manifest["recipe"])
        rows = list(load_from_disk(str(Path(manifest["build_dir"]) / "data" / "dataset"))["eval"])
        for way in list(WAYS) if i % 2 == 0 else list(WAYS)[::-1]:
            os.environ[models.INFERENCE_DTYPE_ENV] = WAYS[way]
            start = time.perf_counter()
            result = stage.evaluate(Path(manifest["base_model"]["path"]), entry / "adapter", rows,
                                    recipe.eval.metrics, recipe.eval.primary, scratch / f"{i}-{way}",
                                    manifest["system_prompt"], recipe.eval.max_new_tokens, recipe.eval.batch_size,
                                    recipe.eval.forgetting_probe)
            seconds = time.perf_counter() - start
            saved = json.loads((scratch / f"{i}-{way}" / "eval.json").read_text())
            runs.append({"ref": ref, "way": way, "precision": result.precision, "seconds": round(seconds, 1),
                         "base_cached": i > 0, "base": result.base,
                         "tuned": result.tuned, "forgetting": result.forgetting,
                         "replies": {"held_out": [e["tuned"] for e in saved["examples"]],
                                     "probe": [e["tuned"] for e in saved["probe"]],
                                     "base_held_out": [e["base"] for e in saved["examples"]],
                                     "base_probe": [e["base"] for e in saved["probe"]]}})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "replies"}), flush=True)
    os.environ.pop(models.INFERENCE_DTYPE_ENV, None)
    per_build = []
    for ref in args.refs:
        fp32, bf16 = (next(r for r in runs if r["ref"] == ref and r["way"] == w) for w in WAYS)
        per_build.append({
            "ref": ref, "seconds": {"fp32": fp32["seconds"], "default": bf16["seconds"]},
            "accuracy": {"fp32": fp32["tuned"]["accuracy"], "default": bf16["tuned"]["accuracy"]},
            "probe_drop": {"fp32": fp32["forgetting"]["accuracy_drop"], "default": bf16["forgetting"]["accuracy_drop"]},
            "perplexity": {"fp32": fp32["forgetting"]["tuned_perplexity"],
                           "default": bf16["forgetting"]["tuned_perplexity"]},
            "replies_equal": {k: sum(a == b for a, b in zip(fp32["replies"][k], bf16["replies"][k]))
                              for k in fp32["replies"]},
            "n": {k: len(v) for k, v in fp32["replies"].items()}})
    mean = {f"{figure}_{way}": round(statistics.fmean(b[figure][way] for b in per_build), 4)
            for figure in ("accuracy", "probe_drop") for way in WAYS}
    later = per_build[1:]  # the first build's evaluations also ask the base model
    if later:
        mean.update({f"seconds_{way}_base_cached": round(statistics.fmean(b["seconds"][way] for b in later), 1)
                     for way in WAYS})
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {models.device_name()}",
              "precision": models.inference_precision(), "per_build": per_build, "mean": mean,
              "runs": [{k: v for k, v in r.items() if k != "replies"} for r in runs]}
    print(json.dumps({"per_build": per_build, "mean": mean}, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
