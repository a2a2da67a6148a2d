"""Benchmark: a registered model exported as GGUF answers as the registered model does.

Exports a registered model (``agentpeft export NAME DIR --format gguf``, f16 and ``--quant q8_0``), loads each
GGUF file back through transformers (``from_pretrained(DIR, gguf_file=...)``) and asks it the model's held-out
questions (its ``eval.json``) with greedy decoding:

- ``served``: the model ``load_llm(NAME)`` serves against the GGUF model and its own tokenizer set up the same
  way (``for_inference``: bf16 matmuls where the CPU has native bf16), asked the chat ``load_llm`` sends
  (system prompt, question) in batches (``agentpeft.models.generate``); and for the first ``--invoke``
  questions, ``load_llm(NAME).invoke(question)`` against the same LangChain chat over the GGUF model;
- ``fp32``: merged/ against the GGUF model, both computing in fp32 (``agentpeft.models.generate``), so only
  the file's weights differ: f16 (or q8_0) rounding.

Also the largest logit difference on the held-out prompts, export seconds and file sizes. Writes
bench/results/export_roundtrip.json.

    AGENTPEFT_HOME=... python bench/export_roundtrip.py [--name support-bot] [--limit N] [--invoke 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def agreement(a: list[str], b: list[str]) -> dict:
    same = sum(x == y for x, y in zip(a, b))
    return {"equal": same, "of": len(a), "rate": round(same / len(a), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="support-bot", help="registered model, NAME or NAME@VERSION")
    parser.add_argument("--limit", type=int, default=None, help="ask at most N held-out questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--invoke", type=int, default=5, help="questions also asked one by one through invoke")
    parser.add_argument("--out", default=str(RESULTS / "export_roundtrip.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentpeft.errors import AgentpeftError
    from agentpeft.langchain import _chat, load_llm
    from agentpeft.models import chat_prompt, for_inference, generate, inference_precision, load_model, load_tokenizer
    from agentpeft.registry import export, resolve, show

    try:
        entry = resolve(args.name)
    except AgentpeftError as exc:
        sys.exit(f"{exc} (AGENTPEFT_HOME={os.environ.get('AGENTPEFT_HOME', '~/.cache/agentpeft')})")
    ref = f"{entry.parent.name}@{entry.name}"
    manifest = show(ref)
    system = manifest.get("system_prompt") or None
    questions = [e["question"] for e in json.loads((entry / "eval.json").read_text())["examples"]][:args.limit]
    prompts = [chat_prompt(system, q) for q in questions]
    tokens = args.max_new_tokens
    result: dict = {"model": ref, "questions": len(questions), "max_new_tokens": tokens,
                    "merged_dtype": (manifest.get("merge") or {}).get("dtype", "fp32"),
                    "served_precision": inference_precision(),
                    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                    "torch_threads": torch.get_num_threads()}

    merged_dir = entry / "merged"
    merged, merged_tok = load_model(merged_dir), load_tokenizer(merged_dir)
    reference = generate(merged, merged_tok, prompts, max_new_tokens=tokens)
    texts = [merged_tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    llm = load_llm(ref, max_new_tokens=tokens)
    pipe = llm.llm.pipeline
    started = time.perf_counter()
    served = generate(pipe.model, pipe.tokenizer, prompts, max_new_tokens=tokens)
    result["served_seconds"] = round(time.perf_counter() - started, 1)
    invoked = [str(llm.invoke(q).content) for q in questions[:args.invoke]]

    with tempfile.TemporaryDirectory(prefix="export-roundtrip-") as tmp:
        for quant in ("f16", "q8_0"):
            folder = Path(tmp) / quant
            started = time.perf_counter()
            export(ref, folder, format="gguf", quant=quant)
            seconds = time.perf_counter() - started
            model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model.gguf",
                                                         dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file="model.gguf")
            tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
            same_ids = sum(tokenizer(t, add_special_tokens=False)["input_ids"]
                           == merged_tok(t, add_special_tokens=False)["input_ids"] for t in texts)
            default_system = sum(
                tokenizer.apply_chat_template(p[-1:], tokenize=False, add_generation_prompt=True) == t
                for p, t in zip(prompts, texts))
            logit_diff = 0.0
            with torch.inference_mode():
                for text in texts[:16]:
                    ids = merged_tok(text, return_tensors="pt", add_special_tokens=False)
                    logit_diff = max(logit_diff, (merged(**ids).logits - model(**ids).logits).abs().max().item())
            fp32 = generate(model, tokenizer, prompts, max_new_tokens=tokens)
            row = {"export_seconds": round(seconds, 1),
                   "file_mib": round((folder / "model.gguf").stat().st_size / 2**20, 1),
                   "merged_mib": round(sum(f.stat().st_size for f in merged_dir.glob("*.safetensors")) / 2**20, 1),
                   "same_token_ids": {"equal": same_ids, "of": len(texts)},
                   "template_adds_system_prompt": default_system == len(texts),
                   "max_logit_diff_fp32_first16": round(logit_diff, 5),
                   "fp32_replies_equal": agreement(fp32, reference)}
            if quant == "f16":  # as served: the same LangChain chat over either model
                model = for_inference(model)
                started = time.perf_counter()
                gguf_served = generate(model, tokenizer, prompts, max_new_tokens=tokens)
                row["served_seconds"] = round(time.perf_counter() - started, 1)
                row["served_replies_equal"] = agreement(gguf_served, served)
                chat = _chat(model, tokenizer, f"gguf:{ref}", system, max_new_tokens=tokens)
                row["invoke_replies_equal"] = agreement([str(chat.invoke(q).content) for q in questions[:args.invoke]],
                                                        invoked)
                row["served_differing"] = [{"question": q, "load_llm": a, "gguf": b}
                                           for q, a, b in zip(questions, served, gguf_served) if a != b][:5]
            result[quant] = row
            print(quant, json.dumps(row, indent=1)[:1500], flush=True)
            del model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
