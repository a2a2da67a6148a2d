"""Summarize `bench/build_support_bot.py` results over training seeds: how far a figure moves by seed.

    python bench/seed_spread.py bench/results/build_support_bot_general202*.json

Prints one row per build (seed, held-out accuracy, forgetting-probe drop and the questions it counts,
general-text perplexity), then the mean, the sample standard deviation and a 95% t interval for the mean of each figure, and
writes them as JSON (--out). Builds must share everything but the seed: the script compares the rest of
the command lines and refuses a mix unless --allow-mixed says that the flags of some builds equal
another's recipe defaults (the summary then lists every command).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from scipy import stats

from agentpeft.recipe import TrainConfig

DEFAULT_SEED = TrainConfig.model_fields["seed"].default  # a build without --seed trains with it


def seed_of(command: str) -> tuple[int, str]:
    """The --seed of a build command, and the command without it."""
    match = re.search(r"\s--seed[ =](\d+)", command)
    if not match:
        return DEFAULT_SEED, command.strip()
    return int(match.group(1)), (command[:match.start()] + command[match.end():]).strip()


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation and a two-sided 95% t interval for the mean."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "sd": None, "ci95": None}
    sd = statistics.stdev(values)
    half = stats.t.ppf(0.975, len(values) - 1) * sd / len(values) ** 0.5
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="write the summary here as JSON")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="accept builds whose commands differ in more than the seed")
    args = parser.parse_args()
    builds, commands = [], set()
    for path in args.results:
        result = json.loads(path.read_text())
        seed, rest = seed_of(result["command"])
        commands.add(rest)
        forgetting = result["metrics"]["forgetting"]
        lost = round(forgetting["accuracy_drop"] * forgetting["n"])  # the drop is stored rounded to 4 digits
        builds.append({
            "file": path.name, "seed": seed, "date": result["date"],
            "held_out_accuracy": result["metrics"]["tuned"]["accuracy"] * 100,
            "probe_drop_points": 100 * lost / forgetting["n"],
            "probe_questions_lost": lost,
            "general_text_perplexity": forgetting["tuned_perplexity"],
            "build_seconds": result["build_seconds"],
        })
    if len(commands) > 1 and not args.allow_mixed:
        raise SystemExit(f"these builds differ in more than the seed: {sorted(commands)}")
    builds.sort(key=lambda b: b["seed"])
    print(f"{'seed':>5} {'held-out %':>11} {'probe drop':>11} {'lost':>5} {'perplexity':>11}  file")
    for b in builds:
        print(f"{b['seed']:>5} {b['held_out_accuracy']:>11.1f} {b['probe_drop_points']:>11.1f} "
              f"{b['probe_questions_lost']:>5} {b['general_text_perplexity']:>11.1f}  {b['file']}")
    summary = {"commands": sorted(commands), "builds": builds,
               **{key: spread([b[key] for b in builds])
                  for key in ("held_out_accuracy", "probe_drop_points", "general_text_perplexity", "build_seconds")}}
    for key in ("held_out_accuracy", "probe_drop_points", "general_text_perplexity"):
        s = summary[key]
        interval = f", 95% interval of the mean {s['ci95'][0]:.1f} to {s['ci95'][1]:.1f}" if s["ci95"] else ""
        sd = f", sd {s['sd']:.1f}" if s["sd"] is not None else ""
        print(f"{key}: mean {s['mean']:.1f}{sd}{interval} ({len(builds)} seeds)")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
