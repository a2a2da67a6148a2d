"""Benchmark: how often retrieval puts the answer in front of the model, and how often it stays out of the way.

For each benchmark knowledge base under bench/kbs/ (kb/ and questions.jsonl: questions written by people,
phrased unlike the text, each with a key fact), ingests the knowledge base as a build does and counts:

- recall@k: the share of its human questions whose top ``k`` retrieved sentences (what a retrieval-mode
  prompt carries) hold the key fact (the metric agentpeft's evaluation uses), for k = 1, 2, 3;
  ``retrieval.k`` is 3;
- general questions given passages: how many of the 156 forgetting-probe questions and of the 202 general
  training questions retrieve any passage (the rest are asked as they are).

Writes bench/results/retrieval_recall.json.

    python bench/retrieval_recall.py [--kbs velora-bikes harbor-coworking ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

KBS = Path(__file__).parent / "kbs"
RESULTS = Path(__file__).parent / "results"


def _questions(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kbs", nargs="+", default=sorted(p.name for p in KBS.iterdir() if (p / "kb").is_dir()))
    parser.add_argument("--out", default=str(RESULTS / "retrieval_recall.json"))
    args = parser.parse_args()

    from agentpeft.default_plugins.metrics import answer_accuracy
    from agentpeft.models import resolve_embedder
    from agentpeft.pipeline.ingest import ingest
    from agentpeft.retrieval import MIN_SIMILARITY, PassageIndex, passage_text, retrieve

    data = resources.files("agentpeft").joinpath("data")
    probe = [r["question"] for r in _questions(data.joinpath("forgetting_probe.jsonl").read_text(encoding="utf-8"))]
    general = [r["question"] for r in _questions(data.joinpath("general_qa.jsonl").read_text(encoding="utf-8"))]
    rows, totals = [], {k: 0 for k in (1, 2, 3)}
    asked = 0
    for name in args.kbs:
        started = time.perf_counter()
        index = PassageIndex(ingest(KBS / name / "kb"))
        indexed = time.perf_counter() - started  # the first one includes loading the embedding model
        questions = _questions((KBS / name / "questions.jsonl").read_text(encoding="utf-8"))
        hits = {k: 0 for k in (1, 2, 3)}
        for q in questions:
            found = retrieve(index, q["question"], 3)
            for k in hits:
                text = " ".join(passage_text(d) for d in found[:k])
                hits[k] += answer_accuracy([text], [{"key": q["key"], "answer": q["key"]}]) == 1.0
        row = {"kb": name, "passages": len(index.documents), "questions": len(questions),
               "recall": {f"@{k}": round(v / len(questions), 4) for k, v in hits.items()},
               "probe_with_passages": sum(bool(retrieve(index, q, 2)) for q in probe),
               "general_with_passages": sum(bool(retrieve(index, q, 2)) for q in general),
               "index_seconds": round(indexed, 2)}
        print(f"{name}: recall@1/2/3 {hits[1]}/{hits[2]}/{hits[3]} of {len(questions)}; probe questions with "
              f"passages {row['probe_with_passages']}/{len(probe)}, general {row['general_with_passages']}/{len(general)}")
        rows.append(row)
        asked += len(questions)
        for k in totals:
            totals[k] += hits[k]
    folder = resolve_embedder()
    meta = folder / "agentpeft-model.json"
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
           "embedder": json.loads(meta.read_text())["source"] if meta.is_file() else str(folder),
           "min_similarity": MIN_SIMILARITY, "questions": asked,
           "recall": {f"@{k}": round(v / asked, 4) for k, v in totals.items()},
           "probe_questions": len(probe), "general_questions": len(general), "kbs": rows}
    print(f"all: recall@1/2/3 {out['recall']}")
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
