"""Command-line tools: ``jobs/*.py`` and the ``hierdino-*`` console scripts call their ``main``.

Each ``main`` is wrapped by ``hierdino.errors.user_errors``: an error the user fixes is said in one
line (``error: ...``) with exit code 2, anything else keeps its traceback.
"""

from hierdino.errors import user_errors

__all__ = ["user_errors"]  # the tools' wrapper, also importable from here
