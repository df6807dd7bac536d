"""Command-line tools: ``jobs/*.py`` and the ``hierdino-*`` console scripts call their ``main``."""

from __future__ import annotations

import functools
import sys


def user_errors(*types: type[BaseException]):
    """``main`` returns 2 with ``error: <message>`` on stderr for errors of ``types`` (bad input a user
    can fix: a path, a label, a value), instead of a traceback."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except types as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        return run
    return wrap
