"""Progress bars for the stages (tqdm on stderr); ``set_enabled(False)`` silences them all."""

from __future__ import annotations

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Switch progress bars on or off: agentpeft's own, and those of datasets and transformers (TRL's
    dataset maps, weight loading, shard writing) that the stages run."""
    import datasets
    from transformers.utils import logging as transformers_logging

    global _enabled
    _enabled = enabled
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()


def enabled() -> bool:
    return _enabled


def bar(total: int | None = None, desc: str = "", unit: str = "it", iterable=None):
    """A tqdm bar that respects the global switch."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not _enabled, leave=False, dynamic_ncols=True)
