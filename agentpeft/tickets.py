"""The local support-ticket store: one SQLite file under AGENTPEFT_HOME, parameterized queries only."""

from __future__ import annotations

import re
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
# An address in ASCII, matched whole with fullmatch ("$" would let a trailing newline through). The
# same address syntax the create_ticket tool accepts; input over 254 characters is refused before matching.
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")
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


def check_email(email: str) -> str:
    """``email`` if it is one plain address (name@example.com, at most 254 characters); AgentpeftError otherwise."""
    if not isinstance(email, str) or len(email) > 254 or not _EMAIL.fullmatch(email):
        shown = email[:80] + "..." if isinstance(email, str) and len(email) > 80 else email
        raise AgentpeftError(f"invalid e-mail address {shown!r}: give one address such as name@example.com, "
                             "without spaces or line breaks")
    return email


def create_ticket(email: str, subject: str, body: str, model: str | None = None,
                  path: Path | None = None) -> int:
    """Store a ticket and return its id. Values are bound as SQL parameters, never formatted into SQL."""
    check_email(email)
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
