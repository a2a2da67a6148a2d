"""Write agentpeft/data/general_qa.jsonl: the general questions the `general` generator trains on.

They come from the same pool of questions we wrote for the forgetting probe (bench/data/*.jsonl), minus
every question the probe kept (bench/curate_probe.py), and minus any question whose key fact is one of the
probe's or whose text or answer mentions one, so that training on them cannot teach a probe answer. The
questions of bench/data/forgetting_probe_v2_greedy_only.jsonl (those that pass the two greedy checks
without the sampling check) are kept out the same way.

    python bench/make_general_qa.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOL = [ROOT / "bench" / "data" / "probe_candidates_v1.jsonl", ROOT / "bench" / "data" / "probe_candidates.jsonl"]
PROBES = [ROOT / "agentpeft" / "data" / "forgetting_probe.jsonl",
          ROOT / "bench" / "data" / "forgetting_probe_v2_greedy_only.jsonl"]
OUT = ROOT / "agentpeft" / "data" / "general_qa.jsonl"


def main() -> None:
    probe = [json.loads(line) for path in PROBES for line in path.read_text().splitlines() if line.strip()]
    questions = {p["question"].lower() for p in probe}
    keys = {k.strip().lower() for p in probe for k in p["key"].split("|")}
    kept, seen = [], set()
    for path in POOL:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            question = row["question"].strip()
            text = f"{question} {row['answer']}".lower()
            own_keys = {k.strip().lower() for k in row["key"].split("|")}
            if question.lower() in questions | seen or own_keys & keys or any(
                    len(k) > 2 and re.search(rf"\b{re.escape(k)}\b", text) for k in keys):
                continue
            seen.add(question.lower())
            kept.append({"question": question, "answer": row["answer"].strip()})
    OUT.write_text("".join(json.dumps(r) + "\n" for r in kept))
    print(f"{len(kept)} general questions -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
