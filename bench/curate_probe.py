"""Curate the forgetting probe: keep the candidate questions the default base model knows robustly.

The probe measures what the base model knew and the tuned model lost, so it holds questions the
base answers right (asked as a plain chat, greedily, as the evaluation asks them) both in its own
weights and in the NF4 4-bit form that QLoRA trains against and merges into: an answer that flips
under quantization noise alone would charge the quantization, not the training, to forgetting.
Candidates are the
hand-written questions in agentpeft/data/forgetting_probe.jsonl (first version) and
bench/data/probe_candidates.jsonl; the kept ones are written back to agentpeft/data/forgetting_probe.jsonl
and the figures to bench/results/curate_probe.json.

    python bench/curate_probe.py [--candidates FILE ...]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from agentpeft.default_plugins.metrics import answer_accuracy
from agentpeft.models import generate, load_model, load_tokenizer, resolve_base

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "agentpeft" / "data" / "forgetting_probe.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", nargs="+", type=Path,
                        default=[ROOT / "bench" / "data" / "probe_candidates_v1.jsonl",
                                 ROOT / "bench" / "data" / "probe_candidates.jsonl"])
    args = parser.parse_args()
    rows, seen = [], set()
    for path in args.candidates:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["question"].lower() not in seen:
                seen.add(row["question"].lower())
                rows.append({k: row[k] for k in ("question", "answer", "key", "category")})
    base = resolve_base("smollm2-135m")
    tokenizer = load_tokenizer(base)
    chats = [[{"role": "user", "content": r["question"]}] for r in rows]
    start = time.perf_counter()
    replies = generate(load_model(base), tokenizer, chats, 32)
    replies_nf4 = generate(load_model(base, dequantized=True), tokenizer, chats, 32)
    kept = [r for r, a, b in zip(rows, replies, replies_nf4)
            if answer_accuracy([a], [r]) == 1.0 and answer_accuracy([b], [r]) == 1.0]
    PROBE.write_text("".join(json.dumps(r) + "\n" for r in kept))
    per_category: dict[str, list[int]] = {}
    for r, reply in zip(rows, replies):
        per_category.setdefault(r["category"], [0, 0])
        per_category[r["category"]][0] += r in kept
        per_category[r["category"]][1] += 1
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "base": "smollm2-135m",
              "candidates": len(rows), "right_fp32": sum(answer_accuracy([a], [r]) for a, r in zip(replies, rows)),
              "right_nf4": sum(answer_accuracy([b], [r]) for b, r in zip(replies_nf4, rows)),
              "kept": len(kept), "seconds": round(time.perf_counter() - start, 1),
              "kept_per_category": {c: f"{k}/{n}" for c, (k, n) in sorted(per_category.items())},
              "rejected": [{"question": r["question"], "key": r["key"], "reply": a, "reply_nf4": b}
                           for r, a, b in zip(rows, replies, replies_nf4) if r not in kept]}
    out = ROOT / "bench" / "results" / "curate_probe.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rejected"}, indent=2))


if __name__ == "__main__":
    main()
