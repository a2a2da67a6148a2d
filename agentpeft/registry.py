"""The local model registry: ``AGENTPEFT_HOME/registry/NAME/VERSION/``, published atomically."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import AgentpeftError
from .models import home

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


def show(ref: str) -> dict:
    """The manifest of a registered model version."""
    return json.loads((resolve(ref) / "manifest.json").read_text())


def load(ref: str):
    """(model, tokenizer, manifest) of a registered version: merged weights, or base + adapter."""
    from .models import load_model, load_tokenizer, load_tuned

    entry, manifest = resolve(ref), show(ref)
    if (entry / "merged").is_dir():
        return load_model(entry / "merged"), load_tokenizer(entry / "merged"), manifest
    base = manifest["base_model"]["path"]
    return load_tuned(base, entry / "adapter"), load_tokenizer(base), manifest


def list_models() -> list[dict]:
    """One row per registered name: latest manifest plus the list of versions."""
    rows = []
    root = registry_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        known = versions(folder.name)
        if known:
            rows.append({**show(f"{folder.name}@{known[-1]}"), "versions": known})
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


def export(ref: str, directory: str | Path) -> Path:
    """Copy a version's folder (manifest, card, adapter, merged weights) to ``directory``."""
    source = resolve(ref)
    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        raise AgentpeftError(f"{target} exists and is not empty; export into a new or empty folder")
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


@contextmanager
def _lock(name: str):
    folder = registry_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish(name: str, files: dict[str, Path], manifest: dict) -> tuple[int, Path]:
    """Put ``files`` (destination name -> source path) into a new version, atomically.

    Folders are moved (they are the build's own scratch output), single files copied.

    Everything is written into a staging folder (``AGENTPEFT_HOME/staging``) and renamed into
    place, so an interrupted publish never leaves a half entry.
    """
    check_name(name)
    with _lock(name) as folder:
        version = (versions(name) or [0])[-1] + 1
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
            _test_kill_point("publish:before-rename")
            os.rename(staging, folder / str(version))
        except BaseException:
            for target, src in moved:  # give the build its folders back, so it can be resumed
                shutil.move(str(target), str(src))
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return version, folder / str(version)


def _test_kill_point(point: str) -> None:
    """Fault-injection hook for tests: ``AGENTPEFT_TEST_KILL_AT=POINT`` SIGKILLs the process here."""
    if os.environ.get("AGENTPEFT_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def model_card(m: dict) -> str:
    """A Hugging Face style model card for a manifest."""
    ev = m.get("metrics", {})
    rows = "\n".join(f"| {k} | {ev['base'][k]:.3f} | {ev['tuned'][k]:.3f} |" for k in ev.get("tuned", {}))
    trained = m.get("train", {})
    hp = "\n".join(f"- {k}: {v}" for k, v in trained.get("config", {}).items())
    if trained.get("precision"):
        hp += f"\n- trained with {trained['precision']} on {trained.get('device') or 'unknown hardware'}"
    merged_line = (f"- `merged/`: the adapter merged into the base (safetensors, fp32); max logit difference "
                   f"to the unmerged adapter {m['merge']['max_logit_diff']:.2e}." if m.get("merge")
                   else f"- no `merged/`: a {m['train']['config']['method']} adapter is used as base + adapter.")
    return f"""---
base_model: {m['base_model']['name']}
library_name: peft
license: {m['base_model'].get('license', 'other')}
tags: [agentpeft, {m['train']['config']['method']}, {m['recipe']}]
---

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
"""
