"""Retrieval-augmented mode (RAFT): questions with their retrieved passages, in training and at inference.

With ``retrieval.enabled`` each training question is rendered with its top ``k`` BM25 passages plus
``distractors`` unrelated ones, shuffled, so the small model learns to read (and ignore) passages; the
evaluation adds the tuned model asked with retrieved passages beside the tuned model asked alone.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from langchain_core.documents import Document

from ..errors import AgentpeftError
from ..retrieval import BM25Index, passage_text

PASSAGE_CHARS = 400


def augment_question(question: str, passages: list[Document]) -> str:
    """The user turn of retrieval-augmented mode: numbered passages, then the question."""
    lines = [f"[{i}] {passage_text(d)[:PASSAGE_CHARS]}" for i, d in enumerate(passages, 1)]
    return "Passages:\n" + "\n".join(lines) + f"\n\nQuestion: {question}"


def passages_for(index: BM25Index, question: str, k: int, distractors: int = 0,
                 rng: random.Random | None = None) -> list[Document]:
    """The top ``k`` passages for ``question`` plus ``distractors`` random others, shuffled when distractors are added."""
    found = [doc for doc, _ in index.search(question, k)]
    if distractors and rng is not None:
        others = [d for d in index.documents if all(d is not f for f in found)]
        found += rng.sample(others, min(distractors, len(others)))
        rng.shuffle(found)
    return found


def augment_dataset(dataset_dir: Path, documents: list[Document], tokenizer, k: int, distractors: int,
                    max_seq_len: int, seed: int = 0) -> Path:
    """A copy of a saved DatasetDict, in ``<dir>-raft``, whose train prompts carry passages and distractors.

    The eval split stays as it is: it measures the tuned model asked alone.
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    index = BM25Index(documents)
    rng = random.Random(seed)
    ds = load_from_disk(str(dataset_dir))
    rows = []
    for row in ds["train"]:
        prompt = [dict(m) for m in row["prompt"]]
        prompt[-1]["content"] = augment_question(row["question"],
                                                 passages_for(index, row["question"], k, distractors, rng))
        text = tokenizer.apply_chat_template(prompt + list(row["completion"]), tokenize=False)
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tokens <= max_seq_len:
            rows.append({**row, "prompt": prompt, "text": text, "n_tokens": n_tokens})
    if not rows:
        raise AgentpeftError(f"with {k} retrieved passages every training example is longer than "
                             f"max_seq_len={max_seq_len} tokens; raise --max-seq-len or lower retrieval.k")
    out = dataset_dir.with_name(dataset_dir.name + "-raft")
    DatasetDict({"train": Dataset.from_list(rows), "eval": ds["eval"]}).save_to_disk(str(out))
    return out


def evaluate_with_retrieval(base_dir: Path, adapter_dir: Path, eval_rows: list[dict], documents: list[Document],
                            metric_names: list[str], system_prompt: str | None, k: int, max_new_tokens: int,
                            batch_size: int, out_dir: Path) -> dict[str, float]:
    """Score the tuned model on the held-out questions asked with their top ``k`` passages."""
    from ..models import for_inference, load_tokenizer, load_tuned
    from .evaluate import chat_rows, score_model

    index = BM25Index(documents)
    rows = chat_rows([{**r, "question": augment_question(r["question"], passages_for(index, r["question"], k))}
                      for r in eval_rows], system_prompt)
    model = for_inference(load_tuned(base_dir, adapter_dir, merge=True))
    figures, replies = score_model(model, load_tokenizer(base_dir), rows, metric_names, max_new_tokens, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval_retrieval.json").write_text(json.dumps(
        {"tuned_retrieval": figures, "k": k,
         "examples": [{"question": r["question"], "reply": p} for r, p in zip(rows, replies)]}, indent=2))
    return figures
