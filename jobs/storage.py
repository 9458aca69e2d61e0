"""Where bytes live: fsspec URLs → file systems, storage options, atomic writes, bounded retries.

Every read and write of the job goes through here, so the rules are in one place:
- A URL is anything fsspec knows (a local path, `file://`, `memory://`, `s3://`, `gs://`, ...).
  Options come from repeatable `--storage-option key=value`; credentials may also come from the
  environment, which the file system libraries read themselves (s3fs: `AWS_*`, `AWS_ENDPOINT_URL`).
- A write is all or nothing: local files are written under a hidden temporary name and renamed
  into place; on object stores one complete PUT (`pipe_file`) is already atomic.
- Transient failures (network, timeouts, 5xx) are retried with exponential backoff for a bounded
  time, then `StorageError` says what failed; permanent ones (permission, not found, a read-only
  or full file system) are not retried, and the last kind becomes `StorageError` at once. The bound is `RetryPolicy.total_seconds`, 120 s unless the environment variable
  `SDBATCH_STORAGE_RETRY_SECONDS` says otherwise (read at import, so set it before the job starts;
  Ray passes the driver's environment on to local actors). It is the only retry layer: s3fs's
  botocore client is told to try once (see `s3_defaults`), or its own retries, 5-12 s per call
  against a dead endpoint, would multiply ours.
- Credentials never reach logs or `job.json`: `redact` / `redact_url` hide them.
"""
import errno
import json
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")

# Errors that will not go away by waiting (subclasses of OSError, so checked first).
PERMANENT = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
# OSErrors that waiting does not fix either, though their class is plain OSError.
STORE_REFUSES = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}
SECRET_KEY = re.compile(r"key|secret|token|passw|credential|session|auth|signature", re.IGNORECASE)
NOT_SECRET = {"endpoint_url", "region_name", "key_prefix"}  # look secret by name only
RETRY_SECONDS_ENV = "SDBATCH_STORAGE_RETRY_SECONDS"
S3_PROTOCOLS = {"s3", "s3a"}


def s3_defaults() -> dict:
    """s3fs: one botocore attempt per call, unless the user passes config_kwargs of their own.
    A new dict each time: botocore rewrites the `retries` dict it is given (max_attempts becomes
    total_max_attempts = 2), so a shared one would quietly allow two attempts from then on."""
    return {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}}}


class StorageError(Exception):
    """A storage operation failed for good (after retries, or for a reason retries cannot fix)."""


def parse_storage_options(pairs: Iterable[str]) -> dict:
    """`["key=value", ...]` → dict; values that parse as JSON are decoded (`anon=true`, `client_kwargs={...}`)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise StorageError(f"--storage-option {pair!r}: expected key=value")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def resolve(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec URL (or local path) → (file system, path inside it)."""
    options = dict(storage_options or {})
    if fsspec.utils.get_protocol(url) in S3_PROTOCOLS:
        options = {**s3_defaults(), **options}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        raise StorageError(f"{redact_url(url)}: this storage needs an extra package ({e}); e.g. pip install 'sdbatch[s3]'") from e
    except (ValueError, TypeError) as e:
        raise StorageError(f"{redact_url(url)}: cannot open this location: {e}") from e
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_transient(error: BaseException) -> bool:
    """Worth retrying: network trouble, timeouts, throttling — not missing files or bad credentials."""
    if isinstance(error, PERMANENT):
        return False
    if isinstance(error, OSError) and error.errno in STORE_REFUSES:
        return False
    if isinstance(error, OSError):  # includes ConnectionError, TimeoutError, s3fs's translated 5xx
        return True
    try:  # botocore's connection errors do not derive from OSError
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    except ImportError:
        return False
    return isinstance(error, (BotoConnectionError, HTTPClientError))


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff (with jitter) until `attempts` tries or `total_seconds` are used up."""

    attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 10.0
    total_seconds: float = 120.0

    def call(self, what: str, fn: Callable[..., T], *args, **kwargs) -> T:
        start = time.monotonic()
        delay = self.base_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if isinstance(e, OSError) and e.errno in STORE_REFUSES:
                    raise StorageError(f"{what}: {STORE_REFUSES[e.errno]} ({e.strerror}); not retried") from e
                if not is_transient(e):
                    raise
                elapsed = time.monotonic() - start
                wait = delay * random.uniform(0.5, 1.0)  # jitter: many writers must not retry in lockstep
                if attempt == self.attempts or elapsed + wait > self.total_seconds:
                    raise StorageError(
                        f"{what} failed after {attempt} attempts in {elapsed:.1f}s: {type(e).__name__}: {e}"
                    ) from e
                time.sleep(wait)
                delay = min(delay * 2, self.max_delay)
        raise AssertionError("unreachable")


def default_retry(environ=os.environ) -> RetryPolicy:
    """The policy of every storage call: `RetryPolicy()`, with `total_seconds` from
    SDBATCH_STORAGE_RETRY_SECONDS when set (e.g. small in tests, larger for a flaky store)."""
    value = environ.get(RETRY_SECONDS_ENV)
    if value is None or not value.strip():
        return RetryPolicy()
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:  # also rejects nan
        raise StorageError(f"{RETRY_SECONDS_ENV}={value!r}: expected a number of seconds > 0")
    return RetryPolicy(total_seconds=seconds)


DEFAULT_RETRY = default_retry()


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Write `data` to `path` so that readers see either the old state or all of `data`."""
    if is_local(fs):
        retry.call(f"writing {path}", _write_local, path, data)
    else:
        retry.call(f"writing {path}", fs.pipe_file, path, data)


def _write_local(path: str, data: bytes) -> None:
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")  # hidden: listings skip it
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must never expose a file whose bytes are not on disk
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def open_for_arrow(fs: fsspec.AbstractFileSystem, path: str):
    """A readable file for pyarrow: Arrow's own for local paths, fsspec's elsewhere.

    With a Python file object, Arrow's IO threads end up freeing Python buffers; when that races
    with interpreter exit the process aborts ("terminate called without an active exception").
    Local files, the common case, avoid Python buffers altogether.
    """
    return pa.OSFile(path) if is_local(fs) else fs.open(path, "rb")


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> bytes:
    return retry.call(f"reading {path}", fs.cat_file, path)


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts) if root else posixpath.join(*parts)


def redact(options: dict) -> dict:
    """A copy of storage options that is safe to log or store: secret-looking values become '***'."""
    return {k: _redact_value(k, v) for k, v in options.items()}


def _redact_value(key: str, value):
    if isinstance(value, dict):
        return redact(value)
    if isinstance(key, str) and SECRET_KEY.search(key) and key not in NOT_SECRET and value is not None:
        return "***"
    return value


def redact_url(url: str) -> str:
    """Hide `user:password@` in URLs."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", url)
