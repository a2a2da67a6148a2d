"""Retrieval-augmented mode (RAFT): training prompts that carry retrieved passages.

With retrieval on, each knowledge question of the train split is rendered as it will be asked in use,
with the top ``k`` sentences retrieved for it in their ranked order (``agentpeft.retrieval.retrieve``),
and the sentence its answer comes from among them: where retrieval missed it, it takes the lowest rank.
``distractors`` of the other retrieved sentences are replaced by unrelated ones at the end. The model
learns to answer from the sentence that fits the question and to ignore the rest. Train-only general
pairs are trained as they are asked: as a plain chat when their question retrieves nothing (most general
questions), else with the sentences it retrieves, unrelated ones that the model learns to ignore.
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


def training_passages(index: PassageIndex, question: str, answer: str, k: int, distractors: int,
                      rng: random.Random) -> tuple[list[Document], Document]:
    """The ``k`` sentences a training question is given, in rank order, and the one its answer comes from:
    the retrieved ones with the answer's sentence in the last place when retrieval missed it, and the
    lowest-ranked ``distractors`` of the others replaced by unrelated sentences."""
    gold = index.closest_sentence(answer)
    found = retrieve(index, question, k) or [gold]
    if all(d.page_content != gold.page_content for d in found):
        found[-1] = gold
    gold = next(d for d in found if d.page_content == gold.page_content)
    others = [d for d in found if d is not gold]
    replace = others[len(others) - min(distractors, len(others)):] if distractors else []
    kept = [d for d in found if all(d is not r for r in replace)]
    near = {index.passage_of(d) for d in found}
    unrelated = [i for i in rng.sample(range(len(index.sentences)), min(len(index.sentences), 8 * len(replace) + 8))
                 if index.sentences[i][0] not in near][:len(replace)]
    return kept + [index.sentences[i][1] for i in unrelated], gold


def augment_dataset(dataset_dir: Path, documents: list[Document], tokenizer, k: int, distractors: int,
                    max_seq_len: int, seed: int = 0) -> RaftData:
    """A copy of a saved DatasetDict, in ``<dir>-raft``, whose knowledge rows' prompts carry passages.

    A row too long for ``max_seq_len`` loses sentences, the answer's own last, until it fits; one that
    does not fit with the answer's sentence alone is dropped and counted. The build fails when over half the
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
            chosen, gold = training_passages(index, row["question"], row["answer"], k,
                                             distractors, rng)
            top = [gold]
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
            # drop the lowest-ranked other sentence first, the answer's own last
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
