"""Checks of the jobs' command-line arguments that several jobs share."""

from __future__ import annotations

import argparse
import os


def upload_dir_problem(uri: str, key: str) -> str | None:
    """Under ``ray job submit --working-dir``, the job runs inside Ray's upload of it, deleted with the
    session: a relative local ``uri`` would put results there. The message for ``key``, or None."""
    cwd = os.getcwd()
    local = uri.removeprefix("file://")
    if "runtime_resources/working_dir_files" not in cwd or "://" in local or os.path.isabs(os.path.expanduser(local)):
        return None
    return (f"{key}={uri} would put its files inside this job's uploaded working directory ({cwd}), which Ray "
            "deletes with its session: give an s3:// URI or an absolute path on storage every node shares")


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (``--local-cpus``, ``--max-concurrent``, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
