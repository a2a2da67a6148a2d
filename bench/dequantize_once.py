"""Benchmark: QLoRA training with the NF4 base dequantized once (``train.dequantize_once``) against the 4-bit path.

Alternates the two (A B, B A, ...) for the same steps of the support-bot recipe on its built dataset, in
one process, and records seconds, tokens/s and the losses of each run: on a CPU the losses must agree,
since bitsandbytes computes with the same fp32 values. Writes bench/results/dequantize_once.json.

    AGENTPEFT_HOME=/tmp/H python bench/dequantize_once.py --dataset $BUILD/data/dataset --steps 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True, help="a built dataset folder (a build's data/dataset)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "dequantize_once.json"))
    args = parser.parse_args()

    from agentpeft.models import resolve_base
    from agentpeft.pipeline.train import train
    from agentpeft.recipe import configure

    base = resolve_base(args.base)
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for dense in ((True, False) if round_ % 2 == 0 else (False, True)):
                cfg = configure("support-bot", max_steps=args.steps, dequantize_once=dense).train
                out = Path(work) / f"{dense}-{round_}"
                result = train(base, Path(args.dataset), out, cfg, log=lambda s: None)
                losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").open()
                          if "loss" in json.loads(line)]
                runs.append({"dequantize_once": dense, "round": round_, "seconds": round(result.seconds, 1),
                             "tokens_per_second": round(result.tokens / result.seconds, 1),
                             "losses": [round(x, 4) for x in losses]})
                print(json.dumps(runs[-1]), flush=True)
    mean = {d: sum(r["seconds"] for r in runs if r["dequantize_once"] == d) / args.rounds for d in (True, False)}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {psutil.cpu_count()} cores", "steps": args.steps, "runs": runs,
              "mean_seconds": {"dequantize_once": round(mean[True], 1), "nf4": round(mean[False], 1)},
              "speedup": round(mean[False] / mean[True], 3),
              "same_losses": all(r["losses"] == runs[0]["losses"] for r in runs)}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
