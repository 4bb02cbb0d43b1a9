"""The command-line entry points' one error policy: bad input and missing files end in one clear line."""

from __future__ import annotations

import sys
from typing import Callable

USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError)  # ValueError covers Conversion/CheckpointError


def run_cli(body: Callable[[], object]) -> int:
    """Run `body`; a user error prints `error: <message>` to stderr and returns exit code 2, else 0. Other
    exceptions (bugs) keep their traceback."""
    try:
        body()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
