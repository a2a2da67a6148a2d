"""Shared fixtures: an isolated AGENTPEFT_HOME and a tiny random-init Llama base built offline."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh AGENTPEFT_HOME for one test."""
    monkeypatch.setenv("AGENTPEFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_tiny_base(folder: Path) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on the sample knowledge bases."""
    from agentpeft.testing import make_tiny_base as make

    return make(folder, [p.read_text() for p in (ROOT / "recipes").rglob("*.md")])


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"))
