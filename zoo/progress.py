"""Progress bars for every long loop: one switch, and silent when nobody watches.

:func:`progress_bar` is tqdm with zoo's defaults: rate and ETA, the width of the terminal, and
**shown only when stderr is a terminal** (a log file or a pipe gets no carriage-return noise).
``--quiet`` on any zoo command calls :func:`set_quiet` and silences them all, Hugging Face Hub
transfer bars included; library callers can pass ``enabled=False`` for one bar.
"""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """Silence (or allow again) every zoo progress bar in this process, and the Hub's."""
    global _quiet
    was_quiet, _quiet = _quiet, quiet
    if quiet == was_quiet:  # never re-enable Hub bars that the user's HF_HUB_DISABLE_PROGRESS_BARS turned off
        return
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (disable_progress_bars if quiet else enable_progress_bars)()


def is_quiet() -> bool:
    return _quiet


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
                 enabled: bool = True, unit: str = "it", leave: bool = True, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``); off under :func:`set_quiet`,
    with ``enabled=False``, and when stderr is not a terminal."""
    disable = True if (_quiet or not enabled) else None  # None: tqdm shows it on a terminal only
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, dynamic_ncols=True,
                **kwargs)
