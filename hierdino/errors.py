"""Errors a user fixes (a path, a value, a label, a file), and how the command-line tools say them.

Every such error subclasses ``UserError``: it carries a one-line ``kind`` (``storage``, ``data``,
``weights``, ...) and an ``exit_code``; the tools print ``error: <message>`` (or ``<kind> error:
<message>``) and exit with that code instead of showing a traceback. Any other exception is a bug
and keeps its traceback. The subclasses live beside the code that raises them:

- ``storage.StorageError`` (storage): a URI that cannot be read or written;
- ``hierarchy.HierarchyError`` (hierarchy), ``labels.LabelMapError`` (label map): a class tree or a
  label map that does not parse or names unknown nodes;
- ``config.ConfigError`` (config): a key, a value or a combination of them; its subclass
  ``config.compat.ResumeError`` (resume): a run directory this config cannot continue;
- ``data.shards.ShardError``, ``data.ingest.IngestError`` (data): shards, manifests or training data
  that cannot be used;
- ``models.weights.WeightsError`` (weights): a checkpoint that does not load;
- ``eval.EvalDataError`` (eval data): an external set the probes cannot score;
- ``train.preflight.ResourcesError`` (resources): a run the cluster cannot fit;
- ``tune.space.SpaceError`` (sweep space): a search-space file.

This module imports nothing of hierdino: it is the lowest layer (ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """An error the user fixes through the inputs; ``str(e)`` is what to do about it."""

    kind = "input"  # said before "error:" where a tool names the kind
    exit_code = 2  # what ``main`` returns

    def line(self) -> str:
        """``<kind> error: <message>``, as ``jobs/pretrain.py`` prints it."""
        return f"{self.kind} error: {self}"


def user_error(e: BaseException) -> UserError | None:
    """The ``UserError`` behind ``e``, or None (a bug: its traceback is shown).

    ``e`` itself, or one it wraps, searched breadth first through Ray's public attributes (Ray 2.60)
    and Python's own chaining:

    - ``ray.train.WorkerGroupError.worker_failures``: rank -> the worker's own exception (Ray Train
      v2 already unwraps its traceback holder), searched in rank order;
    - ``ray.train.ControllerError.controller_failure``;
    - ``ray.exceptions.RayTaskError.cause``: the exception a task or actor raised (Ray Data's too).
      Ray raises a ``RayTaskError`` that is also an instance of the cause's class
      (``RayTaskError(ShardError)``); the cause itself is returned, not that hybrid;
    - ``__cause__`` (``raise ... from``); not ``__context__``: an error raised while handling
      another is not caused by it.

    Attributes are read by name, so this module needs no Ray import.
    """
    todo, seen = [e], set()
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        cause = getattr(x, "cause", None)
        cause = cause if isinstance(cause, BaseException) else None
        if isinstance(x, UserError):
            return cause if isinstance(cause, UserError) else x
        failures = getattr(x, "worker_failures", None) or {}
        todo += [f for _, f in sorted(failures.items())]
        todo += [getattr(x, "controller_failure", None), cause, x.__cause__]
    return None


def user_errors(*also: type[BaseException], named: bool = False):
    """Decorate a tool's ``main(argv)``: a ``UserError`` (also one inside a Ray error, ``user_error``)
    or an error of the types ``also`` (say ``OSError`` for a missing path) prints ``error: <message>``
    (``named``: ``<kind> error: <message>``) on stderr and returns its exit code (2), instead of a
    traceback."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except Exception as e:
                err = user_error(e)
                if err is None and not isinstance(e, also):
                    raise
                shown = err if err is not None else e
                print(err.line() if named and err is not None else f"error: {shown}", file=sys.stderr)
                return err.exit_code if err is not None else 2
        return run
    return wrap
