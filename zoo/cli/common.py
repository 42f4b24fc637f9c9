"""What every zoo command shares: turning library errors into one clear line and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from zoo.config import ConfigError
from zoo.errors import RunError

USER_ERRORS = (ConfigError, FileNotFoundError, NotImplementedError, ValueError)


def run_cli(body: Callable[[], int | None], prog: str) -> int:
    """Run ``body``; user errors print ``prog: error: message`` and exit 2, failures during the work
    (:class:`~zoo.errors.RunError`: a full disk, a diverged loss) exit 1, both without a traceback."""
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
