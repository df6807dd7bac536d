"""One place that turns a URI into a ``pyarrow.fs`` filesystem and a path inside it.

Supported: local paths, ``file://`` and ``s3://bucket/prefix``. S3 settings come from
``StorageOptions`` (config) or the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``). Credentials are never logged or put in messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(OSError):
    """A URI that cannot be read or written: bad credentials, missing bucket, missing path."""


@dataclass(frozen=True)
class StorageOptions:
    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"StorageOptions(endpoint={self.endpoint!r}, region={self.region!r}, credentials={'set' if self.access_key else 'env/default'})"

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
    if "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "403" in text:
        why = "access denied: check the S3 credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or config)"
    elif "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        why = f"the bucket {uri[5:].split('/')[0]!r} does not exist"
    elif isinstance(err, FileNotFoundError):
        why = "no such file or directory"
    else:
        why = text
    return StorageError(f"cannot {action} {uri}: {why}")


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, FileNotFoundError) as e:
        raise _explain(e, uri, "read") from None


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object; local files go through a temporary name so readers never see half a file."""
    fs, path = resolve(uri, options)
    try:
        parent = path.rsplit("/", 1)[0]
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(parent, recursive=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        raise _explain(e, uri, "write") from None


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _explain(e, uri, "look up") from None


def list_files(uri: str, suffix: str = "", options: StorageOptions | None = None) -> list[str]:
    """Paths (inside the filesystem) of files under ``uri`` ending in ``suffix``, sorted."""
    fs, path = resolve(uri, options)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (OSError, FileNotFoundError) as e:
        raise _explain(e, uri, "list") from None
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
