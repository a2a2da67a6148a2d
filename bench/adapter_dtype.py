"""Benchmark: the QLoRA adapter kept in fp32 versus TRL's bf16, on a CPU that emulates bf16.

TRL stores a 4-bit model's trainable weights in bf16 and peft runs each LoRA product in its weights'
dtype; agentpeft keeps them in fp32 where the CPU has no native bf16 (``keep_trainable_fp32``). This
runs the support-bot recipe's train stage for ``--steps`` steps both ways, alternately (A B A B), on
the dataset of an earlier build, and writes tokens per second and the final loss of each run.

    python bench/adapter_dtype.py --base $AGENTPEFT_HOME/models/smollm2-135m --dataset $AGENTPEFT_HOME/cache/datasets/KEY/dataset
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run(base: Path, dataset: Path, steps: int, fp32: bool) -> dict:
    from agentpeft.pipeline import train as train_stage
    from agentpeft.recipe import get_recipe

    keep = train_stage.keep_trainable_fp32
    if not fp32:
        train_stage.keep_trainable_fp32 = lambda model: None
    try:
        cfg = get_recipe("support-bot").train.model_copy(update={"max_steps": steps, "save_steps": 10 * steps})
        with tempfile.TemporaryDirectory() as out:
            result = train_stage.train(base, dataset, Path(out), cfg, log=lambda *_: None)
    finally:
        train_stage.keep_trainable_fp32 = keep
    return {"adapter": "fp32" if fp32 else "bf16", "steps": result.steps, "seconds": round(result.seconds, 1),
            "tokens": result.tokens, "tokens_per_s": round(result.tokens / result.seconds, 1),
            "final_loss": result.final_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="the base model folder")
    parser.add_argument("--dataset", type=Path, required=True, help="a built dataset folder (train split)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs")
    parser.add_argument("--out", default=str(RESULTS / "adapter_dtype.json"))
    args = parser.parse_args()

    from agentpeft.models import bf16_supported

    runs = [run(args.base, args.dataset, args.steps, fp32) for _ in range(args.rounds) for fp32 in (True, False)]
    rate = {kind: sum(r["tokens_per_s"] for r in runs if r["adapter"] == kind) / args.rounds for kind in ("fp32", "bf16")}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "native_bf16": bf16_supported(),
              "runs": runs, "mean_tokens_per_s": rate, "speedup_fp32": round(rate["fp32"] / rate["bf16"], 3)}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
