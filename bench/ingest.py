"""Benchmark: ingestion plus the non-teacher generators on a generated Markdown knowledge base.

Writes a few thousand Markdown files (FAQ sections, fact bullets, prose and a code block each) to a
temporary folder, then times ``ingest`` followed by every registered non-teacher generator among
faq, facts and sections. A "document" is one knowledge-base file; the chunk Documents and the
pairs produced are reported too. Target: 500 documents per second or more.
Writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from agentpeft.pipeline.dataset import get_generators
from agentpeft.pipeline.ingest import ingest
from agentpeft.progress import set_enabled

WORDS = ("lamp dimmer warranty colour battery hinge switch firmware shade bulb cable socket timer sensor "
         "brightness schedule adapter mount studio harbour").split()


def page(i: int, rng: random.Random) -> str:
    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."

    prose = " ".join(sentence() for _ in range(rng.randint(3, 8)))
    return f"""# Product {i}

{prose}

## How long is the warranty of product {i}?

Product {i} has a **{rng.randint(1, 9)}-year** warranty. {sentence()}

## Which colours does product {i} come in?

It comes in **{rng.choice(['amber', 'teal', 'slate', 'ivory'])}** and two other shades.

## Specifications

- **Price:** ${rng.randint(20, 300)}
- **Model code:** P-{i:05d}
- **Weight:** {rng.randint(200, 2000)} g

## Setup

{prose}

```bash
lampctl pair --device P-{i:05d}
lampctl set --brightness {rng.randint(1, 100)}
```

{sentence()}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ingest.json"))
    args = parser.parse_args()

    set_enabled(False)
    rng = random.Random(0)
    generators = [g for name, g in sorted(get_generators().items()) if name in ("faq", "facts", "sections")]
    with tempfile.TemporaryDirectory(prefix="agentpeft-bench-ingest-") as tmp:
        kb = Path(tmp)
        for i in range(args.files):
            folder = kb / f"section{i % 20:02d}"
            folder.mkdir(exist_ok=True)
            (folder / f"product{i:05d}.md").write_text(page(i, rng), encoding="utf-8")
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            documents = ingest(kb, ["markdown"])
            ingested = time.perf_counter()
            pairs = sum(len(list(g.generate(documents))) for g in generators)
            done = time.perf_counter()
            runs.append((done - start, ingested - start, len(documents), pairs))
    seconds, ingest_seconds, chunks, pairs = min(runs)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "files": args.files,
        "generators": [g.name for g in generators],
        "chunk_documents": chunks,
        "pairs": pairs,
        "seconds": round(seconds, 3),
        "ingest_seconds": round(ingest_seconds, 3),
        "documents_per_second": round(args.files / seconds, 1),
        "chunk_documents_per_second": round(chunks / seconds, 1),
        "target_documents_per_second": 500,
        "meets_target": args.files / seconds >= 500,
        "runs_seconds": [round(r[0], 3) for r in runs],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
