"""What every zoo command shares: turning library errors into one clear line and an exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from zoo.config import ConfigError
from zoo.errors import RunError

USER_ERRORS = (ConfigError, FileNotFoundError, NotImplementedError, ValueError)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` (alias ``--no-progress``): no progress bars. They show only on a terminal anyway."""
    parser.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress bars (without this they appear only when stderr is a terminal)")


def run_cli(body: Callable[[], int | None], prog: str, *, quiet: bool = False) -> int:
    """Run ``body``; user errors print ``prog: error: message`` and exit 2, failures during the work
    (:class:`~zoo.errors.RunError`: a full disk, a diverged loss) exit 1, both without a traceback.
    ``quiet`` silences every progress bar (:func:`zoo.progress.set_quiet`)."""
    from zoo.progress import set_quiet

    set_quiet(quiet)
    try:
        return body() or 0
    except RunError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
