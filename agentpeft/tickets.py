"""The local support-ticket store: one SQLite file under AGENTPEFT_HOME, parameterized queries only."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from .errors import AgentpeftError
from .models import home

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    model TEXT,
    email TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'open'
)
"""
_COLUMNS = ("id", "created", "model", "email", "subject", "body", "status")
_SELECT = "SELECT id, created, model, email, subject, body, status FROM tickets"


def tickets_path() -> Path:
    return home() / "tickets.sqlite3"


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=10)
        conn.execute(_SCHEMA)
        return conn
    except (OSError, sqlite3.Error) as exc:
        raise AgentpeftError(f"cannot open the ticket store {path}: {exc}; check that AGENTPEFT_HOME is writable") from None


def create_ticket(email: str, subject: str, body: str, model: str | None = None,
                  path: Path | None = None) -> int:
    """Store a ticket and return its id. Values are bound as SQL parameters, never formatted into SQL."""
    path = path or tickets_path()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with closing(_connect(path)) as conn:
        try:
            with conn:
                cur = conn.execute(
                    "INSERT INTO tickets (created, model, email, subject, body) VALUES (?, ?, ?, ?, ?)",
                    (created, model, email, subject, body))
        except sqlite3.Error as exc:
            raise AgentpeftError(f"cannot write to the ticket store {path}: {exc}") from None
        return int(cur.lastrowid)


def get_ticket(ticket_id: int, path: Path | None = None) -> dict | None:
    """A stored ticket as a dict, or None."""
    with closing(_connect(path or tickets_path())) as conn:
        row = conn.execute(_SELECT + " WHERE id = ?", (int(ticket_id),)).fetchone()
    return dict(zip(_COLUMNS, row)) if row else None


def list_tickets(path: Path | None = None) -> list[dict]:
    """Every stored ticket, oldest first."""
    with closing(_connect(path or tickets_path())) as conn:
        rows = conn.execute(_SELECT + " ORDER BY id").fetchall()
    return [dict(zip(_COLUMNS, row)) for row in rows]
