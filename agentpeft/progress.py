"""Progress bars for the stages (tqdm on stderr); ``set_enabled(False)`` silences them all."""

from __future__ import annotations

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


def bar(total: int | None = None, desc: str = "", unit: str = "it", iterable=None):
    """A tqdm bar that respects the global switch."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not _enabled, leave=False, dynamic_ncols=True)
