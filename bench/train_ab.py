"""Benchmark: two variants of the support-bot train stage, alternately (A B, B A, ...), same steps and data.

A variant is ``NAME=JSON``: train-config fields (``{"dequantize_once": false}``) plus four code switches
for changes that have no config field: ``"packed_tails": false`` runs the shared-prefix tails as padded
rows over a repeated cache (before session 9; sessions 12-16 the default under bf16 on a CPU),
``true`` packs them into one row after a separate prefix pass, ``"one_pass"`` runs the prefix and the packed
tails as one sequence (since session 17 the default under bf16 on a CPU), ``"fp32_adapter": false`` leaves the QLoRA adapter in
TRL's bf16 (before session 7), ``"native_bf16": false`` computes in fp32 as on a CPU without native
bf16, ``"eager_attention": false`` keeps SDPA attention under bf16 on a CPU (before session 13),
``"bf16_head": true`` computes the LM head's logits from bf16 hidden states and weights (rejected, session 19). Each
run records seconds, tokens/s and its losses; equal losses mean the two variants compute the
same training. Writes ``bench/results/train_ab.json`` (or ``--out``).

    AGENTPEFT_HOME=/tmp/H python bench/train_ab.py --dataset $BUILD/data/dataset --steps 40 --rounds 3 \\
        --a 'packed={}' --b 'padded={"packed_tails": false}'
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"
SWITCHES = ("packed_tails", "fp32_adapter", "native_bf16", "eager_attention", "bf16_head")


def variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition("=")
    try:
        return name, json.loads(settings or "{}")
    except json.JSONDecodeError as exc:
        raise SystemExit(f"variant {text!r}: the part after '=' is not JSON ({exc.msg})") from None


@contextlib.contextmanager
def switched(settings: dict):
    """The train stage with the code switches of ``settings`` applied."""
    from agentpeft import models
    from agentpeft.pipeline import train as stage

    saved = (stage.shared_prefix_hidden, stage.keep_trainable_fp32, models.bf16_supported,
             models.eager_attention_on_cpu, stage._logits)
    if settings.get("bf16_head"):
        stage._logits = bf16_logits
    if settings.get("eager_attention") is False:
        models.eager_attention_on_cpu = lambda model: None
    if settings.get("native_bf16") is False:
        models.bf16_supported = lambda: False
    if "packed_tails" in settings:
        stage.shared_prefix_hidden = functools.partial(stage.shared_prefix_hidden, packed=settings["packed_tails"])
    if settings.get("fp32_adapter") is False:
        stage.keep_trainable_fp32 = lambda model: None
    try:
        yield stage
    finally:
        (stage.shared_prefix_hidden, stage.keep_trainable_fp32, models.bf16_supported,
         models.eager_attention_on_cpu, stage._logits) = saved


def bf16_logits(head, hidden):
    """The LM head in bf16 (a cached bf16 copy of its weight), its logits returned as fp32."""
    import torch
    import torch.nn.functional as F

    weight = getattr(head, "_bf16_weight", None)
    if weight is None:
        weight = head._bf16_weight = head.weight.detach().bfloat16()
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.bfloat16(), weight).float()


def run(base: Path, dataset: Path, recipe: str, steps: int, name: str, settings: dict, work: Path) -> dict:
    from agentpeft.recipe import get_recipe

    fields = {k: v for k, v in settings.items() if k not in SWITCHES}
    cfg = get_recipe(recipe).train.model_copy(update={**fields, "max_steps": steps, "save_steps": 10 * steps})
    out = work / name
    with switched(settings) as stage:
        result = stage.train(base, dataset, out, cfg, log=lambda *_: None)
    losses = [row["loss"] for row in map(json.loads, (out / "train_log.jsonl").open()) if "loss" in row]
    return {"variant": name, "seconds": round(result.seconds, 1), "tokens": result.tokens,
            "tokens_per_s": round(result.tokens / result.seconds, 1), "losses": [round(x, 4) for x in losses]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="a built dataset folder (a build's data/dataset)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--recipe", default="support-bot", help="whose train settings the variants start from")
    parser.add_argument("--a", type=variant, required=True, metavar="NAME=JSON")
    parser.add_argument("--b", type=variant, required=True, metavar="NAME=JSON")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs, the order swapped every round")
    parser.add_argument("--out", default=str(RESULTS / "train_ab.json"))
    args = parser.parse_args()

    from agentpeft.models import resolve_base

    base = resolve_base(args.base)
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for name, settings in (args.a, args.b) if round_ % 2 == 0 else (args.b, args.a):
                runs.append({"round": round_, **run(base, args.dataset, args.recipe, args.steps, name, settings,
                                                    Path(work) / str(round_))})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "losses"}), flush=True)
    mean = {name: sum(r["tokens_per_s"] for r in runs if r["variant"] == name) / args.rounds
            for name in (args.a[0], args.b[0])}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {psutil.cpu_count()} cores", "recipe": args.recipe,
              "steps": args.steps, "variants": dict((args.a, args.b)), "runs": runs,
              "mean_tokens_per_s": {k: round(v, 1) for k, v in mean.items()},
              "speedup_a_over_b": round(mean[args.a[0]] / mean[args.b[0]], 3),
              "same_losses": all(r["losses"] == runs[0]["losses"] for r in runs)}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
