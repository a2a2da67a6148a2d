"""Stage 1, ingest: a knowledge-base folder or file becomes LangChain Documents.

Files that cannot be read (unreadable, binary, not UTF-8, a PDF without a text layer, a malformed
YAML, JSONL, CSV or XML file) are skipped with one warning that lists them all with the reason
(``strict=True`` makes the first such file an error, with its file and line); empty files are
skipped and named in the same warning. A knowledge base that yields no Document fails with a clear
message naming the files and why. Hidden files and
folders (a name starting with ".") are not read. Symbolic links are followed, each folder once, while
they resolve inside the knowledge base: a link that leads out of it (to ``/etc/passwd``, a home folder)
is skipped with one warning line per link unless ``follow_external_links`` (the recipe's
``data.follow_external_links``, ``--follow-external-links``) says to read it, so a shared knowledge base
cannot pull other files into training data, ``kb.jsonl`` or a teacher's prompts.
"""

from __future__ import annotations

import inspect
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from langchain_core.documents import Document

from ..errors import AgentpeftError
from ..plugins import collect
from ..progress import bar

log = logging.getLogger(__name__)

#: Largest knowledge-base file read, in MB, unless AGENTPEFT_MAX_FILE_MB or ``max_file_mb`` says otherwise:
#: a bigger file is skipped (an error under ``strict``) before a byte of it is read.
MAX_FILE_MB = 50.0
#: Most sections (chunks, pairs) one file may yield: a file that expands past it is skipped.
MAX_SECTIONS_PER_FILE = 100_000


def max_file_mb() -> float:
    """The per-file size limit: AGENTPEFT_MAX_FILE_MB when set to a positive number, else MAX_FILE_MB."""
    raw = os.environ.get("AGENTPEFT_MAX_FILE_MB", "").strip()
    if not raw:
        return MAX_FILE_MB
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise AgentpeftError(f"AGENTPEFT_MAX_FILE_MB={raw!r} is not a positive number of megabytes; "
                             "set it to one (e.g. 200) or unset it for the default of 50")
    return value


@dataclass(frozen=True)
class Loader:
    """Reads one kind of file into Documents (with ``source`` and ``line`` metadata).

    ``load(path, **options)``: the options it names among its keyword parameters come from the recipe
    (``chunk_size``, ``chunk_overlap`` and ``data.loader_options[name]``).
    """

    name: str
    suffixes: tuple[str, ...]
    load: Callable[..., list[Document]]


class SkipFile(AgentpeftError):
    """Raised by a loader for a file that cannot be read as text: ingest skips it with a warning."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}; fix the file or remove it from the knowledge base")
        self.path, self.reason = path, reason


def read_bytes(path: Path) -> bytes:
    """The file's bytes, once they are known to be non-empty UTF-8 text (else :class:`SkipFile`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SkipFile(path, f"unreadable ({exc.strerror or exc})") from None
    if not data.strip():
        raise SkipFile(path, "empty")
    if b"\x00" in data:
        raise SkipFile(path, "binary")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SkipFile(path, f"not UTF-8 text (byte {exc.start})") from None
    return data


def read_text(path: Path) -> str:
    """The file as text (UTF-8, byte-order mark dropped, universal newlines), or :class:`SkipFile`."""
    text = read_bytes(path).decode("utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def get_loaders() -> dict[str, Loader]:
    """Every registered loader by name."""
    return {loader.name: loader for loader in collect("register_loaders")}


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk(root: Path, suffixes: set[str], problems: list[tuple[Path, str]], follow_external_links: bool = False,
          external: list[tuple[Path, str]] | None = None) -> list[Path]:
    """The non-hidden files under ``root`` with one of ``suffixes``, following links but entering each folder once.

    A link whose target lies outside ``root`` (resolved) is left out and appended to ``external`` with its
    target, unless ``follow_external_links``.
    """
    files: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    real_root = os.path.realpath(root)
    external = [] if external is None else external

    def unreadable(exc: OSError) -> None:
        problems.append((Path(exc.filename or root), f"unreadable folder ({exc.strerror or exc})"))

    def leaves_root(path: str) -> bool:
        if follow_external_links or not os.path.islink(path):
            return False
        target = os.path.realpath(path)
        if _inside(target, real_root):
            return False
        external.append((Path(path), target))
        return True

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        try:
            st = os.stat(dirpath)
        except OSError as exc:
            unreadable(exc)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop, or a second link to a folder already read
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not leaves_root(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in suffixes:
                continue
            if leaves_root(os.path.join(dirpath, name)):
                continue
            path = Path(dirpath, name)
            try:
                fst = path.stat()
            except OSError:
                files.append(path)  # a broken or looping link: the reader reports it
                continue
            if not stat.S_ISREG(fst.st_mode):  # a FIFO or device would block or never end
                problems.append((path, "not a regular file"))
            elif (fst.st_dev, fst.st_ino) not in seen_files:
                seen_files.add((fst.st_dev, fst.st_ino))
                files.append(path)
    return files


def _suffixes(names: list[str] | None) -> dict[str, Loader]:
    available = get_loaders()
    return {s.lower(): available[n] for n in (names or list(available)) if n in available
            for s in available[n].suffixes}


def kb_files(kb: Path | str, loaders: list[str] | None = None, follow_external_links: bool = False) -> list[Path]:
    """The files :func:`ingest` reads from ``kb`` with these loaders (those it skips as unreadable included):
    what the dataset cache's hash covers."""
    kb = Path(kb)
    suffixes = _suffixes(loaders)
    if kb.is_dir():
        return _walk(kb, set(suffixes), [], follow_external_links)
    return [kb] if kb.suffix.lower() in suffixes else []


def _bind(loader: Loader, common: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for ``loader.load``: the common settings it takes, then its recipe options."""
    params = list(inspect.signature(loader.load).parameters.values())[1:]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(k for k in options if k not in names and not takes_any)
    if unknown:
        raise AgentpeftError(
            f"data.loader_options.{loader.name}: unknown option(s) {unknown}; "
            f"the {loader.name} loader takes {', '.join(n for n in names if n not in common) or 'no options'}"
        )
    kwargs = {k: v for k, v in common.items() if takes_any or k in names}
    kwargs.update(options)
    return kwargs


def _name(kb: Path, path: Path) -> str:
    try:
        return str(path.relative_to(kb)) if kb.is_dir() else str(path)
    except ValueError:
        return str(path)


def _listing(kb: Path, items: list[tuple[Path, str]]) -> str:
    return ", ".join(f"{_name(kb, p)} ({why})" for p, why in items)


def ingest(kb: Path | str, loaders: list[str] | None = None, options: dict[str, dict] | None = None,
           chunk_size: int = 1500, chunk_overlap: int = 150, strict: bool = False,
           max_file_mb: float | None = None, follow_external_links: bool = False) -> list[Document]:
    """Load every file under ``kb`` (a file or a folder, read recursively) that one of the named loaders reads.

    ``options`` maps a loader name to its keyword options (the recipe's ``data.loader_options``);
    ``chunk_size``/``chunk_overlap`` (characters) go to the loaders that chunk prose. A file larger
    than ``max_file_mb`` (default: :func:`max_file_mb`) or yielding more than MAX_SECTIONS_PER_FILE
    sections is skipped like an unreadable one, its reason naming the limit. A symbolic link that resolves
    outside ``kb`` is skipped with a warning naming it and its target, unless ``follow_external_links``.
    """
    kb = Path(kb)
    limit_mb = globals()["max_file_mb"]() if max_file_mb is None else max_file_mb
    available = get_loaders()
    names = loaders or list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise AgentpeftError(f"unknown loader(s) {unknown}; registered loaders: {sorted(available)}")
    options = options or {}
    stray = sorted(n for n in options if n not in available)
    if stray:
        raise AgentpeftError(f"data.loader_options names unknown loader(s) {stray}; registered loaders: {sorted(available)}")
    if chunk_size < 1 or not 0 <= chunk_overlap < chunk_size:
        raise AgentpeftError(f"chunk_overlap ({chunk_overlap}) must be at least 0 and below chunk_size ({chunk_size})")
    common = {"chunk_size": chunk_size, "chunk_overlap": chunk_overlap}
    kwargs = {n: _bind(available[n], common, options.get(n) or {}) for n in names}
    by_suffix = {s.lower(): available[n] for n in names for s in available[n].suffixes}

    if not kb.exists():
        raise AgentpeftError(f"knowledge base {kb} does not exist; point --kb at a folder of documents")
    problems: list[tuple[Path, str]] = []
    external: list[tuple[Path, str]] = []
    if kb.is_dir():
        files = _walk(kb, set(by_suffix), problems, follow_external_links, external)
        for link, target in external:
            log.warning("ingest skipped %s: a symbolic link to %s, outside the knowledge base; pass "
                        "--follow-external-links (data.follow_external_links: true) to read it",
                        _name(kb, link), target)
    elif kb.suffix.lower() in by_suffix:
        if not kb.is_file():
            raise AgentpeftError(f"knowledge base {kb} is not a regular file or folder; point --kb at documents")
        files = [kb]
    else:
        raise AgentpeftError(
            f"no loader reads {kb.name} (loaders {names} read {', '.join(sorted(by_suffix))}); "
            "rename the file or add its loader to data.loaders"
        )
    if not files and not problems:
        links = (f" but {len(external)} symbolic link(s) out of it, skipped (--follow-external-links reads them)"
                 if external else "")
        raise AgentpeftError(
            f"knowledge base {kb} holds no file that the loaders read ({', '.join(sorted(by_suffix))}){links}; "
            "add documents or point --kb elsewhere"
        )

    documents: list[Document] = []
    empty: list[tuple[Path, str]] = []
    for path in bar(iterable=files, desc="ingest", unit="file"):
        loader = by_suffix[path.suffix.lower()]
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # the loader reports what is wrong with it
        if size > limit_mb * 1e6:
            problems.append((path, f"{size / 1e6:.0f} MB, over the {limit_mb:g} MB limit per file; split it, "
                                   "or raise the limit with AGENTPEFT_MAX_FILE_MB"))
            continue
        try:
            got = loader.load(path, **kwargs[loader.name])
        except SkipFile as exc:
            (empty if exc.reason == "empty" else problems).append((path, exc.reason))
            continue
        except AgentpeftError as exc:  # a malformed structured file: one bad file must not stop the others
            if strict:
                raise
            problems.append((path, str(exc).replace(str(path), "").lstrip(":; ").split("; ")[0] or "malformed"))
            continue
        if not got:
            empty.append((path, "nothing to load"))
        elif len(got) > MAX_SECTIONS_PER_FILE:
            problems.append((path, f"{len(got)} sections, over the {MAX_SECTIONS_PER_FILE} limit per file; split it"))
            continue
        documents.extend(got)

    if problems and strict:
        raise AgentpeftError(
            f"{len(problems)} file(s) in {kb} cannot be read: {_listing(kb, problems)}; "
            "fix or remove them, or build without --strict to skip them"
        )
    skipped = []
    if problems:
        skipped.append(f"{len(problems)} file(s) that cannot be read: {_listing(kb, problems)}")
    if empty:
        skipped.append(f"{len(empty)} file(s) with no content: {_listing(kb, empty)}")
    if not documents:
        detail = f" (skipped {'; '.join(skipped)})" if skipped else ""
        raise AgentpeftError(f"knowledge base {kb} is empty: its files hold no text{detail}; add documents and retry")
    if skipped:
        log.warning("ingest skipped %s", "; and ".join(skipped))
    return documents
