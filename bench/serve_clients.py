"""`agentpeft serve` under concurrent clients: N clients of the openai SDK ask a served model at once.

Starts the server in this process (uvicorn in a thread, on a free port, the default queue unless
--max-queue), then each client sends --requests chat completions back to back (no retries). Reports the
requests served, the 503s (queue full) and other errors, latency p50/p95 of the served ones, and the
wall time.

    AGENTPEFT_HOME=/work/home python bench/serve_clients.py kb-harbor-coworking-closed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What are the opening hours?", "How do I book a meeting room?", "Is there parking nearby?",
             "Can I bring a guest?", "How much is a day pass?", "Is the wifi free?", "Can I print documents?",
             "How do I cancel my membership?"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a registered model, NAME[@VERSION]")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client, back to back")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_clients.json")
    args = parser.parse_args(argv)

    import openai
    import torch

    from agentpeft.registry import parse_ref
    from agentpeft.serve import make_server

    name, version = parse_ref(args.model)
    loaded = time.perf_counter()
    httpd = make_server(name, port=0, version=version, max_queue=args.max_queue).start()
    load_s = time.perf_counter() - loaded
    client = openai.OpenAI(base_url=httpd.url, api_key="unused", max_retries=0, timeout=600)
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)  # warm-up

    lock = threading.Lock()
    latencies: list[float] = []
    outcomes = {"served": 0, "busy_503": 0, "other_errors": 0}
    tokens: list[int] = []
    errors: list[str] = []

    def run(index: int) -> None:
        for i in range(args.requests):
            question = QUESTIONS[(index + i) % len(QUESTIONS)]
            started = time.perf_counter()
            try:
                reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                       max_tokens=args.max_tokens)
            except openai.APIStatusError as exc:
                with lock:
                    outcomes["busy_503" if exc.status_code == 503 else "other_errors"] += 1
                    if exc.status_code != 503:
                        errors.append(f"{exc.status_code}: {exc.message}")
                continue
            except openai.APIError as exc:
                with lock:
                    outcomes["other_errors"] += 1
                    errors.append(type(exc).__name__)
                continue
            with lock:
                outcomes["served"] += 1
                latencies.append(time.perf_counter() - started)
                tokens.append(reply.usage.completion_tokens)

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(run, range(args.clients)))
    wall = time.perf_counter() - started
    httpd.shutdown()
    httpd.server_close()

    result = {
        "model": httpd.model_id, "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "max_queue": args.max_queue, **outcomes,
        "latency_s": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                      "mean": statistics.fmean(latencies) if latencies else None,
                      "max": max(latencies) if latencies else None},
        "completion_tokens_mean": statistics.fmean(tokens) if tokens else None,
        "wall_s": wall, "requests_per_s": outcomes["served"] / wall if wall else None, "load_s": load_s,
        "errors": errors[:10],
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
