"""Retrieval-augmented mode (RAFT): training prompts that carry retrieved passages.

With retrieval on, each knowledge question of the train split is rendered with ``k`` passages: its
top passages with ``distractors`` of them replaced by unrelated ones, shuffled, so the small
model learns to find the answer in the passages and to ignore the rest. Train-only general pairs are
trained as they are asked in use: as a plain chat when their question retrieves nothing (most general
questions), else with the passages it retrieves, unrelated ones that the model learns to ignore. Evaluation and use put the top ``k`` passages into the prompt
(``agentpeft.retrieval``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from langchain_core.documents import Document

from ..errors import AgentpeftError
from ..retrieval import PassageIndex, augment_question, retrieve


@dataclass
class RaftData:
    """The retrieval-augmented train split and what happened to its rows."""

    path: Path
    rows: int
    augmented: int
    shortened: int
    dropped: int

    def summary(self) -> str:
        text = f"{self.augmented} of {self.rows} train rows carry passages"
        if self.shortened:
            text += f", {self.shortened} with fewer passages to fit max_seq_len"
        if self.dropped:
            text += f"; {self.dropped} dropped (longer than max_seq_len even with one passage)"
        return text


def training_passages(index: PassageIndex, top: list[Document], k: int, rng: random.Random) -> list[Document]:
    """``k`` passages for a training question: its ``top`` retrieved ones filled up with unrelated ones, shuffled."""
    others = [d for d in index.documents if all(d is not f for f in top)]
    found = [*top, *rng.sample(others, min(k - len(top), len(others)))]
    rng.shuffle(found)
    return found


def augment_dataset(dataset_dir: Path, documents: list[Document], tokenizer, k: int, distractors: int,
                    max_seq_len: int, seed: int = 0) -> RaftData:
    """A copy of a saved DatasetDict, in ``<dir>-raft``, whose knowledge rows' prompts carry passages.

    A row too long for ``max_seq_len`` loses passages, the unrelated ones first, until it fits; one that
    does not fit with its top passage alone is dropped and counted. The build fails when over half the
    rows would be lost. The eval split is left as it is: the evaluate stage adds the passages it retrieves.
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    index = PassageIndex(documents)
    rng = random.Random(seed)
    ds = load_from_disk(str(dataset_dir))
    rows, augmented, shortened, dropped = [], 0, 0, 0
    for row in ds["train"]:
        if row.get("train_only"):
            # As served: its own top passages, no distractors added (they are unrelated already).
            chosen = retrieve(index, row["question"], k)
            top = chosen
            if not chosen:
                rows.append(row)
                continue
        else:
            top = retrieve(index, row["question"], max(k - distractors, 1))
            chosen = training_passages(index, top, k, rng)
        offered = len(chosen)
        relevant = {id(d) for d in top}
        fitted = None
        while chosen:
            prompt = [dict(m) for m in row["prompt"]]
            prompt[-1]["content"] = augment_question(row["question"], chosen)
            text = tokenizer.apply_chat_template(prompt + list(row["completion"]), tokenize=False)
            n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n_tokens <= max_seq_len:
                fitted = {**row, "prompt": prompt, "text": text, "n_tokens": n_tokens}
                break
            # drop an unrelated passage first, then the lowest-ranked relevant one
            unrelated = [d for d in chosen if id(d) not in relevant]
            chosen = [d for d in chosen if d is not (unrelated[-1] if unrelated else chosen[-1])]
        if fitted is None and row.get("train_only"):
            rows.append(row)  # a general pair too long with a passage is trained as a plain chat
            continue
        if fitted is None:
            dropped += 1
            continue
        shortened += len(chosen) < offered
        rows.append(fitted)
        augmented += 1
    total = len(ds["train"])
    if dropped * 2 > total:
        raise AgentpeftError(f"retrieval mode: {dropped} of {total} training rows are longer than max_seq_len="
                             f"{max_seq_len} tokens even with one passage; raise retrieval.max_seq_len or --max-seq-len")
    out = dataset_dir.with_name(dataset_dir.name + "-raft")
    DatasetDict({"train": Dataset.from_list(rows), "eval": ds["eval"]}).save_to_disk(str(out))
    return RaftData(out, total, augmented, shortened, dropped)


def with_passages(rows: list[dict], index: PassageIndex, k: int) -> list[dict]:
    """Chat rows whose last user turn carries the question's top ``k`` passages, as ``load_llm`` asks it."""
    out = []
    for row in rows:
        prompt = [dict(m) for m in row["prompt"]]
        prompt[-1]["content"] = augment_question(row["question"], retrieve(index, row["question"], k))
        out.append({**row, "prompt": prompt})
    return out
