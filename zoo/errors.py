"""Failures during a run that are reported as one line, without a traceback.

:class:`~zoo.config.ConfigError` covers wrong input (a recipe key, a file, a shape) and is found before
work starts. The errors here happen while working, through no bug of zoo's: the disk fills up, the
loss diverges. The command-line tools print their message and exit with status 1.
"""

from __future__ import annotations


class RunError(Exception):
    """A run could not go on; the message says what happened, where, and what was kept."""


class WriteError(RunError, OSError):
    """A file could not be written (disk full, no permission). The previous version is intact.

    Built as ``WriteError(errno, message)``; ``str()`` is the message alone."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror is not None else super().__str__()


class NonFiniteError(RunError, FloatingPointError):
    """A loss term or gradient became NaN or infinite; the step was not applied."""
