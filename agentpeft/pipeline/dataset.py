"""Stage 2, dataset: Documents become instruction pairs, rendered with the chat template and split."""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from langchain_core.documents import Document

from ..errors import AgentpeftError
from ..plugins import collect
from ..progress import bar


@dataclass
class Pair:
    """One fact as a question/answer pair; ``key`` is the short fact the answer must contain."""

    question: str
    answer: str
    key: str | None = None
    source: str = ""
    generator: str = ""
    #: Other phrasings of the question that the generator knows (they keep the meaning exactly).
    paraphrases: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Generator:
    """Turns Documents into Pairs."""

    name: str
    generate: Callable[[list[Document]], Iterable[Pair]]


def get_generators() -> dict[str, Generator]:
    """Every registered generator by name."""
    return {g.name: g for g in collect("register_generators")}


# Surface rephrasings: train questions use the first family, held-out questions the second,
# so no held-out question text appears in train.
TRAIN_WRAPPERS = (
    "{q}",
    "{lower}",
    "Quick question: {q}",
    "Hi, {lc}",
    "{q} Thanks!",
    "Hello! {q}",
    "Can you help? {q}",
    "Question for support: {q}",
)
EVAL_WRAPPERS = (
    "I'd like to ask something. {q}",
    "Hey there, {lc} I couldn't find it myself.",
    "Sorry to bother you, but {lc}",
)


def _forms(q: str) -> dict[str, str]:
    lc = q[:1].lower() + q[1:]
    return {"q": q, "lc": lc, "lower": q.lower().rstrip("?").strip()}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


@dataclass
class DatasetResult:
    """What the dataset stage returns: the saved DatasetDict folder and its card."""

    path: Path
    card: dict

    def summary(self) -> str:
        c = self.card
        return (f"{c['facts']} facts -> {c['splits']['train']} train / {c['splits']['eval']} eval pairs "
                f"(max {c['max_tokens']} tokens)")


def phrase(pairs: list[Pair], train_phrasings: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Give each fact ``train_phrasings`` train questions and one differently phrased held-out question."""
    rng = random.Random(seed)
    train, held_out = [], []
    for i, pair in enumerate(pairs):
        forms = _forms(pair.question)
        wrapped = [w.format(**forms) for w in TRAIN_WRAPPERS]
        if pair.paraphrases:
            # A generator paraphrase is a real rewording: hold the last one out.
            eval_q = pair.paraphrases[-1]
            pool = [pair.question, *pair.paraphrases[:-1]] + wrapped[1:]
        else:
            eval_q = rng.choice(EVAL_WRAPPERS).format(**forms)
            pool = wrapped
        seen, questions = set(), []
        for q in pool:
            if _norm(q) not in seen and _norm(q) != _norm(eval_q):
                seen.add(_norm(q))
                questions.append(q)
        base = {"answer": pair.answer, "key": pair.key or pair.answer, "source": pair.source,
                "generator": pair.generator, "fact_id": i}
        train += [{"question": q, **base} for q in questions[:train_phrasings]]
        held_out.append({"question": eval_q, **base})
    return train, held_out


def build_dataset(documents: list[Document], generators: list[str], tokenizer, system_prompt: str,
                  out_dir: Path, train_phrasings: int = 4, max_seq_len: int = 256, seed: int = 0) -> DatasetResult:
    """Generate, deduplicate, phrase, render and split pairs; save a DatasetDict, JSONL and a card."""
    from datasets import Dataset, DatasetDict

    available = get_generators()
    unknown = [g for g in generators if g not in available]
    if unknown:
        raise AgentpeftError(f"unknown generator(s) {unknown}; registered generators: {sorted(available)}")
    pairs, seen = [], set()
    per_generator: dict[str, int] = {}
    for name in generators:
        for pair in available[name].generate(documents):
            pair.generator = pair.generator or name
            if _norm(pair.question) in seen:
                continue
            seen.add(_norm(pair.question))
            pairs.append(pair)
            per_generator[name] = per_generator.get(name, 0) + 1
    if not pairs:
        raise AgentpeftError(
            f"the knowledge base yields no question/answer pair with generators {generators}; "
            "use '## Question?' headings or '- **Attribute:** value' bullets, or pick other generators"
        )
    train, held_out = phrase(pairs, train_phrasings, seed)

    def render(rows: list[dict]) -> list[dict]:
        out = []
        for row in bar(iterable=rows, desc="render", unit="pair"):
            prompt = [{"role": "system", "content": system_prompt}, {"role": "user", "content": row["question"]}]
            completion = [{"role": "assistant", "content": row["answer"]}]
            text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n_tokens <= max_seq_len:
                out.append({**row, "prompt": prompt, "completion": completion, "text": text, "n_tokens": n_tokens})
        return out

    train, held_out = render(train), render(held_out)
    if not train or not held_out:
        raise AgentpeftError(f"every pair is longer than max_seq_len={max_seq_len} tokens; raise --max-seq-len")
    rng = random.Random(seed)
    rng.shuffle(train)
    ds = DatasetDict({"train": Dataset.from_list(train), "eval": Dataset.from_list(held_out)})
    out_dir.mkdir(parents=True, exist_ok=True)
    ds.save_to_disk(str(out_dir / "dataset"))
    for split, rows in (("train", train), ("eval", held_out)):
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({k: row[k] for k in ("question", "answer", "key", "source")}) + "\n")
    lengths = [r["n_tokens"] for r in train + held_out]
    card = {
        "facts": len(pairs),
        "documents": len(documents),
        "per_generator": per_generator,
        "splits": {"train": len(train), "eval": len(held_out)},
        "max_tokens": max(lengths),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "split_method": (
            f"every fact is trained with up to {train_phrasings} phrasings and evaluated once with a "
            "phrasing held out of train (a generator paraphrase where one exists, else a separate "
            "wrapper family); no eval question text occurs in train"
        ),
        "hash": hashlib.sha256(json.dumps([asdict(p) for p in pairs], sort_keys=True).encode()).hexdigest(),
    }
    (out_dir / "dataset_card.json").write_text(json.dumps(card, indent=2))
    (out_dir / "dataset_card.md").write_text(_card_markdown(card))
    return DatasetResult(out_dir / "dataset", card)


def _card_markdown(card: dict) -> str:
    lines = ["# Dataset card", "", f"- Facts: {card['facts']} from {card['documents']} document sections",
             f"- Train pairs: {card['splits']['train']}; held-out eval pairs: {card['splits']['eval']}",
             f"- Tokens per rendered pair: mean {card['mean_tokens']}, max {card['max_tokens']}",
             f"- Pairs per generator: {card['per_generator']}", f"- Split: {card['split_method']}",
             f"- Content hash: `{card['hash']}`", ""]
    return "\n".join(lines)
