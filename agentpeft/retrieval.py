"""Knowledge-base chunks as stored in a registry entry (``kb.jsonl``), semantic search over their passages,
and the prompt of retrieval-augmented mode, shared by training, evaluation, ``load_llm`` and ``kb_search``.

Passages are matched to a question by the cosine similarity of their sentence embeddings
(all-MiniLM-L6-v2, ``agentpeft.models.resolve_embedder``): a user's question rarely uses the words of
the page that answers it ("a desk that's always mine" for "Dedicated Desk"), which word matching misses.

``kb_search`` returns whole passages. The retrieval-augmented prompt carries the question's best
*sentences* instead, each under its section's heading, ranked by their own similarity plus half their
passage's: a small model asked with two whole passages often answers with the wrong sentence of the
right passage, and with a few ranked sentences it has less to choose from and a shorter prompt to read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from langchain_core.documents import Document

from .errors import AgentpeftError

KB_FILE = "kb.jsonl"
#: Longest passage, in characters: a section is cut into passages of whole sentences up to this length
#: (about 110 tokens: two passages and a question fit retrieval.max_seq_len).
PASSAGE_CHARS = 500
#: Least cosine similarity between a question and a passage for the passage to be retrieved. Questions
#: about a knowledge base score above it with their best passage; general questions ("What is the capital
#: of France?") score below it with every passage, so they are asked as they are.
MIN_SIMILARITY = 0.3
#: Weight of a sentence's passage in its ranking: a sentence is scored by its own similarity to the question
#: plus this much of its passage's, so that a sentence of the passage that answers the question outranks a
#: like-worded one elsewhere.
PASSAGE_WEIGHT = 0.5
#: Tokens of a passage the embedding model reads (all-MiniLM-L6-v2 was trained on up to 256).
EMBED_MAX_TOKENS = 256
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"(])|\n\s*\n|\n(?=\s*(?:[-*+]|\d+[.)])\s)")


class Embedder:
    """Unit-length mean-pooled sentence embeddings from a BERT-style model folder."""

    def __init__(self, folder: Path | str):
        from transformers import AutoModel, AutoTokenizer

        from .models import weights_hash

        self.folder = Path(folder)
        meta = self.folder / "agentpeft-model.json"
        #: What identifies the model's embeddings: its weights' digest (recorded when it was fetched).
        self.id = json.loads(meta.read_text())["weights_sha256"] if meta.is_file() else weights_hash(self.folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), use_safetensors=True).eval()

    def __call__(self, texts: list[str], batch_size: int = 64):
        import torch

        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                   max_length=EMBED_MAX_TOKENS, return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


@functools.lru_cache(maxsize=2)
def _embedder(folder: str) -> Embedder:
    return Embedder(folder)


def embedder() -> Embedder:
    """The embedding model retrieval uses, loaded once per process."""
    from .models import resolve_embedder

    return _embedder(str(resolve_embedder()))


def passages(documents: list[Document], max_chars: int = PASSAGE_CHARS) -> list[Document]:
    """The knowledge base as passages: each section cut at sentence and list-item boundaries into pieces
    of at most ``max_chars`` characters (a longer sentence is a passage of its own), with the section's
    metadata, so that a passage put into a prompt is never cut mid-fact."""
    out: list[Document] = []
    for doc in documents:
        text = doc.page_content.strip()
        if not text:
            continue
        if len(text) <= max_chars:
            out.append(doc)
            continue
        pieces = [p.strip() for p in _SENTENCE_END.split(text) if p and p.strip()]
        current = ""
        for piece in pieces:
            if current and len(current) + 1 + len(piece) > max_chars:
                out.append(Document(page_content=current, metadata=doc.metadata))
                current = piece
            else:
                current = f"{current} {piece}".strip() if current else piece
        if current:
            out.append(Document(page_content=current, metadata=doc.metadata))
    return out


def save_chunks(documents: list[Document], path: Path | str) -> Path:
    """Write Documents as JSON lines ({"text", "metadata"}), the knowledge base a registered model carries."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for doc in documents:
            fh.write(json.dumps({"text": doc.page_content, "metadata": doc.metadata}, ensure_ascii=False,
                                default=str) + "\n")
    return path


def load_chunks(path: Path | str) -> list[Document]:
    """Read the chunks written by :func:`save_chunks`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AgentpeftError(f"cannot read knowledge-base chunks {path}: {exc.strerror}; rebuild the model") from None
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            docs.append(Document(page_content=row["text"], metadata=row.get("metadata") or {}))
        except (ValueError, KeyError, TypeError):
            raise AgentpeftError(f"{path}:{number}: not a knowledge-base chunk; rebuild the model") from None
    return docs


def passage_text(doc: Document) -> str:
    """What is indexed and shown for a chunk: its heading or question, then its text."""
    meta = doc.metadata
    title = meta.get("question") or " / ".join(h for h in meta.get("headings") or [] if h) or meta.get("heading") or ""
    return f"{title}\n{doc.page_content}".strip() if title else doc.page_content


def cite(doc: Document) -> str:
    """A short source reference: file name and line."""
    source = doc.metadata.get("source")
    name = Path(source).name if source else "?"
    return f"{name}:{doc.metadata['line']}" if doc.metadata.get("line") else name


def _passage_vectors(embed: Embedder, texts: list[str]):
    """The passages' embeddings, computed once per embedding model and knowledge base and kept in
    ``AGENTPEFT_HOME/cache/embeddings`` (a build, ``load_llm`` and ``kb_search`` of the same knowledge base
    share them; a large knowledge base takes minutes to embed on a CPU)."""
    from safetensors.torch import load_file, save_file

    from .models import home

    digest = hashlib.sha256(embed.id.encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    path = home() / "cache" / "embeddings" / f"{digest.hexdigest()}.safetensors"
    try:
        vectors = load_file(str(path))["vectors"]
        if vectors.shape[0] == len(texts):
            return vectors
    except (OSError, KeyError, ValueError, RuntimeError):
        pass  # not cached yet, or unreadable: computed again
    vectors = embed(texts)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"vectors": vectors.contiguous()}, str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs embedding again next time
    finally:
        tmp.unlink(missing_ok=True)
    return vectors


def sentences(passage: Document) -> list[Document]:
    """A passage's sentences and list items, each a Document with the passage's metadata."""
    return [Document(page_content=piece.strip(), metadata=passage.metadata)
            for piece in _SENTENCE_END.split(passage.page_content) if piece and piece.strip()]


class PassageIndex:
    """Semantic search over the passages of knowledge-base chunks (:func:`passages`) and their sentences."""

    def __init__(self, documents: list[Document]):
        self.documents = passages([d for d in documents if d.page_content.strip()])
        if not self.documents:
            raise AgentpeftError("the knowledge base has no text to search; rebuild with a non-empty knowledge base")
        self._embed = embedder()
        self._vectors = _passage_vectors(self._embed, [passage_text(d) for d in self.documents])
        #: every passage's sentences, and the passage each one belongs to
        self.sentences = [(i, s) for i, d in enumerate(self.documents) for s in sentences(d)]
        self._sentence_vectors = _passage_vectors(self._embed, [passage_text(s) for _, s in self.sentences])
        self._owner = {id(s): i for i, s in self.sentences}

    def passage_of(self, sentence: Document) -> int:
        """The position in :attr:`documents` of the passage a sentence of :attr:`sentences` belongs to."""
        return self._owner[id(sentence)]

    def best_sentences(self, query: str, k: int = 3) -> list[tuple[Document, float]]:
        """The ``k`` sentences that best answer ``query`` (their similarity plus :data:`PASSAGE_WEIGHT` times
        their passage's), best first; none when no passage reaches :data:`MIN_SIMILARITY`."""
        if not query.strip():
            return []
        q = self._embed([query])[0]
        passage_scores = self._vectors @ q
        if float(passage_scores.max()) < MIN_SIMILARITY:
            return []
        owner = [i for i, _ in self.sentences]
        scores = (self._sentence_vectors @ q + PASSAGE_WEIGHT * passage_scores[owner]).tolist()
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(self.sentences[i][1], float(scores[i])) for i in order[:k]]

    def closest_sentence(self, text: str) -> Document:
        """The sentence most like ``text`` (the one a trained answer was taken from)."""
        scores = (self._sentence_vectors @ self._embed([text])[0]).tolist()
        return self.sentences[max(range(len(scores)), key=lambda i: (scores[i], -i))][1]

    def search(self, query: str, k: int = 3) -> list[tuple[Document, float]]:
        """The ``k`` passages most similar to ``query`` with their cosine similarity; passages below
        :data:`MIN_SIMILARITY` are left out."""
        if not query.strip():
            return []
        scores = (self._vectors @ self._embed([query])[0]).tolist()
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(self.documents[i], float(scores[i])) for i in order[:k] if scores[i] >= MIN_SIMILARITY]


#: A passage line that starts like a label of the prompt ("Question:", "Passages:", "[2]"): quoted with "> ", so
#: that knowledge-base text cannot pose as the user's question or open passages of its own.
_LABEL_LINE = re.compile(r"(?im)^(\s*(?:question|passages)\s*:|\s*\[\d+\])")


def augment_question(question: str, found: list[Document]) -> str:
    """The user turn of retrieval-augmented mode: numbered passages (or sentences) under their headings, then
    the question (the question alone when nothing is related to it, as for a general question)."""
    if not found:
        return question
    lines = [f"[{i}] " + _LABEL_LINE.sub(r"> \1", passage_text(d)) for i, d in enumerate(found, 1)]
    return "Passages:\n" + "\n".join(lines) + f"\n\nQuestion: {question}"


def retrieve(index: PassageIndex, question: str, k: int) -> list[Document]:
    """The top ``k`` sentences for ``question``: what every retrieval-augmented prompt is given."""
    return [doc for doc, _ in index.best_sentences(question, k)]
