"""One place that turns a URI into a ``pyarrow.fs`` filesystem and a path inside it.

Supported: local paths, ``file://`` and ``s3://bucket/prefix``. S3 settings come from
``StorageOptions`` (config) or the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``). Credentials are never logged or put in messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from hierdino.errors import UserError

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")  # names that may become one part of a path (name_problem)


class StorageError(UserError, OSError):
    """A URI that cannot be read or written: bad credentials, missing bucket, missing path, or an
    object store that did not answer within the retry window."""

    kind = "storage"


# -- retries ---------------------------------------------------------------------------------------
# An object store that stops answering (a restart, a network partition, throttling) is retried with
# exponential backoff for RETRY_S seconds (``run.storage_retry_s``; each process sets it from its
# config with ``set_retry_window``); errors that retrying cannot fix (access denied, no such bucket
# or key) are raised at once.
RETRY_S = 180.0
_TRANSIENT = ("NETWORK_CONNECTION", "Couldn't connect", "couldn't connect", "Connection refused", "connection refused",
              "curlCode: 7", "curlCode: 28", "curlCode: 52", "curlCode: 56", "Timeout", "timed out", "SLOW_DOWN",
              "SlowDown", "SERVICE_UNAVAILABLE", "ServiceUnavailable", "INTERNAL_FAILURE", "InternalError",
              "HTTP status 500", "HTTP status 502", "HTTP status 503", "HTTP status 504", "Connection reset",
              "Broken pipe", "UNKNOWN (HTTP status 5")


def set_retry_window(seconds: float) -> None:
    global RETRY_S
    RETRY_S = float(seconds)


@contextlib.contextmanager
def retry_window(seconds: float | None):
    """``set_retry_window(seconds)`` for the block, the earlier window after it (None: unchanged)."""
    before = RETRY_S
    if seconds is not None:
        set_retry_window(seconds)
    try:
        yield
    finally:
        set_retry_window(before)


def is_transient(err: BaseException) -> bool:
    """An error worth retrying: the store did not answer or answered 'try again', not 'no'."""
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return False
    text = str(err)
    return isinstance(err, (ConnectionError, TimeoutError)) or any(t in text for t in _TRANSIENT)


def with_retries(fn, uri: str, action: str, window_s: float | None = None, explain: bool = True):
    """``fn()``, retried on transient errors with backoff (0.5 s doubling to 5 s, jittered) until
    ``window_s`` (default ``RETRY_S``) has passed; then a ``StorageError`` naming ``action`` and ``uri``.
    Another error is raised as a ``StorageError`` saying what it means, or unchanged (``explain=False``)."""
    window = RETRY_S if window_s is None else window_s
    start, delay, tries = time.monotonic(), 0.5, 0
    while True:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:  # pyarrow raises OSError subclasses, fsspec/botocore their own
            tries += 1
            waited = time.monotonic() - start
            if not is_transient(e):
                if not explain:
                    raise
                raise _explain(e, uri, action) from None
            if waited + delay > window:
                raise StorageError(f"cannot {action} {uri}: the store did not answer for {waited:.0f} s "
                                   f"({tries} tries; retry window {window:g} s, run.storage_retry_s): {_scrub(str(e))}") from None
            if tries == 1:
                logger.warning(f"storage: cannot {action} {uri} ({_scrub(str(e))[:120]}); retrying for up to "
                               f"{window:g} s")
            time.sleep(delay * (0.75 + 0.5 * random.random()))
            delay = min(delay * 2, 5.0)


def _scrub(text: str) -> str:
    """The message without any credential of the environment or the defaults."""
    for secret in (os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")):
        if secret:
            text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class StorageOptions:
    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"StorageOptions(endpoint={self.endpoint!r}, region={self.region!r}, credentials={'set' if self.access_key else 'env/default'})"

    @classmethod
    def from_config(cls, cfg) -> "StorageOptions":
        """The S3 settings of a run's config (``data.s3_endpoint``, ``data.s3_region``); credentials from the environment."""
        return cls(endpoint=cfg.data.s3_endpoint, region=cfg.data.s3_region)

    def resolved(self) -> "StorageOptions":
        env = os.environ
        return StorageOptions(
            endpoint=self.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=self.access_key or env.get("AWS_ACCESS_KEY_ID"),
            secret_key=self.secret_key or env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=self.session_token or env.get("AWS_SESSION_TOKEN"),
        )

    def fsspec_kwargs(self) -> dict:
        """The same settings for s3fs (Ray Data / fsspec users)."""
        o = self.resolved()
        kw: dict = {"client_kwargs": {"region_name": o.region}}
        if o.endpoint:
            kw["endpoint_url"] = o.endpoint
        if o.access_key:
            kw.update(key=o.access_key, secret=o.secret_key, token=o.session_token)
        return kw


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _s3_filesystem(opts: StorageOptions) -> pafs.S3FileSystem:
    o = opts.resolved()
    kw: dict = {"region": o.region}
    if o.endpoint:
        scheme = "https" if o.endpoint.startswith("https://") else "http"
        kw["endpoint_override"] = o.endpoint.split("://", 1)[-1]
        kw["scheme"] = scheme
    if o.access_key:
        kw.update(access_key=o.access_key, secret_key=o.secret_key, session_token=o.session_token)
    return pafs.S3FileSystem(**kw)


def resolve(uri: str | Path, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (filesystem, path in it). Local paths are made absolute."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket")
        return _s3_filesystem(options or StorageOptions()), path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/")] + [p.strip("/") for p in parts])


def _explain(err: Exception, uri: str, action: str) -> StorageError:
    text = str(err)
    if isinstance(err, FileNotFoundError) and not uri.startswith("s3://"):
        why = "no such file or directory"
    elif ("ACCESS_DENIED" in text or "AccessDenied" in text or "InvalidAccessKeyId" in text
          or "SignatureDoesNotMatch" in text or "HTTP status 403" in text or "HTTP response code 403" in text):
        why = "access denied: check the S3 credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or config)"
    elif "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        why = f"the bucket {uri[5:].split('/')[0]!r} does not exist"
    elif isinstance(err, FileNotFoundError):
        why = "no such file or directory"
    else:
        why = _scrub(text)
    return StorageError(f"cannot {action} {uri}: {why}")


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)

    def read():
        with fs.open_input_stream(path) as f:
            return f.read()
    return with_retries(read, uri, "read")


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole file or object atomically: a reader sees the earlier contents or all of ``data``,
    never part of it, and after a crash the file holds one or the other. Local files go through
    ``_replace_local``; on S3 a single PUT is already atomic. The one writer of results, plans, plots
    and markers."""
    fs, path = resolve(uri, options)

    def write():
        if isinstance(fs, pafs.LocalFileSystem):
            _replace_local(path, data)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    with_retries(write, uri, "write")


def _replace_local(path: str, data: bytes) -> None:
    """``data`` as the local file ``path``: written to a temporary file in the same directory, flushed
    and fsynced, renamed over ``path`` (``os.replace``), then the directory fsynced so the rename
    itself survives a power loss. On any failure the temporary file is removed and ``path`` is as it was."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(parent)


def _fsync_dir(path: str) -> None:
    """Make the directory entries of ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened this way
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is done either way
        pass
    finally:
        os.close(fd)


def name_problem(name) -> str | None:
    """Why ``name`` (a dataset, run, variant or sweep name that becomes part of a path) is not safe,
    or None: it must be letters, digits, ``.``, ``_`` and ``-`` only, with no ``..`` in it (so never
    ``.`` or ``..`` and never a way out of the directory it is joined to)."""
    if isinstance(name, str) and _SAFE_NAME.fullmatch(name) and name != "." and ".." not in name:
        return None
    return "is not a safe name: use only A-Z a-z 0-9 . _ - (not '.', and no '..')"


def upload_file(local_path: str, uri: str, options: StorageOptions | None = None) -> None:
    """Copy one local file to ``uri`` (streamed; retried as a whole)."""
    fs, path = resolve(uri, options)

    def copy():
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    with_retries(copy, uri, "write")


def download_file(uri: str, dest: str, options: StorageOptions | None = None) -> None:
    """Copy one object to the local file ``dest`` (streamed; retried as a whole)."""
    fs, path = resolve(uri, options)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with_retries(lambda: pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()),
                 uri, "read")


def download_dir(uri: str, local_dir: str, options: StorageOptions | None = None) -> None:
    """Copy every file under ``uri`` into ``local_dir``, keeping relative paths (each file retried)."""
    for name in file_sizes(uri, options):
        download_file(join(uri, name), os.path.join(local_dir, name), options)


def delete_dir(uri: str, options: StorageOptions | None = None) -> None:
    fs, path = resolve(uri, options)
    with_retries(lambda: fs.delete_dir(path), uri, "delete")


def delete_file(uri: str, options: StorageOptions | None = None) -> None:
    """Delete one file; a file that is not there is not an error."""
    fs, path = resolve(uri, options)

    def delete():
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_file(path)
    with_retries(delete, uri, "delete")


def file_sizes(uri: str, options: StorageOptions | None = None) -> dict[str, int]:
    """``{name relative to uri: size}`` of the files under ``uri`` ({} when it does not exist)."""
    fs, path = resolve(uri, options)
    infos = with_retries(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)),
                         uri, "list")
    return {i.path[len(path):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def list_dirs(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Names of the directories directly under ``uri``, sorted ([] when it does not exist)."""
    fs, path = resolve(uri, options)
    infos = with_retries(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)),
                         uri, "list")
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    return with_retries(lambda: fs.get_file_info(path).type != pafs.FileType.NotFound, uri, "look up")


def list_files(uri: str, suffix: str = "", options: StorageOptions | None = None) -> list[str]:
    """Paths (inside the filesystem) of files under ``uri`` ending in ``suffix``, sorted."""
    fs, path = resolve(uri, options)
    infos = with_retries(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)), uri, "list")
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def check_access(uri: str, options: StorageOptions | None = None) -> None:
    """Fail early with a clear message when ``uri``'s bucket is missing or the credentials are wrong."""
    fs, path = resolve(uri, options)
    try:
        if is_s3(uri):
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"cannot access {uri}: the bucket {bucket!r} does not exist")
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except StorageError:
        raise
    except OSError as e:
        raise _explain(e, uri, "access") from None
