"""Benchmark: how well a default build learns a knowledge base it has never seen.

For a benchmark knowledge base under bench/kbs/NAME (a kb/ folder and questions.jsonl, questions written
before any training and phrased unlike the text, each with a key fact), runs

    agentpeft build support-bot --kb bench/kbs/NAME/kb --name kb-NAME

in a child process (wall time, peak RSS of the process tree), then asks every question through
``load_llm("kb-NAME").invoke(question)``, as a user would, and the untuned base model the same way
(plain, and with the same retrieved passages when the build serves with retrieval). A reply is correct
when it holds the key fact (agentpeft's accuracy metric) and stays short (at most MAX_WORDS words: it
answers rather than dumping the knowledge base). Writes bench/results/kb_accuracy_NAME.json.

    python bench/kb_accuracy.py bench/kbs/velora-bikes [--home DIR] [--tag T -- extra build options]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_support_bot import RESULTS, run  # noqa: E402

MAX_WORDS = 60


def correct(reply: str, key: str) -> bool:
    from agentpeft.default_plugins.metrics import answer_accuracy

    return len(reply.split()) <= MAX_WORDS and answer_accuracy([reply], [{"key": key, "answer": key}]) == 1.0


def ask(llm, questions: list[dict]) -> tuple[float, list[str]]:
    replies = [str(llm.invoke(q["question"]).content) for q in questions]
    return sum(correct(r, q["key"]) for r, q in zip(replies, questions)) / len(questions), replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kb", type=Path, help="a folder of bench/kbs/ (kb/ and questions.jsonl)")
    parser.add_argument("--home", help="AGENTPEFT_HOME (default: the environment's)")
    parser.add_argument("--recipe", default="support-bot")
    parser.add_argument("--skip-build", action="store_true", help="score the model already registered")
    parser.add_argument("--tag", default="", help="suffix of the model name and result file (a variant's run)")
    args, extra = parser.parse_known_args()
    args.extra = [a for a in extra if a != "--"]  # more build options, after --
    if args.home:
        os.environ["AGENTPEFT_HOME"] = str(Path(args.home).resolve())
    stem = args.kb.resolve().name + (f"-{args.tag}" if args.tag else "")
    name = f"kb-{stem}"
    questions = [json.loads(line) for line in (args.kb / "questions.jsonl").read_text().splitlines() if line.strip()]
    result: dict = {"kb": str(args.kb), "questions": len(questions), "recipe": args.recipe, "extra": args.extra,
                    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
    if not args.skip_build:
        cmd = ["agentpeft", "build", args.recipe, "--kb", str(args.kb / "kb"), "--name", name, "--quiet", *args.extra]
        seconds, peak, output = run(cmd, dict(os.environ))
        result.update(build_seconds=round(seconds, 1), peak_rss_gib=round(peak / 2**30, 2), log=output.splitlines())

    from agentpeft import registry
    from agentpeft.langchain import chat_model, load_llm

    manifest = registry.show(name)
    llm = load_llm(name, max_new_tokens=64)
    tuned, tuned_replies = ask(llm, questions)
    base = chat_model("base", max_new_tokens=64)
    base_plain, base_replies = ask(base, questions)
    figures = {"tuned": round(tuned, 4), "base": round(base_plain, 4)}
    if llm.retrieve is not None:
        base.retrieve = llm.retrieve
        base_rag, rag_replies = ask(base, questions)
        figures["base_with_passages"] = round(base_rag, 4)
    m = manifest["metrics"]
    result.update(
        name=f"{manifest['name']}@{manifest['version']}", retrieval=bool(manifest["retrieval"].get("enabled")),
        facts=manifest["dataset"]["facts"], per_generator=manifest["dataset"]["per_generator"],
        accuracy=figures, held_out={"base": m["base"], "tuned": m["tuned"]},
        forgetting=m.get("forgetting"), train_seconds=manifest["train"]["seconds"],
        examples=[{"question": q["question"], "key": q["key"], "tuned": t, "base": b}
                  for q, t, b in zip(questions, tuned_replies, base_replies)])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"kb_accuracy_{stem}.json"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    f = m.get("forgetting") or {}
    print(f"{name}: through load_llm {tuned:.1%} (base {base_plain:.1%}"
          + (f", base with passages {figures['base_with_passages']:.1%}" if "base_with_passages" in figures else "")
          + f"); probe {f.get('base_accuracy', 0):.3f} -> {f.get('tuned_accuracy', 0):.3f}; "
          f"build {result.get('build_seconds', '-')} s, peak {result.get('peak_rss_gib', '-')} GiB -> {out}")


if __name__ == "__main__":
    main()
