"""Stage 2, dataset: Documents become instruction pairs, filtered, phrased, rendered and split.

generators -> filters (pii, dedup, length, the recipe's extras) -> paraphrases -> phrasings and
held-out split -> chat-template rendering -> DatasetDict + JSONL + dataset card, written atomically.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from langchain_core.documents import Document

from ..errors import AgentpeftError
from ..models import chat_prompt, file_sha256
from ..pairs import Filter, Generator, Pair, _stage, _Stage, key_fact, note, stage_tokenizer  # noqa: F401
from ..plugins import collect
from ..progress import bar

if TYPE_CHECKING:
    from ..recipe import Recipe


def get_generators() -> dict[str, Generator]:
    """Every registered generator by name."""
    return {g.name: g for g in collect("register_generators")}


def get_filters() -> dict[str, Filter]:
    """Every registered filter by name."""
    return {f.name: f for f in collect("register_filters")}


def teacher_model(recipe: "Recipe"):
    """The teacher chat model: the one handed to the running stage, else ``recipe.data.teacher`` resolved."""
    stage = _stage.get()
    if stage is not None and stage.teacher is not None:
        return stage.teacher
    if not recipe.data.teacher:
        return None
    from ..teacher import resolve_teacher

    model = resolve_teacher(recipe.data.teacher, recipe)
    if stage is not None:
        stage.teacher = model
    return model


def context_window(tokenizer) -> int:
    """The model's context length: ``max_position_embeddings`` from its config, else the tokenizer's limit."""
    config = Path(getattr(tokenizer, "name_or_path", "") or ".") / "config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 10**7


def count_tokens(tokenizer, system_prompt: str | None, question: str, answer: str) -> tuple[str, int]:
    """The rendered conversation ([system,] user, assistant) and its length in the base model's tokens."""
    messages = [*chat_prompt(system_prompt, question), {"role": "assistant", "content": answer}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text, len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- phrasing and the held-out split ------------------------------------------------------------

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


def phrase(pairs: list[Pair], train_phrasings: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Give each fact ``train_phrasings`` train questions and one differently phrased held-out question."""
    rng = random.Random(seed)
    train, held_out = [], []
    for i, pair in enumerate(pairs):
        base = {"answer": pair.answer, "key": pair.key or pair.answer, "source": pair.source,
                "generator": pair.generator, "fact_id": i, "system": pair.system, "train_only": not pair.held_out}
        if not pair.held_out:
            train.append({"question": pair.question, **base})
            continue
        forms = _forms(pair.question)
        wrapped = [w.format(**forms) for w in TRAIN_WRAPPERS]
        if pair.paraphrases:
            # A paraphrase is a real rewording: hold the last one out.
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
        train += [{"question": q, **base} for q in questions[:train_phrasings]]
        held_out.append({"question": eval_q, **base})
    # Across facts too: no held-out question text may occur in train.
    held = {_norm(row["question"]) for row in held_out}
    return [row for row in train if _norm(row["question"]) not in held], held_out


# --- paraphrase augmentation --------------------------------------------------------------------

_WH = r"(What|Which|Where|When|Who|Why|How(?: long| much| many| often| far| big| old)?)"
# The rest of a question up to its last non-space before the final "?". It ends at a non-space and the
# whitespace runs are taken possessively, so a run of spaces is read once, not again from each of its
# positions (``(.+?)\s*\?`` took seconds on a question padded with a few thousand spaces).
_REST = r"(.*?\S)\s*+\?$"
_INDIRECT = (
    (re.compile(rf"^{_WH}\s++(is|are|was|were)\s++{_REST}", re.I), lambda m: f"{m[1].lower()} {m[3]} {m[2]}"),
    (re.compile(rf"^{_WH}\s++(can|should|will|could|would|may|must)\s++(I|we|you|they)\s++{_REST}", re.I),
     lambda m: f"{m[1].lower()} {m[3]} {m[2]} {m[4]}"),
    (re.compile(rf"^{_WH}\s++do\s++(I|we|you|they)\s++{_REST}", re.I), lambda m: f"{m[1].lower()} {m[2]} {m[3]}"),
)
# "When is support available?" cannot become "when support available is": such questions keep their order.
_PREDICATIVE = re.compile(r"(?:ed|able|ible|ing|open|closed|ready|free|due|possible|necessary)$|^(?!the |a |an |my |"
                          r"your |our |this |that |these |those )", re.I)
_SWAPS = (
    (re.compile(r"^How much does (.+?) cost\?$", re.I), r"What is the price of \1?"),
    (re.compile(r"^What is the price of (.+?)\?$", re.I), r"How much does \1 cost?"),
    (re.compile(r"^What (is|are) the (.+?)\?$", re.I), r"Tell me the \2."),
    (re.compile(r"^What is\b", re.I), "What's"),
    (re.compile(r"^What's\b", re.I), "What is"),
    (re.compile(r"^Where is\b", re.I), "Where's"),
    (re.compile(r"^How do I\b", re.I), "What is the way to"),
    (re.compile(r"^Can I\b", re.I), "Am I able to"),
)
_FALLBACKS = ("Could you tell me: {lc}", "One thing I am unsure about: {lc}", "Please answer this: {lc}",
              "I need to know something. {q}")


def rule_paraphrases(question: str, n: int) -> list[str]:
    """Up to ``n`` deterministic rewrites of a question: indirect forms, word swaps, then fixed frames."""
    q = question.strip()
    out: list[str] = []
    for pattern, indirect in _INDIRECT:
        m = pattern.match(q)
        if m and not (m[2].lower() in ("is", "are", "was", "were") and _PREDICATIVE.search(m[3])):
            clause = indirect(m)
            out += [f"Can you tell me {clause}?", f"I'd like to know {clause}."]
            break
    for pattern, replacement in _SWAPS:
        rewritten = pattern.sub(replacement, q, count=1)
        if rewritten != q:
            out.append(rewritten)
    forms = _forms(q)
    out += [f.format(**forms) for f in _FALLBACKS]
    seen, picked = {_norm(q)}, []
    for candidate in out:
        if _norm(candidate) not in seen:
            seen.add(_norm(candidate))
            picked.append(candidate)
    return picked[:n]


def augment(pairs: list[Pair], n: int, recipe: "Recipe") -> int:
    """Give each pair ``n`` more phrasings (the teacher's when one is set, rule-based otherwise); count them."""
    if n <= 0:
        return 0
    teacher = teacher_model(recipe)
    note("paraphrased_by", "teacher, then rules" if teacher is not None else "rules")
    from_teacher: list[list[str]] = [[] for _ in pairs]
    if teacher is not None:
        from ..teacher import paraphrase_questions

        from_teacher = paraphrase_questions(teacher, [p.question for p in pairs], n)
    added = 0
    for pair, extra in zip(pairs, from_teacher):
        if not pair.held_out:
            continue
        known = {_norm(pair.question), *(_norm(p) for p in pair.paraphrases)}
        new = [q for q in extra if _norm(q) not in known][:n]
        known |= {_norm(q) for q in new}
        new += [q for q in rule_paraphrases(pair.question, n + len(known)) if _norm(q) not in known][: n - len(new)]
        # The generator's own last paraphrase stays last: it is the held-out phrasing.
        pair.paraphrases = [*pair.paraphrases[:-1], *new, *pair.paraphrases[-1:]]
        added += len(new)
    return added


# --- which generator covers which section -------------------------------------------------------

#: The built-in generators that cover a section no listed generator turned into pairs, by the section's shape.
FALLBACK_GENERATORS = ("qa", "faq", "prose")


def _split_source(source: str) -> tuple[str, int]:
    path, _, line = source.rpartition(":")
    return (path, int(line)) if line.isdigit() and path else (source, 0)


def section_of(documents: list[Document]) -> Callable[[str], int | None]:
    """Maps a pair's ``source`` (``path:line``) to the index of the document section it came from.

    A section of a file runs from its own line to the next section's line; a pair whose file holds no
    section maps to None.
    """
    import bisect

    by_file: dict[str, list[tuple[int, int]]] = {}
    for i, doc in enumerate(documents):
        by_file.setdefault(str(doc.metadata.get("source", "")), []).append((int(doc.metadata.get("line") or 0), i))
    for starts in by_file.values():
        starts.sort()

    def find(source: str) -> int | None:
        path, line = _split_source(source)
        starts = by_file.get(path)
        if not starts:
            return None
        at = bisect.bisect_right(starts, (line, len(documents))) - 1
        return starts[max(at, 0)][1]

    return find


def fallback_plan(documents: list[Document], pairs: list[Pair], generators: list[str]) -> dict[str, list[Document]]:
    """The sections no knowledge pair came from, by the built-in generator that fits each: ``qa`` for
    question/answer documents, ``faq`` for question headings, ``prose`` for the rest (a listed generator
    already saw every section, so it is not run again)."""
    find = section_of(documents)
    covered = {find(p.source) for p in pairs if p.held_out}
    plan: dict[str, list[Document]] = {}
    for i, doc in enumerate(documents):
        if i in covered:
            continue
        shape = ("qa" if doc.metadata.get("question") else
                 "faq" if str(doc.metadata.get("heading") or "").strip().endswith("?") else "prose")
        if shape not in generators:
            plan.setdefault(shape, []).append(doc)
    return {name: plan[name] for name in FALLBACK_GENERATORS if name in plan}


# --- the stage ----------------------------------------------------------------------------------

@dataclass
class DatasetResult:
    """What the dataset stage returns: the saved DatasetDict folder and its card."""

    path: Path
    card: dict
    cached: bool = False
    #: The ingested knowledge base (for retrieval); set by ``make_dataset``.
    documents: list[Document] = field(default_factory=list, repr=False)

    def sources(self) -> list[str]:
        """One line per knowledge-base file: sections, facts by generator, and the sections that gave none."""
        lines = []
        for src, c in self.card.get("per_source", {}).items():
            if not c.get("documents"):
                continue
            made = ", ".join(f"{g} {n}" for g, n in c.get("generators", {}).items()) or "no pair"
            empty = c.get("sections_without_pairs") or []
            lines.append(f"  {src}: {c['documents']} section(s) -> {c['facts']} fact(s) ({made})"
                         + (f"; nothing from {len(empty)}: {'; '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}"
                            if empty else ""))
        return lines

    def summary(self) -> str:
        c = self.card
        extra = f" + {c['train_only']} train-only" if c.get("train_only") else ""
        text = (f"{c['facts']} facts{extra} -> {c['splits']['train']} train / {c['splits']['eval']} eval pairs "
                f"(max {c['max_tokens']} tokens)")
        return f"cached: {text}" if self.cached else text


DEFAULT_FILTERS = ("dedup", "length")

#: Metadata a knowledge-base section keeps verbatim under PII redaction: where it comes from, not what it says.
_PLAIN_METADATA = frozenset({"source", "line", "page", "start_index"})


def redact_documents(documents: list[Document]) -> tuple[list[Document], Counter]:
    """The sections with every PII item replaced by its placeholder, in their text and their metadata
    (heading, question, key), and the number of items of each kind: what ``data.redact_pii`` applies right
    after ingestion, so that the teacher, the pairs, the dataset card and the registered ``kb.jsonl`` all
    see the redacted text only."""
    from ..pii import redact, replace_known

    totals: Counter = Counter()
    out = []
    for doc in documents:
        found: dict[str, str] = {}

        def clean(value):
            if isinstance(value, str):
                result = redact(value)
                totals.update(result.counts)
                found.update(result.found)
                return result.text
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        text = clean(doc.page_content)
        meta = {k: v if k in _PLAIN_METADATA else clean(v) for k, v in doc.metadata.items()}
        # A value found in one field (the answer) is PII in the others too (the key cut from it).
        text = replace_known(text, found)
        meta = {k: v if k in _PLAIN_METADATA or not isinstance(v, str) else replace_known(v, found)
                for k, v in meta.items()}
        out.append(Document(page_content=text, metadata=meta))
    return out, totals


def _filter_names(recipe: "Recipe") -> list[str]:
    names = (["pii"] if recipe.data.redact_pii else []) + list(DEFAULT_FILTERS) + list(recipe.data.filters)
    return list(dict.fromkeys(names))


def _call_generator(generator: Generator, documents: list[Document], recipe: "Recipe") -> Iterable[Pair]:
    params = [p for p in inspect.signature(generator.generate).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return generator.generate(documents, recipe) if len(params) >= 2 else generator.generate(documents)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                      and not (out_dir / "dataset_card.json").is_file())):
        raise AgentpeftError(f"{out_dir} exists and is not an agentpeft dataset folder; "
                             "pass an empty or new folder as --out")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished folder into place; an earlier dataset there is swapped out, never half-replaced."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _adhoc_recipe(generators: list[str], system_prompt: str, train_phrasings: int, max_seq_len: int,
                  seed: int) -> "Recipe":
    from ..recipe import DataConfig, Recipe, TrainConfig

    return Recipe(name="adhoc", system_prompt=system_prompt,
                  data=DataConfig(generators=generators, train_phrasings=train_phrasings, seed=seed,
                                  auto_generators=False,
                                  general=DataConfig.model_fields["general"].default if "general" in generators else 0),
                  train=TrainConfig(max_seq_len=max_seq_len))


def build_dataset(documents: list[Document], generators: list[str], tokenizer, system_prompt: str,
                  out_dir: Path, train_phrasings: int = 4, max_seq_len: int = 256, seed: int = 0, *,
                  recipe: "Recipe | None" = None, teacher=None, redactions: dict | None = None) -> DatasetResult:
    """Generate, filter, paraphrase, phrase, render and split pairs; save a DatasetDict, JSONL and a card.

    ``recipe`` supplies the data settings (filters, paraphrases, PII redaction, teacher); without one
    the defaults apply. ``teacher`` is a LangChain chat model that overrides ``recipe.data.teacher``.
    With ``data.redact_pii`` the sections are redacted first (:func:`redact_documents`), unless
    ``redactions`` gives the counts of a redaction already applied to them; the result's ``documents``
    are the sections as read. The folder ``out_dir`` appears complete or not at all.
    """
    recipe = recipe or _adhoc_recipe(generators, system_prompt, train_phrasings, max_seq_len, seed)
    if recipe.data.redact_pii and redactions is None:
        documents, redactions = redact_documents(documents)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    available, filters = get_generators(), get_filters()
    unknown = [g for g in generators if g not in available]
    if unknown:
        raise AgentpeftError(f"unknown generator(s) {unknown}; registered generators: {sorted(available)}")
    names = _filter_names(recipe)
    unknown = [f for f in names if f not in filters]
    if unknown:
        raise AgentpeftError(f"unknown filter(s) {unknown} in data.filters; registered filters: {sorted(filters)}")

    stage = _Stage(tokenizer=tokenizer, teacher=teacher)
    token = _stage.set(stage)
    try:
        pairs: list[Pair] = []
        generated: dict[str, int] = {}

        def run(name: str, docs: list[Document]) -> None:
            for pair in _call_generator(available[name], docs, recipe):
                pair.generator = pair.generator or name
                pairs.append(pair)
                generated[name] = generated.get(name, 0) + 1

        for name in generators:
            run(name, documents)
        if recipe.data.auto_generators:
            for name, docs in fallback_plan(documents, pairs, generators).items():
                run(name, docs)
        if recipe.data.general and "general" not in generators:
            run("general", documents)
        if not any(p.held_out for p in pairs):  # train-only pairs (general) are not the knowledge base's
            raise AgentpeftError(
                f"the knowledge base yields no question/answer pair with generators {sorted(generated) or generators}"
                f" ({len(documents)} sections read; every section's text is too short or has no sentence to ask "
                "about); add prose, FAQ or Q/A files to the knowledge base"
            )
        filter_counts = []
        for name in names:
            before = len(pairs)
            pairs = list(filters[name].apply(pairs, recipe))
            filter_counts.append({"name": name, "in": before, "out": len(pairs)})
        if not pairs:
            raise AgentpeftError(f"every pair was removed by the filters {names}; see the filter counts "
                                 "or relax data.filters / train.max_seq_len")
        added = augment(pairs, recipe.data.paraphrases, recipe)
        notes = dict(stage.notes)
    finally:
        _stage.reset(token)

    train, held_out = phrase(pairs, train_phrasings, seed)

    def render(rows: list[dict]) -> list[dict]:
        out = []
        for row in bar(iterable=rows, desc="render", unit="pair"):
            system = system_prompt if row.get("system", True) else None
            text, n_tokens = count_tokens(tokenizer, system, row["question"], row["answer"])
            if n_tokens <= max_seq_len:
                prompt = chat_prompt(system, row["question"])
                completion = [{"role": "assistant", "content": row["answer"]}]
                out.append({**row, "prompt": prompt, "completion": completion, "text": text, "n_tokens": n_tokens})
        return out

    train, held_out = render(train), render(held_out)
    if not train or not held_out:
        raise AgentpeftError(f"every pair is longer than max_seq_len={max_seq_len} tokens; raise --max-seq-len")
    random.Random(seed).shuffle(train)
    if recipe.data.redact_pii:  # the sections' redactions, and what the pii filter still found in pairs
        notes["redactions"] = dict(sorted((Counter(redactions or {}) + Counter(notes.get("redactions", {}))).items()))
    card = _card(pairs, documents, generated, filter_counts, notes, added, train, held_out, recipe)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write(tmp, train, held_out, card)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DatasetResult(out_dir / "dataset", card, documents=documents)


def _source_files(sources: list[str], kb: Path | None) -> dict[str, str]:
    """Each source (``path:line``) as a file path relative to the knowledge base, or to the files' common folder."""
    paths = {src: re.sub(r":\d+$", "", src) for src in sources}
    root = Path(kb).resolve() if kb is not None else None
    if root is not None and root.is_file():
        root = root.parent
    if root is None:
        absolute = [os.path.dirname(os.path.abspath(p)) for p in paths.values() if p]
        try:
            root = Path(os.path.commonpath(absolute)) if absolute else None
        except ValueError:
            root = None
    out = {}
    for src, path in paths.items():
        try:
            out[src] = str(Path(path).resolve().relative_to(root)) if root is not None and path else path
        except ValueError:
            out[src] = path
    return out


def _histogram(lengths: list[int], bins: int = 20) -> dict:
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    edges = list(range(low, high + width + 1, width))
    counts = [0] * (len(edges) - 1)
    for n in lengths:
        counts[min((n - low) // width, len(counts) - 1)] += 1
    return {"edges": edges, "counts": counts}


def _card(pairs, documents, generated, filter_counts, notes, added, train, held_out, recipe) -> dict:
    lengths = [r["n_tokens"] for r in train + held_out]
    doc_sources = [str(d.metadata.get("source", "")) for d in documents]
    files = _source_files([p.source for p in pairs] + doc_sources, recipe.kb_path)
    facts_by_source = Counter(files[p.source] for p in pairs if p.held_out)
    extra_by_source = Counter(files[p.source] for p in pairs if not p.held_out)
    docs_by_source = Counter(files[src] for src in doc_sources)
    by_generator: dict[str, Counter] = {}
    for p in pairs:
        if p.held_out:
            by_generator.setdefault(files[p.source], Counter())[p.generator] += 1
    find = section_of(documents)
    covered = {find(p.source) for p in pairs if p.held_out}
    unlearned: dict[str, list[str]] = {}
    for i, doc in enumerate(documents):
        if i not in covered:
            meta = doc.metadata
            where = meta.get("heading") or meta.get("question") or (f"page {meta['page']}" if meta.get("page") else "")
            unlearned.setdefault(files[doc_sources[i]], []).append(f"{where or '(untitled)'} (line {meta.get('line', 0)})")
    redactions = notes.pop("redactions", {})
    return {
        "facts": sum(facts_by_source.values()),
        "train_only": sum(extra_by_source.values()),
        "documents": len(documents),
        "generated": generated,
        "per_generator": dict(Counter(p.generator for p in pairs)),
        "per_source": {src: {"documents": docs_by_source.get(src, 0), "facts": facts_by_source.get(src, 0),
                             "generators": dict(sorted(by_generator.get(src, {}).items())),
                             "sections_without_pairs": unlearned.get(src, []),
                             **({"train_only": extra_by_source[src]} if extra_by_source.get(src) else {})}
                       for src in sorted(set(docs_by_source) | set(facts_by_source) | set(extra_by_source))},
        "filters": filter_counts,
        "redact_pii": recipe.data.redact_pii,
        "redactions": redactions,
        "paraphrases": {"per_question": recipe.data.paraphrases, "added": added,
                        "by": notes.pop("paraphrased_by", "rules")},
        "notes": notes,
        "splits": {"train": len(train), "eval": len(held_out)},
        "max_tokens": max(lengths),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "token_histogram": _histogram(lengths),
        "split_method": (
            f"grouped by fact: every fact is trained with up to {recipe.data.train_phrasings} phrasings and "
            "evaluated once with a phrasing held out of train (a paraphrase where one exists, else a separate "
            "wrapper family); no eval question text occurs in train, so eval tests recall of trained facts "
            "through new phrasings"
        ),
        "hash": hashlib.sha256(json.dumps([asdict(p) for p in pairs], sort_keys=True).encode()).hexdigest(),
    }


def _write(folder: Path, train: list[dict], held_out: list[dict], card: dict) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(train), "eval": Dataset.from_list(held_out)}).save_to_disk(
        str(folder / "dataset"))
    for split, rows in (("train", train), ("eval", held_out)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({k: row[k] for k in ("question", "answer", "key", "source", "generator")},
                                    ensure_ascii=False) + "\n")
    _plot_lengths(card, folder / "token_lengths.png")
    (folder / "dataset_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False))
    (folder / "dataset_card.md").write_text(_card_markdown(card))


def _plot_lengths(card: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = card["token_histogram"]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.stairs(hist["counts"], hist["edges"], fill=True)
    ax.set_xlabel("tokens per rendered pair (base model tokenizer)")
    ax.set_ylabel("pairs")
    ax.set_title("Token lengths, train + eval")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _card_markdown(card: dict) -> str:
    lines = ["# Dataset card", "",
             f"- Facts: {card['facts']} from {card['documents']} document sections; train-only general pairs: "
             f"{card.get('train_only', 0)}",
             f"- Train pairs: {card['splits']['train']}; held-out eval pairs: {card['splits']['eval']}",
             f"- Tokens per rendered pair: mean {card['mean_tokens']}, max {card['max_tokens']} "
             "(histogram: token_lengths.png)",
             f"- Pairs per generator: {card['per_generator']} (generated before filtering: {card['generated']})",
             f"- Paraphrases: {card['paraphrases']['added']} added "
             f"({card['paraphrases']['per_question']} per question, by {card['paraphrases']['by']})",
             f"- Split: {card['split_method']}",
             f"- Content hash: `{card['hash']}`", "", "## Filters", "", "| filter | pairs in | pairs out |",
             "|---|---|---|"]
    lines += [f"| {f['name']} | {f['in']} | {f['out']} |" for f in card["filters"]]
    lines += ["", "## PII redaction", ""]
    if card["redact_pii"]:
        total = sum(card["redactions"].values())
        lines.append(f"{total} items replaced by typed placeholders" + (":" if total else "."))
        lines += [f"- {kind}: {n}" for kind, n in sorted(card["redactions"].items())]
    else:
        lines.append("Off for this recipe (data.redact_pii: false).")
    lines += ["", "## Sources", "", "What the model learns from each file: its sections, the facts each generator made of "
              "them (after filtering), and the sections that gave no pair (the model will not know what they say).", "",
              "| file | sections | facts | by generator | sections without pairs |", "|---|---|---|---|---|"]
    lines += [f"| {src} | {c['documents']} | {c['facts']} | "
              f"{', '.join(f'{g} {n}' for g, n in c.get('generators', {}).items()) or '-'} | "
              f"{'; '.join(c.get('sections_without_pairs', [])) or '-'} |"
              for src, c in card["per_source"].items() if c["documents"] or c["facts"]]
    for key, value in card["notes"].items():
        lines += ["", f"## {key}", "", f"`{json.dumps(value, ensure_ascii=False)}`"]
    lines.append("")
    return "\n".join(lines)


# --- the stage's entry point, with caching ------------------------------------------------------

def kb_hash(kb: Path, loaders: list[str] | None = None, follow_external_links: bool = False) -> str:
    """sha256 over the files of a knowledge base that ingest reads with these loaders: relative path and bytes,
    in path order. Hidden files and folders (``.git``) are left out, as ingest leaves them; files reached
    through a symbolic link (into a folder inside the knowledge base, or outside it with
    ``follow_external_links``) are read through it, so editing them changes the hash."""
    from .ingest import kb_files

    kb = Path(kb)
    files = sorted(kb_files(kb, loaders, follow_external_links))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(kb) if path != kb else path.name).encode())
        try:
            digest.update(file_sha256(path).encode())
        except OSError as exc:
            digest.update(f"unreadable:{exc.errno}".encode())
    return digest.hexdigest()


#: Bumped when the rows a dataset holds change (their columns, or what a built-in generator writes), so that
#: cached datasets are rebuilt.
DATASET_FORMAT = 5

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "config.json")


def dataset_cache_key(recipe: "Recipe", base_dir: Path) -> str:
    """The content hash that decides whether a cached dataset can be reused.

    It covers the knowledge base's bytes, the data settings, system prompt and max_seq_len, the base
    model's tokenizer files, the agentpeft version and the loaded plugins.
    """
    from .. import __version__
    from ..plugins import plugin_fingerprint

    tokenizer = {name: file_sha256(Path(base_dir) / name) for name in _TOKENIZER_FILES
                 if (Path(base_dir) / name).is_file()}
    payload = {
        "kb": kb_hash(recipe.kb_path, recipe.data.loaders, recipe.data.follow_external_links),
        "data": recipe.data.model_dump(mode="json"),
        "system_prompt": recipe.system_prompt,
        "max_seq_len": recipe.train.max_seq_len,
        "tokenizer": tokenizer,
        "agentpeft": __version__,
        "rows": DATASET_FORMAT,
        "plugins": plugin_fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    from ..models import home

    return home() / "cache" / "datasets"


def _copy_dir(src: Path, out_dir: Path) -> None:
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_dataset(recipe: "str | Recipe", kb: str | Path | None = None, out: str | Path | None = None,
                 base: str | None = None, teacher: Any = None, *, cache: bool = True, strict: bool | None = None,
                 data_mix: dict | None = None, log: Callable[[str], None] = print,
                 on_stage: Callable[[str, str], None] | None = None) -> DatasetResult:
    """Run ingest and the dataset stage for a recipe: the ``agentpeft data`` verb, also used by ``build``.

    ``teacher`` is a model name, ``base``, a provider string (``openai:gpt-4o-mini``) or a LangChain
    chat model. With ``cache`` an unchanged knowledge base and unchanged settings reuse the dataset
    cached under ``AGENTPEFT_HOME/cache/datasets/<hash>/``. ``on_stage(stage, summary)`` is called
    after ingest and after the dataset stage. ``strict`` fails on unreadable files instead of skipping them;
    ``data_mix`` overrides DataConfig fields (general, train_phrasings, ...).
    """
    from ..models import load_tokenizer, resolve_base
    from ..recipe import configure
    from .ingest import ingest

    recipe = configure(recipe, kb, base, strict, data_mix)
    if recipe.kb_path is None:
        raise AgentpeftError(f"recipe {recipe.name!r} has no knowledge base; pass --kb PATH")
    model_object = teacher is not None and not isinstance(teacher, str)
    if teacher is not None:
        data = {"teacher": None if model_object else teacher}
        if "teacher" not in recipe.data.generators:
            data["generators"] = [*recipe.data.generators, "teacher"]
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update=data)})
    out_dir = Path(out) if out is not None else Path.cwd() / f"{recipe.name}-data"
    _check_out_dir(out_dir)
    report = on_stage or (lambda stage, summary: None)
    d = recipe.data
    # Ingest first: it is fast and checks the knowledge base before any model is fetched.
    documents = ingest(recipe.kb_path, d.loaders, d.loader_options, d.chunk_size, d.chunk_overlap, d.strict,
                       follow_external_links=d.follow_external_links)
    redactions = None
    if d.redact_pii:  # once, here: the teacher, the pairs and the registered kb.jsonl see redacted text only
        documents, redactions = redact_documents(documents)
    report("ingest", f"{len(documents)} document sections from {recipe.kb_path}"
           + (f", {sum(redactions.values())} PII item(s) redacted" if redactions is not None else ""))
    base_dir = resolve_base(recipe.base_model, log=log)

    key = None if model_object else dataset_cache_key(recipe, base_dir)
    cached = cache_dir() / key if key else None
    if cache and cached is not None and (cached / "dataset_card.json").is_file():
        _copy_dir(cached, out_dir)
        result = DatasetResult(out_dir / "dataset", json.loads((out_dir / "dataset_card.json").read_text()), True,
                               documents)
        report("dataset", f"{result.summary()} (knowledge base and settings unchanged, hash {key[:12]})")
        for line in result.sources():
            log(line)
        return result

    result = build_dataset(documents, recipe.data.generators, load_tokenizer(base_dir), recipe.system_prompt,
                           out_dir, recipe.data.train_phrasings, recipe.train.max_seq_len, recipe.data.seed,
                           recipe=recipe, teacher=teacher if model_object else None, redactions=redactions)
    result.documents = documents
    if cached is not None:
        _store(out_dir, cached)
    report("dataset", result.summary())
    for line in result.sources():
        log(line)
    return result


def _store(folder: Path, cached: Path) -> None:
    """Copy a finished dataset into the cache: written aside, then renamed into place."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name[:12]}.tmp-", dir=cached.parent))
    try:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        if cached.exists():
            shutil.rmtree(cached)
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a cache that cannot be written only costs a rebuild
