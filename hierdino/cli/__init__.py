"""Command-line tools: ``jobs/*.py`` and the ``hierdino-*`` console scripts call their ``main``."""

from __future__ import annotations

import functools
import sys


def user_errors(*types: type[BaseException]):
    """``main`` returns 2 with ``error: <message>`` on stderr for errors of ``types`` (bad input a user
    can fix: a path, a label, a value), or an input error inside a Ray error, instead of a traceback."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except Exception as e:
                from hierdino.train.inputs import input_error  # pyarrow: only once something failed

                # also an input error raised inside a Ray task or actor (``inputs.input_error``)
                err = input_error(e) or (e if isinstance(e, types) else None)
                if err is None:
                    raise
                print(f"error: {err}", file=sys.stderr)
                return 2
        return run
    return wrap
