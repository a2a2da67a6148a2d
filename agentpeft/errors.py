"""The one exception type for expected user errors."""


class AgentpeftError(Exception):
    """A user-facing error: the message names the problem and the fix.

    The CLI prints it as one line and exits non-zero, without a traceback.
    """
