"""The local model registry: ``AGENTPEFT_HOME/registry/NAME/VERSION/``, published atomically."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

with warnings.catch_warnings():  # without fcntl it warns that only its soft lock is left: held_lock uses that one then
    warnings.simplefilter("ignore")
    import filelock

from .errors import AgentpeftError
from .models import home

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

log = logging.getLogger(__name__)

# Matched with fullmatch: "$" would also match before a trailing newline. Character ranges are ASCII.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: A version: a positive whole number in ASCII digits, no leading zero (str.isdigit and int() also take
#: Unicode digits such as "²" or "٢"); nine digits at most, far below int()'s digit limit.
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


def registry_dir() -> Path:
    return home() / "registry"


#: Names Windows reserves for devices: a folder so named cannot be created or copied there.
_RESERVED = {"con", "prn", "aux", "nul", *(f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10))}


def check_name(name: str) -> str:
    """A registry name: lower case letters, digits, '.', '_' and '-', no path parts."""
    if name and name.split(".")[0] in _RESERVED:
        raise AgentpeftError(f"invalid model name {name!r}: {name.split('.')[0]!r} is a reserved device name "
                             "on Windows; pick another --name")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name or name.endswith("."):
        raise AgentpeftError(
            f"invalid model name {name!r}: use lower-case letters, digits, '.', '_' or '-' "
            "(at most 64 characters, no slashes), e.g. --name my-bot"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` (the latest version) or ``NAME@VERSION``, VERSION a positive whole number."""
    name, at, version = ref.partition("@")
    check_name(name)
    if at and not _VERSION.fullmatch(version):
        raise AgentpeftError(f"invalid version {version!r} in {ref!r}; use NAME@N with N a whole number from 1 "
                             f"(ASCII digits, no leading zero), e.g. {name}@1, or NAME alone for the latest")
    return name, int(version) if at else None


def _version_of(folder: Path) -> int | None:
    """The version a registry entry folder holds, or None for anything else (staging, trash, stray names)."""
    return int(folder.name) if _VERSION.fullmatch(folder.name) else None


def versions(name: str) -> list[int]:
    folder = registry_dir() / name
    if not folder.is_dir():
        return []
    return sorted(v for p in folder.iterdir()
                  if (v := _version_of(p)) is not None and (p / "manifest.json").is_file())


def resolve(ref: str) -> Path:
    """The folder of a registered model version."""
    name, version = parse_ref(ref)
    known = versions(name)
    if not known:
        raise AgentpeftError(f"no model named {name!r} in the registry; build one with `agentpeft build RECIPE --name {name}` or see `agentpeft list`")
    if version is None:
        version = known[-1]
    if version not in known:
        raise AgentpeftError(f"{name} has no version {version}; versions: {', '.join(map(str, known))}")
    return registry_dir() / name / str(version)


def _manifest_problem(manifest: object, name: str, version: int) -> str | None:
    """What makes ``manifest`` not the one publish wrote for ``name@version``; None if nothing does."""
    if not isinstance(manifest, dict):
        return f"holds a JSON {type(manifest).__name__}, not an agentpeft manifest"
    if manifest.get("name") != name or manifest.get("version") != version:
        return (f"is the manifest of {manifest.get('name')!r} version {manifest.get('version')!r}, "
                f"not of {name}@{version}")
    metrics = manifest.get("metrics")
    primary = metrics.get("primary") if isinstance(metrics, dict) else None
    scored = primary is not None and all(
        isinstance(metrics.get(side), dict) and isinstance(metrics[side].get(primary), (int, float))
        for side in ("base", "tuned"))
    if not isinstance(manifest.get("recipe"), str) or not scored:
        return "lacks the recipe or the metrics an agentpeft manifest has"
    return None


def _read_manifest(entry: Path) -> dict:
    """The manifest of the registry entry folder ``NAME/VERSION``; a one-line error naming the file if it
    cannot be read or is not the one publish wrote there."""
    path, name, version = entry / "manifest.json", entry.parent.name, int(entry.name)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problem = f"cannot be read as JSON ({type(exc).__name__}: {' '.join(str(exc).split()) or 'empty'})"
    else:
        problem = _manifest_problem(manifest, name, version)
        if problem is None:
            return manifest
    raise AgentpeftError(f"{path} {problem}; restore it, or remove the version with "
                         f"`agentpeft rm {name}@{version} --yes`")


def show(ref: str) -> dict:
    """The manifest of a registered model version."""
    return _read_manifest(resolve(ref))


def load(ref: str):
    """(model, tokenizer, manifest) of a registered version: merged weights, or base + adapter."""
    from .models import load_model, load_tokenizer, load_tuned

    entry, manifest = resolve(ref), show(ref)
    if (entry / "merged").is_dir():
        return load_model(entry / "merged"), load_tokenizer(entry / "merged"), manifest
    base = manifest["base_model"]["path"]
    return load_tuned(base, entry / "adapter"), load_tokenizer(base), manifest


#: Manifests already warned about in this process: each is named once, however often the registry is listed.
_warned: set[Path] = set()


def list_models() -> list[dict]:
    """One row per registered name: latest manifest plus the list of versions.

    A version whose manifest is empty, not JSON or not agentpeft's is left out, with one warning naming
    the file; the name's row then shows its latest readable version.
    """
    rows = []
    root = registry_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not _NAME.fullmatch(folder.name):
            continue  # staging, trash or a stray folder: not a registered name
        readable: dict[int, dict] = {}
        for version in versions(folder.name):
            try:
                readable[version] = _read_manifest(folder / str(version))
            except AgentpeftError as exc:
                if folder / str(version) not in _warned:
                    _warned.add(folder / str(version))
                    log.warning("skipped %s@%d: %s", folder.name, version, exc)
        if readable:
            rows.append({**readable[max(readable)], "versions": sorted(readable)})
    return rows


def remove(ref: str) -> list[Path]:
    """Delete one version (``NAME@N``) or every version (``NAME``) of a registered model."""
    name, version = parse_ref(ref)
    resolve(ref)  # the error names what exists
    with _lock(name) as folder:
        targets = [folder / str(version)] if version is not None else [folder / str(v) for v in versions(name)]
        for target in targets:
            # Renamed away first, so a reader never sees a half-deleted version.
            trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=folder))
            os.rename(target, trash / "entry")
            shutil.rmtree(trash)
    return targets


def export(ref: str, directory: str | Path, format: str = "hf", quant: str | None = None) -> Path:
    """Export a registered version (``NAME`` or ``NAME@VERSION``) into the new or empty folder ``directory``.

    ``format``: ``hf`` copies the version's folder (manifest, card, adapter, merged weights); ``gguf``
    writes the merged model as ``model.gguf`` for llama.cpp (2-D weights in ``quant``: f16 by default,
    bf16, q8_0 or f32), beside the adapter alone, the manifest and the card; ``ollama`` adds a
    ``Modelfile`` for ``ollama create``.

    The target must lie outside the registry (a copy there would pose as a version) and outside the
    version itself (the copy would recurse). The export is written beside the target and renamed into
    place, so a failed export leaves no half-written folder.
    """
    from .gguf_export import check_options, write_package

    quant = check_options(format, quant)
    source = resolve(ref)
    target = Path(directory)
    where, inside = target.resolve(), lambda folder: where == folder or folder in where.parents
    if inside(source.resolve()):
        raise AgentpeftError(f"cannot export {ref} into {target}: it is inside the version being copied; "
                             "export to a folder outside AGENTPEFT_HOME/registry")
    if inside(registry_dir().resolve()):
        raise AgentpeftError(f"cannot export {ref} into {target}: it is inside the registry ({registry_dir()}), "
                             "where a copy would pose as a registered version; export to a folder outside it")
    if target.exists() and not target.is_dir():
        raise AgentpeftError(f"{target} is a file; export into a new or empty folder")
    if target.exists() and any(target.iterdir()):
        raise AgentpeftError(f"{target} exists and is not empty; export into a new or empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    failed: list[OSError] = []

    def copy(src: str, dst: str) -> str:
        try:
            return shutil.copy2(src, dst)
        except OSError as exc:
            failed.append(exc)
            raise

    try:
        if format == "hf":
            shutil.copytree(source, aside / "copy", copy_function=copy)
        else:
            write_package(source, _read_manifest(source), aside / "copy", format, quant)
        os.rename(aside / "copy", target)  # replaces an empty target folder
    except shutil.Error:
        # copytree goes on past a failed file and raises a list of them; the first, a plain OSError,
        # says what went wrong (a full disk, say) and is what the CLI turns into its one-line error.
        if failed:
            raise failed[0] from None
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return target


def _open_lock(path: Path) -> int:
    """A file descriptor on the lock file ``path``, created if missing, never through a symbolic link.

    Opened for reading and writing but never truncated: it carries the lock (and, for a build, the
    holder's pid). A lock that is a symbolic link is refused, since opening it would create or touch
    the file it points to.
    """
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    if not nofollow and path.is_symlink():  # without O_NOFOLLOW (Windows), checked before opening instead
        raise AgentpeftError(f"lock file {path} is a symbolic link; remove it (it holds nothing) and retry")
    flags = os.O_RDWR | os.O_CREAT | nofollow | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise AgentpeftError(f"lock file {path} is a symbolic link; remove it (it holds nothing) and retry") from None
        raise


class LockBusy(Exception):
    """A non-blocking :func:`held_lock` found the lock taken; ``holder`` is its pid or ``"unknown"``."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by pid {holder}")
        self.path, self.holder = path, holder


#: Whether this platform has a native file lock (flock, or LockFileEx on Windows) for filelock to use.
NATIVE_LOCKS = filelock.has_fcntl or os.name == "nt"


@contextmanager
def held_lock(path: Path, blocking: bool = True, record_pid: bool = False) -> Iterator[Path]:
    """Hold the lock file ``path`` for the ``with`` block; yields the file that carries the lock.

    The lock is filelock's native one (flock, or LockFileEx on Windows) on a descriptor from
    :func:`_open_lock`: the operating system drops it when its holder dies, so a killed process never
    leaves a stale lock. ``record_pid`` writes the holder's pid into the file, from its second byte
    (Windows locks the first byte, which other processes then cannot read). Without a native lock,
    a filelock soft lock (a marker file ``PATH.held`` naming its pid, reclaimed from a dead holder on
    the same host) stands in. ``blocking=False`` raises :class:`LockBusy` instead of waiting.
    """
    if not NATIVE_LOCKS:
        marker = path.with_name(path.name + ".held")
        for candidate in (path, marker):
            if candidate.is_symlink():
                raise AgentpeftError(f"lock file {candidate} is a symbolic link; remove it (it holds nothing) and retry")
        soft = filelock.SoftFileLock(str(marker), timeout=-1 if blocking else 0)
        try:
            soft.acquire(blocking=blocking)
        except filelock.Timeout:
            raise LockBusy(marker, str(soft.pid or "unknown")) from None
        try:
            yield marker
        finally:
            soft.release()
        return
    fd = _open_lock(path)
    try:
        if not filelock.lock_descriptor(fd, blocking=blocking):
            raise LockBusy(path, _recorded_pid(fd))
        try:
            if record_pid:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"\n{os.getpid()}\n".encode())
            yield path
        finally:
            filelock.unlock_descriptor(fd)
    finally:
        os.close(fd)


def _recorded_pid(fd: int) -> str:
    """The pid written into a lock file by its holder, or ``"unknown"``."""
    for offset in (0, 1):  # Windows refuses to read the locked first byte to anyone but the holder
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
        except OSError:
            continue
    return "unknown"


@contextmanager
def _lock(name: str) -> Iterator[Path]:
    """Hold the registry lock of ``name`` (waiting for it); yields the name's registry folder."""
    folder = registry_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    with held_lock(folder / ".lock"):
        yield folder


def _fsync_dir(folder: Path) -> None:
    """Make ``folder``'s entries (files created, renamed or removed in it) durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot sync a directory: their entries are as durable as they get
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so that a crash after renaming it into the
    registry cannot leave a version whose files are empty or cut short."""
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def publish(name: str, files: dict[str, Path], manifest: dict) -> tuple[int, Path]:
    """Put ``files`` (destination name -> source path) into a new version, atomically.

    Folders are moved (they are the build's own scratch output), single files copied.

    Everything is written into a staging folder (``AGENTPEFT_HOME/staging``) and renamed into
    place, so an interrupted publish never leaves a half entry.
    """
    check_name(name)
    with _lock(name) as folder:
        # Past every numbered folder, including one whose manifest is missing: never renamed onto.
        version = max((v for p in folder.iterdir() if (v := _version_of(p)) is not None), default=0) + 1
        # Staged outside registry/ (same disk, so the rename is atomic): a publish killed before
        # the rename leaves the registry exactly as it was. Under the lock, any staging folder
        # of this name was left by a killed publish.
        aside = home() / "staging"
        aside.mkdir(parents=True, exist_ok=True)
        for stale in aside.glob(f"{name}@*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{name}@", dir=aside))
        moved: list[tuple[Path, Path]] = []
        try:
            for dest, src in files.items():
                target = staging / dest
                if src.is_dir():
                    shutil.move(str(src), str(target))
                    moved.append((target, src))
                else:
                    shutil.copy2(src, target)
            manifest = {**manifest, "name": name, "version": version}
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
            (staging / "README.md").write_text(model_card(manifest))
            _fsync_tree(staging)
            _test_kill_point("publish:before-rename")
            os.rename(staging, folder / str(version))
        except BaseException:
            for target, src in moved:  # give the build its folders back, so it can be resumed
                shutil.move(str(target), str(src))
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # The rename itself, and the name's folder where this is its first version, made durable.
        _fsync_dir(folder)
        _fsync_dir(folder.parent)
    return version, folder / str(version)


def _test_kill_point(point: str) -> None:
    """Fault-injection hook for tests: ``AGENTPEFT_TEST_KILL_AT=POINT`` SIGKILLs the process here."""
    if os.environ.get("AGENTPEFT_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def card_data(m: dict) -> ModelCardData:
    """The model card's metadata for a manifest, as ``huggingface_hub.ModelCardData``: base model, license,
    tags, the knowledge base's dataset (named after the recipe) and the tuned model's held-out figures as
    ``EvalResult``s, which a hub renders as the card's results."""
    from huggingface_hub import EvalResult, ModelCardData

    ev = m.get("metrics", {})
    dataset = f"{m['recipe']}-kb"
    results = [EvalResult(task_type="text-generation", dataset_type=dataset,
                          dataset_name=f"{m['recipe']} held-out questions", dataset_split="eval",
                          metric_type=metric, metric_value=float(value))
               for metric, value in ev.get("tuned", {}).items()]
    return ModelCardData(base_model=m["base_model"]["name"], library_name="peft",
                         license=m["base_model"].get("license", "other"),
                         tags=["agentpeft", m["train"]["config"]["method"], m["recipe"]], datasets=[dataset],
                         model_name=m["name"], eval_results=results or None)


def model_card(m: dict) -> str:
    """A Hugging Face model card for a manifest: ``card_data``'s metadata, then the card's text."""
    from huggingface_hub import ModelCard

    ev = m.get("metrics", {})
    rows = "\n".join(f"| {k} | {ev['base'][k]:.3f} | {ev['tuned'][k]:.3f} |" for k in ev.get("tuned", {}))
    trained = m.get("train", {})
    hp = "\n".join(f"- {k}: {v}" for k, v in trained.get("config", {}).items())
    if trained.get("precision"):
        hp += f"\n- trained with {trained['precision']} on {trained.get('device') or 'unknown hardware'}"
    merged_line = f"- no `merged/`: a {m['train']['config']['method']} adapter is used as base + adapter."
    if m.get("merge"):
        dtype = m["merge"].get("dtype", "fp32")  # a manifest without merge.dtype has fp32 weights
        rounding = (f"; storing it in {dtype} changes the logits by at most {m['merge']['stored_logit_diff']:.2e}"
                    if dtype != "fp32" and "stored_logit_diff" in m["merge"] else "")
        merged_line = (f"- `merged/`: the adapter merged into the base in fp32 and stored in {dtype} (safetensors); "
                       f"max logit difference to the unmerged adapter {m['merge']['max_logit_diff']:.2e}{rounding}."
                       + (" Its chat template puts the system prompt first when a chat brings none."
                          if "dtype" in m["merge"] and m.get("system_prompt") else ""))
    return str(ModelCard(f"---\n{card_data(m).to_yaml()}\n---\n" + f"""
# {m['name']} (version {m['version']})

{m.get('description', '')}

Fine-tuned by agentpeft {m['agentpeft_version']} from the `{m['recipe']}` recipe on {m['created']}.
Base model: `{m['base_model']['name']}` (weights sha256 `{m['base_model']['sha256'][:16]}...`).
Dataset: {m['dataset']['facts']} facts, {m['dataset']['splits']['train']} train and {m['dataset']['splits']['eval']} held-out pairs (hash `{m['dataset']['hash'][:16]}...`).

## Evaluation (held-out questions, greedy decoding{', ' + ev['precision'] if ev.get('precision') else ''})

| metric | base | tuned |
|---|---|---|
{rows}

Primary metric: {ev.get('primary')}.{' Registered despite no improvement (--allow-regression).' if m.get('allow_regression') else ''}

## Training

{hp}

## Files

{merged_line}
- `adapter/`: the peft adapter.
- `dataset_card.md`, `eval.json`, `report.md`.

## Use

```python
from agentpeft.langchain import load_llm
llm = load_llm("{m['name']}")
print(llm.invoke("...").content)
```
{_tool_format_line(m.get("tool_format"))}"""))


def _tool_format_line(fmt: str | None) -> str:
    """The card's line on how tools reach the model (the manifest's ``tool_format``); empty without one."""
    if fmt == "chat-template":
        return ("\nTools: in its chat template's own format (`tool_format: chat-template`): the template renders "
                "the tools, the tool calls and their results.\n")
    if fmt == "agentpeft":
        return ("\nTools: its chat template has none, so bound tools are described in the system prompt and called "
                "as `<tool_call>{json}</tool_call>` (`tool_format: agentpeft`).\n")
    return ""
