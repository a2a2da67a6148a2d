"""Benchmark: how far bf16 autocast moves SmolLM2's next-token distributions, with SDPA and with eager attention.

The default base reads forgetting-probe questions with their reference answers (plain chats, right-padded)
in fp32 and under CPU bf16 autocast, once per attention implementation. Records, against fp32 SDPA, the
mean KL divergence per real token and the largest log-probability difference. The train stage switches to
eager attention under bf16 on a CPU for speed (docs/performance.md, "Eager attention under bf16"); this
checks that the switch costs no precision. Writes ``bench/results/attention_precision.json``.

    AGENTPEFT_HOME=/tmp/H python bench/attention_precision.py --rows 16
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=16, help="probe questions read, with their answers")
    parser.add_argument("--out", default=str(RESULTS / "attention_precision.json"))
    args = parser.parse_args()

    import torch

    from agentpeft.models import load_model, load_tokenizer, resolve_base
    from agentpeft.pipeline import evaluate as stage

    base = resolve_base(args.base)
    model, tokenizer = load_model(base), load_tokenizer(base)
    tokenizer.padding_side = "right"
    rows = stage.chat_rows(stage.forgetting_probe(), None)[:args.rows]
    texts = [tokenizer.apply_chat_template(r["prompt"] + [{"role": "assistant", "content": r["answer"]}],
                                           tokenize=False) for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    logp = {}
    with torch.no_grad():
        for attention in ("sdpa", "eager"):
            model.set_attn_implementation(attention)
            logp[f"{attention}/fp32"] = model(**batch).logits.log_softmax(-1)[real]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logp[f"{attention}/bf16 autocast"] = model(**batch).logits.float().log_softmax(-1)[real]
    reference = logp["sdpa/fp32"]
    figures = {name: {"mean_kl_to_fp32_sdpa": float((reference.exp() * (reference - x)).sum(-1).mean()),
                      "max_abs_logprob_diff": round(float((x - reference).abs().max()), 4)}
               for name, x in logp.items()}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {psutil.cpu_count()} cores", "rows": len(rows),
              "tokens": int(real.sum()), "figures": figures}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
