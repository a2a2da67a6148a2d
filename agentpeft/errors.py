"""The one exception type for expected user errors."""

from __future__ import annotations

import errno
import os
import re


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


#: How Rust's std::io::Error ends its message.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def disk_error(exc: BaseException) -> AgentpeftError | None:
    """A full, read-only or unwritable disk as a one-line user error; None for any other exception.

    Python raises an OSError with its errno; libraries written in Rust (safetensors, tokenizers) raise
    their own exception types, whose message ends in the OS error: "... (os error 28)".
    """
    if isinstance(exc, OSError):
        code, what, where = exc.errno, exc.strerror, exc.filename
    else:
        found = _RUST_OS_ERROR.search(str(exc))
        if found is None:
            return None
        code = int(found.group(1))
        what, where = os.strerror(code), None
    fix = _DISK_FIXES.get(code)
    if fix is None:
        return None
    where = f"{where}: " if where else ""
    return AgentpeftError(f"{where}{what}; {fix}")
