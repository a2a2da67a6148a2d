"""Benchmark: `agentpeft build support-bot` end to end, as a user runs it.

Runs the CLI in a child process (a fresh AGENTPEFT_HOME unless --home is given, the base model
pulled beforehand so that the pull is timed on its own), samples the child's resident memory,
and writes wall time per stage, peak RSS and the evaluation figures to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"


def peak_rss(proc: subprocess.Popen, stop: threading.Event, out: dict) -> None:
    """Sample the RSS of the process tree every 0.2 s."""
    parent = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
            out["peak"] = max(out.get("peak", 0), rss)
        except psutil.Error:
            pass
        time.sleep(0.2)


def run(cmd: list[str], env: dict) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, mem = threading.Event(), {}
    sampler = threading.Thread(target=peak_rss, args=(proc, stop, mem), daemon=True)
    sampler.start()
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    proc.wait()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.perf_counter() - start, mem.get("peak", 0), "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", help="AGENTPEFT_HOME to use (default: a new temporary folder)")
    parser.add_argument("--out", default=str(RESULTS / "build_support_bot.json"))
    parser.add_argument("--recipe", default="support-bot",
                        help="a recipe name or folder (a variant of support-bot's, registered as support-bot)")
    parser.add_argument("extra", nargs="*", help="extra arguments for agentpeft build")
    args = parser.parse_args()
    home = args.home or tempfile.mkdtemp(prefix="agentpeft-bench-")
    env = {**os.environ, "AGENTPEFT_HOME": home}
    agentpeft = [sys.executable, "-m", "agentpeft"]
    pull_s, _, _ = run([*agentpeft, "models", "pull", "smollm2-135m"], env)
    build_s, peak, log = run([*agentpeft, "build", args.recipe, "--quiet", *args.extra], env)
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"\] (\w+): .*\((\d+(?:\.\d+)?)s\)$", log, re.M)}
    manifest = json.loads(subprocess.run([*agentpeft, "show", "support-bot", "--json"], env=env,
                                         capture_output=True, text=True, check=True).stdout)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "command": f"agentpeft build {args.recipe} " + " ".join(args.extra),
        "pull_seconds": round(pull_s, 1),
        "build_seconds": round(build_s, 1),
        "stage_seconds": stages,
        "peak_rss_gib": round(peak / 2**30, 2),
        "metrics": manifest["metrics"],
        "train": {k: manifest["train"][k] for k in ("steps", "final_loss", "seconds", "tokens", "trainable_params")},
        "merge_max_logit_diff": manifest["merge"]["max_logit_diff"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
