"""Curate the forgetting probe: keep the candidate questions the default base model knows robustly.

The probe measures what the base model knew and the tuned model lost, so it holds questions the
base answers right (asked as a plain chat, greedily, as the evaluation asks them) both in its own
weights and in the NF4 4-bit form that QLoRA trains against and merges into: an answer that flips
under quantization noise alone would charge the quantization, not the training, to forgetting.
It must also answer right in at least 6 of 8 replies sampled at temperature 0.7: a question whose
right answer wins the greedy choice only narrowly is a coin flip that any change of the weights,
even a random one of the trained adapter's size, turns over, not a fact the base knew.
Candidates are the hand-written questions in bench/data/probe_candidates*.jsonl; the kept ones are
written to agentpeft/data/forgetting_probe.jsonl and the figures to bench/results/curate_probe.json.

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
CANDIDATES = [ROOT / "bench" / "data" / f"probe_candidates{v}.jsonl" for v in ("_v1", "", "_v3")]
SAMPLES, TEMPERATURE, MIN_RIGHT = 8, 0.7, 6


def sampled_hits(model, tokenizer, rows: list[dict], batch_size: int = 32, seed: int = 0) -> list[int]:
    """How many of ``SAMPLES`` replies sampled at ``TEMPERATURE`` hold each row's key fact."""
    import torch

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    hits = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                               add_generation_prompt=True) for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=32, do_sample=True, temperature=TEMPERATURE, top_p=1.0,
                                 top_k=0, num_return_sequences=SAMPLES, pad_token_id=tokenizer.pad_token_id)
        replies = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += [int(sum(answer_accuracy([reply], [row]) for reply in replies[i * SAMPLES:(i + 1) * SAMPLES]))
                 for i, row in enumerate(chunk)]
    return hits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", nargs="+", type=Path, default=CANDIDATES)
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
    model = load_model(base)
    replies = dict(enumerate(generate(model, tokenizer, chats, 32)))
    right = [i for i in replies if answer_accuracy([replies[i]], [rows[i]]) == 1.0]
    # Each later check asks only the questions every earlier one passed.
    replies_nf4 = dict(zip(right, generate(load_model(base, dequantized=True), tokenizer, [chats[i] for i in right], 32)))
    right_nf4 = [i for i in right if answer_accuracy([replies_nf4[i]], [rows[i]]) == 1.0]
    hits = dict(zip(right_nf4, sampled_hits(model, tokenizer, [rows[i] for i in right_nf4])))
    kept = [rows[i] for i in right_nf4 if hits[i] >= MIN_RIGHT]
    PROBE.write_text("".join(json.dumps(r) + "\n" for r in kept))
    per_category: dict[str, list[int]] = {}
    for r in rows:
        per_category.setdefault(r["category"], [0, 0])
        per_category[r["category"]][0] += r in kept
        per_category[r["category"]][1] += 1
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "base": "smollm2-135m",
              "candidates": len(rows), "right_fp32": len(right), "right_nf4_too": len(right_nf4),
              "sampling": {"samples": SAMPLES, "temperature": TEMPERATURE, "min_right": MIN_RIGHT,
                           "right_in_samples": {n: sum(h == n for h in hits.values()) for n in range(SAMPLES + 1)}},
              "kept": len(kept), "seconds": round(time.perf_counter() - start, 1),
              "kept_per_category": {c: f"{k}/{n}" for c, (k, n) in sorted(per_category.items())},
              "rejected": [{"question": rows[i]["question"], "key": rows[i]["key"], "reply": replies[i],
                            "reply_nf4": replies_nf4.get(i), "right_in_samples": hits.get(i)}
                           for i in range(len(rows)) if rows[i] not in kept]}
    out = ROOT / "bench" / "results" / "curate_probe.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rejected"}, indent=2))


if __name__ == "__main__":
    main()
