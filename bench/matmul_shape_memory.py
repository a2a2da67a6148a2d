"""Benchmark: resident memory of bf16 vs fp32 matmuls over many distinct shapes, as training with varying
batch lengths runs them (SmolLM2-135M's projection sizes, forward and input-gradient products).

On a CPU with native bf16, torch runs bf16 matmuls through oneDNN, which keeps a kernel for every shape
it has seen; fp32 ones go to a BLAS that keeps nothing. A third run bounds those caches as the train stage
does (``agentpeft.models.bound_onednn_caches``). Each run has its own process, alone.
Writes ``bench/results/matmul_shape_memory.json`` (or ``--out``).

    python bench/matmul_shape_memory.py --shapes 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SIZES = ((576, 576), (1536, 576), (576, 1536), (192, 576))  # (out, in) of q/o, gate/up, down, k/v


def child(dtype_name: str, shapes: int, bounded: bool) -> dict:
    import psutil
    import torch

    if bounded:
        from agentpeft.models import bound_onednn_caches

        bound_onednn_caches()

    dtype = getattr(torch, dtype_name)
    weights = [torch.randn(n, k, dtype=dtype) for n, k in SIZES]

    def rss() -> float:
        return psutil.Process().memory_info().rss / 2**20

    start, samples, t = rss(), [], time.perf_counter()
    for i, rows in enumerate(range(50, 50 + shapes)):
        for w in weights:
            y = torch.nn.functional.linear(torch.randn(rows, w.shape[1], dtype=dtype), w)
            y @ w  # the input gradient's product
        if (i + 1) % max(1, shapes // 5) == 0:
            samples.append({"shapes": i + 1, "rss_mib": round(rss())})
    again = time.perf_counter()
    for rows in range(50, 50 + shapes):  # the same shapes a second time: no new kernels
        for w in weights:
            torch.nn.functional.linear(torch.randn(rows, w.shape[1], dtype=dtype), w) @ w
    return {"dtype": dtype_name, "bounded_caches": bounded, "rss_start_mib": round(start), "samples": samples,
            "rss_end_mib": round(rss()), "growth_mib": round(rss() - start),
            "first_pass_s": round(again - t, 1), "second_pass_s": round(time.perf_counter() - again, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=1000, help="distinct row counts (50, 51, ...)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--bounded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "matmul_shape_memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shapes, args.bounded)))
        return
    from agentpeft.models import bf16_supported, device_name

    runs = []
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    for dtype, bounded in (("float32", []), ("bfloat16", []), ("bfloat16", ["--bounded"])):
        out = subprocess.run([sys.executable, __file__, "--child", dtype, "--shapes", str(args.shapes), *bounded],
                             capture_output=True, text=True, check=True, env=env).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {device_name()}", "native_bf16": bf16_supported(),
              "shapes": args.shapes, "sizes": SIZES, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
