"""Profile: where a training step of the support-bot train stage spends its CPU time, by operator.

Trains the recipe's settings for a few steps with torch.profiler on over a window after warm-up, then
groups self CPU time into the base model's matmuls, the LoRA adapter's (one side equal to the rank), the
LM head's (one side equal to the vocabulary), attention's batched matmuls and every other operator.
The profiler adds a fixed cost per operator, so many small operators (the adapter's) weigh more here
than in an unprofiled step: read the shares as an upper bound for small operators.

    AGENTPEFT_HOME=/tmp/H python bench/profile_train.py --dataset $BUILD/data/dataset
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch
from transformers import TrainerCallback

RESULTS = Path(__file__).parent / "results"


def category(name: str, shapes: list, adapter_dims: set[int], vocab: int) -> str:
    """The group an operator's time is counted in: a matmul with a side in ``adapter_dims`` (the LoRA
    rank) is the adapter's."""
    if name != "aten::mm":
        return name
    dims = {d for shape in shapes for d in shape}
    if vocab in dims:
        return "mm: LM head"
    if adapter_dims & dims:
        return "mm: LoRA adapter"
    return "mm: base model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="a built dataset folder (a build's data/dataset)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--recipe", default="support-bot")
    parser.add_argument("--warmup", type=int, default=4, help="steps before the profiled window")
    parser.add_argument("--steps", type=int, default=6, help="profiled steps")
    parser.add_argument("--out", default=str(RESULTS / "profile_train.json"))
    args = parser.parse_args()

    from agentpeft.models import resolve_base
    from agentpeft.pipeline import train as stage
    from agentpeft.recipe import get_recipe

    base = resolve_base(args.base)
    cfg = get_recipe(args.recipe).train
    cfg = cfg.model_copy(update={"max_steps": args.warmup + args.steps, "save_steps": 10_000})
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)

    class Window(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == args.warmup:
                prof.__enter__()

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == args.warmup + args.steps:
                prof.__exit__(None, None, None)

    saved = stage._progress_callback
    stage._progress_callback = Window
    try:
        with tempfile.TemporaryDirectory() as work:
            result = stage.train(base, args.dataset, Path(work), cfg, log=lambda *_: None)
    finally:
        stage._progress_callback = saved

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(base).vocab_size
    adapter_dims = {cfg.r}
    groups: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        key = category(event.key, [s for s in event.input_shapes if s], adapter_dims, vocab)
        groups[key] += event.self_cpu_time_total
        calls[key] += event.count
    total = sum(groups.values())
    # Every group goes to the file (the matmul groups can be small on a small model); the top 25 are printed.
    rows = [{"group": k, "ms": round(v / 1e3, 1), "share": round(v / total, 4), "calls": calls[k]}
            for k, v in groups.most_common()]
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {psutil.cpu_count()} cores", "recipe": args.recipe,
           "precision": result.precision, "profiled_steps": args.steps,
           "self_cpu_ms": round(total / 1e3, 1), "groups": rows}
    for row in rows[:25]:
        print(f"{row['group'][:48]:48s} {row['ms']:9.1f} ms {100 * row['share']:5.1f}%  {row['calls']:6d} calls")
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
