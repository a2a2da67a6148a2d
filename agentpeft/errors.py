"""The one exception type for expected user errors."""

from __future__ import annotations

import errno


class AgentpeftError(Exception):
    """A user-facing error: the message names the problem and the fix.

    The CLI prints it as one line and exits non-zero, without a traceback.
    """


class PickleRefusedError(AgentpeftError):
    """Weights stored as pickles were not loaded: ``--allow-pickle`` was not given."""


#: What to do about an OSError that the disk, not the program, caused.
_DISK_FIXES = {
    errno.ENOSPC: "free some space or set AGENTPEFT_HOME to a folder on a bigger disk",
    errno.EDQUOT: "free some space or set AGENTPEFT_HOME to a folder on a bigger disk",
    errno.EROFS: "set AGENTPEFT_HOME to a folder on a writable disk",
    errno.EACCES: "fix its permissions or set AGENTPEFT_HOME to a folder you can write",
    errno.EPERM: "fix its permissions or set AGENTPEFT_HOME to a folder you can write",
    errno.ENOTDIR: "a part of the path is a file, not a folder; set AGENTPEFT_HOME to a folder",
}


def disk_error(exc: OSError) -> AgentpeftError | None:
    """A full, read-only or unwritable disk as a one-line user error; None for other OSErrors."""
    fix = _DISK_FIXES.get(exc.errno)
    if fix is None:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    return AgentpeftError(f"{where}{exc.strerror}; {fix}")
