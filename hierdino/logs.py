"""Logging: every module logs to a child of the ``hierdino`` logger (``logging.getLogger(__name__)``);
a library user configures it like any other (silence it, raise its level, send it to a file).

The jobs call ``console`` once: ``[hierdino] <message>`` lines on stdout, the console format the
CLI always had, at INFO (``--verbose``: DEBUG too; ``--quiet``: warnings and errors only); errors
go to stderr. A Ray worker (train loop, Tune trial, Ray Data actor) calls it too, with the level its
driver chose, passed in ``HIERDINO_LOG_LEVEL``.

A message is written without the ``[hierdino] `` prefix: the console adds it. A record logged with
``extra=PLAIN`` is written as it is (the progress line, a detail line under the one before it), one
with ``extra=tag("reproduce")`` as ``[reproduce] <message>``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator

LEVEL_ENV = "HIERDINO_LOG_LEVEL"
PREFIX = "[hierdino] "
PLAIN = {"prefix": ""}  # logger.info(text, extra=PLAIN): the line without a prefix


def tag(name: str) -> dict:
    """``extra=`` of a record the console writes as ``[name] <message>`` (a job's own lines)."""
    return {"prefix": f"[{name}] "}


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return getattr(record, "prefix", PREFIX) + super().format(record)


class _ConsoleHandler(logging.StreamHandler):
    """Writes to the ``sys.stdout`` of the moment (pytest's capture and Ray's redirection replace it);
    errors to ``sys.stderr``."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        # not setStream: it flushes the stream of the last record, which may be closed by now (a capture)
        self.stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
        super().emit(record)


def level_from_flags(quiet: bool = False, verbose: bool = False) -> int:
    return logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO


def add_flags(parser: argparse.ArgumentParser, verbose_help: str = "", default=False) -> None:
    """A job's ``--quiet`` and ``--verbose`` (for ``level_from_flags``); ``verbose_help``: what else
    ``--verbose`` brings. A sub-command's parser takes them with ``default=argparse.SUPPRESS``, so
    that they may come after the sub-command without undoing them given before it."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", action="store_true", default=default, help="only warnings and errors")
    group.add_argument("--verbose", action="store_true", default=default,
                       help="debug lines too" + (f"; {verbose_help}" if verbose_help else ""))


def _level(level: int | str | None) -> int:
    """A level from a number or a name (``"DEBUG"``); INFO when neither is one."""
    if isinstance(level, str):
        level = logging.getLevelName(level.strip().upper())
    return level if isinstance(level, int) else logging.INFO


def console(level: int | str | None = None) -> logging.Logger:
    """Send the ``hierdino`` logger's records to stdout as ``[hierdino] ...`` lines at ``level``, once
    per process; the level is also exported to ``HIERDINO_LOG_LEVEL`` so that Ray workers started from
    here log at the same level. Without ``level``: ``$HIERDINO_LOG_LEVEL`` (else INFO) the first time,
    the level as it is after that."""
    logger = logging.getLogger("hierdino")
    first = not any(isinstance(h, _ConsoleHandler) for h in logger.handlers)
    if first:
        handler = _ConsoleHandler()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
        logger.propagate = False  # a root handler (Ray Train's in its workers) would print each line twice
    if level is not None or first:
        level = _level(os.environ.get(LEVEL_ENV, "INFO") if level is None else level)
        logger.setLevel(level)
        os.environ[LEVEL_ENV] = logging.getLevelName(level)
    return logger


def in_worker() -> None:
    """``console()`` where a job chose the level (``HIERDINO_LOG_LEVEL``, which ``init_ray`` gives its
    workers), else nothing: for code that runs in Ray Data workers and also in a library user's own
    process, whose logging stays theirs."""
    if os.environ.get(LEVEL_ENV):
        console()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Only the ``hierdino`` logger's warnings and errors while inside, in this process (at DEBUG,
    ``--verbose``, everything is still said): for steps whose lines would repeat or distract, such
    as a sweep trial's start-up or the many runs of a reproduction."""
    logger = logging.getLogger("hierdino")
    before = logger.level
    if logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(before)
