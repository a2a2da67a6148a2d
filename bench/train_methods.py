"""Benchmark: every PEFT method (and full fine-tuning for reference) on the default base model.

Each method runs in its own process: a few training steps on the support-bot dataset through
agentpeft's train stage (full fine-tuning through the same SFTTrainer without peft), then the
adapter is loaded back and generates. Records peak resident memory (whole run, and the training
phase alone: the kernel's high-water mark is reset after the model is loaded), tokens per second
and the final loss. For qlora, lora and full it also records ``agentpeft plan``'s estimate for the
largest batch the run saw, next to the measured peak. Writes bench/results/train_methods.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

METHODS = ("qlora", "qlora-dense", "lora", "dora", "prefix", "prompt", "full")
#: Methods that ``agentpeft plan`` estimates.
PLANNED = ("qlora", "qlora-dense", "lora", "full")


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def run_one(method: str, steps: int, workdir: Path) -> dict:
    """Train one method; runs inside a child process."""
    from agentpeft.models import load_tokenizer, load_tuned, resolve_base
    from agentpeft.pipeline.dataset import build_dataset
    from agentpeft.pipeline.evaluate import generate
    from agentpeft.pipeline.ingest import ingest
    from agentpeft.pipeline import train as train_stage
    from agentpeft.pipeline.trainer import AgentpeftTrainer
    from agentpeft.recipe import configure

    # qlora: the 4-bit path; qlora-dense: the NF4 weights dequantized once (what a CPU run does where it fits).
    dense = method == "qlora-dense"
    recipe = configure("support-bot", max_steps=steps, method={"full": "lora", "qlora-dense": "qlora"}.get(method, method),
                       **({"dequantize_once": dense} if method.startswith("qlora") else {}),
                       # full fine-tuning has no adapter to switch off for the KL anchor's base distributions
                       **({"anchor_kl": 0.0} if method == "full" else {}))
    base = resolve_base(recipe.base_model)
    data = build_dataset(ingest(recipe.kb_path), recipe.data.generators, load_tokenizer(base), recipe.system_prompt,
                         workdir / "data")
    loaded = {}

    import peft

    real = peft.get_peft_model

    def measured(model, config, *a, **k):
        loaded["rss_after_load_kib"] = peak_rss_kib()
        reset_peak()
        if method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            model.get_nb_trainable_parameters = lambda: (sum(p.numel() for p in model.parameters()),) * 2
            return model
        return real(model, config, *a, **k)

    peft.get_peft_model = measured
    largest = {"tokens": 0}
    real_loss = AgentpeftTrainer.compute_loss

    def watched_loss(self, model, inputs, *a, **k):
        batch, length = inputs["input_ids"].shape
        if batch * length > largest["tokens"]:
            largest.update(tokens=batch * length, batch=batch, length=length)
        return real_loss(self, model, inputs, *a, **k)

    AgentpeftTrainer.compute_loss = watched_loss
    try:
        result = train_stage.train(base, data.path, workdir, recipe.train, log=lambda s: None)
    finally:
        peft.get_peft_model = real
        AgentpeftTrainer.compute_loss = real_loss
    row = {"method": method, "steps": result.steps, "final_loss": round(result.final_loss, 4),
           "train_seconds": round(result.seconds, 1), "tokens": result.tokens,
           "tokens_per_second": round(result.tokens / result.seconds, 1),
           "trainable_params": result.trainable_params,
           "peak_rss_training_gib": round(peak_rss_kib() / 2**20, 3),
           "rss_after_load_gib": round(loaded["rss_after_load_kib"] / 2**20, 3)}
    if method in PLANNED:
        from agentpeft.plan import plan

        estimate = plan(str(base), recipe.train.method if method != "full" else method, r=recipe.train.r,
                        dequantize_once=dense, target_modules=recipe.train.target_modules,
                        batch_size=largest["batch"], seq_len=largest["length"], dropout=recipe.train.dropout,
                        gradient_checkpointing=recipe.train.gradient_checkpointing,
                        # the runs whose frozen linear layers train.bf16 copied to bf16
                        dtype="bfloat16" if "copied to bf16" in result.precision else "float32")
        measured_gib = row["peak_rss_training_gib"]
        row["plan"] = {"batch": largest["batch"], "seq_len": largest["length"],
                       "estimate_gib": round(estimate.total_bytes / 2**30, 3),
                       "error": round(estimate.total_bytes / 2**30 / measured_gib - 1, 3),
                       "components_gib": {k: round(v / 2**30, 3) for k, v in estimate.components.items()}}
    if method != "full":
        model = load_tuned(base, result.adapter_dir, merge=True)
        reply = generate(model, load_tokenizer(base), [[{"role": "system", "content": recipe.system_prompt},
                                                         {"role": "user", "content": "Who founded Brindlewick?"}]], 24)
        row["generates"] = reply[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_methods.json"))
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(run_one(args.child, args.steps, Path(tmp))))
        return
    rows = []
    for method in args.methods.split(","):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps)],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            rows.append({"method": method, "error": (proc.stderr or proc.stdout)[-800:]})
        else:
            rows.append({**json.loads(lines[-1][7:]), "wall_seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]))
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": args.steps,
              "model": "smollm2-135m", "batch_size": 8, "methods": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
