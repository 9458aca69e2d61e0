"""Storage: URL resolution and options, atomic writes (local and memory://), bounded retries."""
import os
import time

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from jobs import storage
from jobs.storage import RetryPolicy, StorageError

FAST = RetryPolicy(attempts=5, base_delay=0.001, max_delay=0.004, total_seconds=5)


def test_storage_options_decode_json_values():
    got = storage.parse_storage_options([
        "anon=false", "key=AKIA123", 'client_kwargs={"endpoint_url": "http://127.0.0.1:8333"}', "profile=dev=1",
    ])
    assert got == {"anon": False, "key": "AKIA123", "client_kwargs": {"endpoint_url": "http://127.0.0.1:8333"}, "profile": "dev=1"}
    with pytest.raises(StorageError, match="expected key=value"):
        storage.parse_storage_options(["endpoint"])


def test_resolve_local_and_memory(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "out") + "/")
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path / "out")
    fs, path = storage.resolve("memory://bucket/out")
    assert isinstance(fs, MemoryFileSystem) and path == "/bucket/out"
    with pytest.raises(StorageError, match="cannot open|extra package"):
        storage.resolve("nosuchprotocol://x/y")


def test_atomic_local_write_leaves_no_temporary_files(tmp_path):
    fs, root = storage.resolve(str(tmp_path))
    target = storage.join(root, "a", "b", "file.bin")
    storage.write_atomic(fs, target, b"first")
    storage.write_atomic(fs, target, b"second")
    assert open(target, "rb").read() == b"second"
    assert os.listdir(tmp_path / "a" / "b") == ["file.bin"]


def test_interrupted_local_write_keeps_the_old_file(tmp_path, monkeypatch):
    fs, root = storage.resolve(str(tmp_path))
    target = storage.join(root, "file.bin")
    storage.write_atomic(fs, target, b"old")

    def broken_replace(src, dst):
        raise KeyboardInterrupt  # e.g. the process being stopped between write and rename

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        storage.write_atomic(fs, target, b"new")
    assert open(target, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_memory_write_is_one_put():
    fs, root = storage.resolve("memory://atomic-test")
    calls = []
    original = fs.pipe_file
    fs.pipe_file = lambda path, data, **kw: (calls.append(path), original(path, data, **kw))[-1]
    try:
        storage.write_atomic(fs, root + "/x/y.bin", b"data")
    finally:
        del fs.pipe_file
    assert calls == ["/atomic-test/x/y.bin"]
    assert storage.read_bytes(fs, "/atomic-test/x/y.bin") == b"data"


class Flaky:
    """Fails with `error` the first `failures` calls, then returns 'ok'."""

    def __init__(self, failures, error):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


@pytest.mark.parametrize("error", [ConnectionError("reset"), TimeoutError("slow"), OSError(5, "I/O error")])
def test_transient_errors_are_retried(error):
    flaky = Flaky(3, error)
    assert FAST.call("op", flaky) == "ok" and flaky.calls == 4


@pytest.mark.parametrize("error", [PermissionError("denied"), FileNotFoundError("gone"), ValueError("bug")])
def test_permanent_errors_are_not_retried(error):
    flaky = Flaky(1, error)
    with pytest.raises(type(error)):
        FAST.call("op", flaky)
    assert flaky.calls == 1


def test_retries_give_up_after_the_attempt_limit():
    flaky = Flaky(100, ConnectionError("down"))
    with pytest.raises(StorageError, match=r"writing x failed after 5 attempts in .*s: ConnectionError: down"):
        FAST.call("writing x", flaky)
    assert flaky.calls == 5


def test_retries_give_up_after_the_time_limit():
    policy = RetryPolicy(attempts=1000, base_delay=0.05, max_delay=0.05, total_seconds=0.3)
    flaky = Flaky(10_000, TimeoutError("slow"))
    start = time.monotonic()
    with pytest.raises(StorageError, match="failed after"):
        policy.call("op", flaky)
    assert time.monotonic() - start < 1.5 and 3 <= flaky.calls < 20


def test_botocore_connection_errors_are_transient():
    botocore = pytest.importorskip("botocore.exceptions")
    assert storage.is_transient(botocore.EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(botocore.ConnectionClosedError(endpoint_url="http://x"))
    assert not storage.is_transient(botocore.NoCredentialsError())


class FlakyMemoryFS(MemoryFileSystem):
    """An in-memory store whose uploads fail the first few times, like a store that blips."""

    protocol = "flakymem"
    failures = 0

    def pipe_file(self, path, value, **kwargs):
        if FlakyMemoryFS.failures > 0:
            FlakyMemoryFS.failures -= 1
            raise ConnectionError("connection reset by peer")
        return super().pipe_file(path, value, **kwargs)


def test_write_atomic_retries_a_flaky_store():
    fs = FlakyMemoryFS()
    FlakyMemoryFS.failures = 2
    storage.write_atomic(fs, "/flaky/a.bin", b"x", retry=FAST)
    assert fs.cat_file("/flaky/a.bin") == b"x"
    FlakyMemoryFS.failures = 100
    with pytest.raises(StorageError, match="writing /flaky/b.bin failed after 5 attempts"):
        storage.write_atomic(fs, "/flaky/b.bin", b"x", retry=FAST)
    assert not fs.exists("/flaky/b.bin")
    FlakyMemoryFS.failures = 0


def test_redaction():
    options = {"key": "AKIA", "secret": "s3cr3t", "token": "t", "anon": False,
               "client_kwargs": {"endpoint_url": "http://h:1", "aws_secret_access_key": "x", "region_name": "eu"}}
    assert storage.redact(options) == {"key": "***", "secret": "***", "token": "***", "anon": False,
                                       "client_kwargs": {"endpoint_url": "http://h:1", "aws_secret_access_key": "***",
                                                         "region_name": "eu"}}
    assert options["secret"] == "s3cr3t"
    assert storage.redact_url("s3://user:pw@bucket/x") == "s3://***@bucket/x"
    assert storage.redact_url("s3://bucket/x") == "s3://bucket/x"


def test_s3_urls_get_one_botocore_attempt_unless_the_user_configures_it():
    pytest.importorskip("s3fs")
    endpoint = {"endpoint_url": "http://127.0.0.1:9"}
    fs, path = storage.resolve("s3://bucket/out", {"key": "k", "secret": "s", "client_kwargs": endpoint,
                                                   "skip_instance_cache": True})
    assert path == "bucket/out"
    assert fs.config_kwargs == {"retries": {"mode": "standard", "max_attempts": 1}}
    fs.connect()  # botocore rewrites the retries dict it is given: the next file system must still get one attempt
    fs, _ = storage.resolve("s3://bucket/out", {"client_kwargs": endpoint, "skip_instance_cache": True})
    assert fs.config_kwargs == {"retries": {"mode": "standard", "max_attempts": 1}}
    mine = {"retries": {"max_attempts": 7}, "connect_timeout": 3}
    fs, _ = storage.resolve("s3://bucket/out", {"config_kwargs": mine, "skip_instance_cache": True})
    assert fs.config_kwargs == mine
    fs, _ = storage.resolve("memory://x")  # other protocols get nothing added
    assert not hasattr(fs, "config_kwargs")


def test_one_s3_call_against_a_dead_endpoint_fails_fast_and_is_transient():
    """botocore's own retries would take 5-12 s here; the RetryPolicy must be the only retry layer."""
    pytest.importorskip("s3fs")
    fs, path = storage.resolve("s3://bucket/x", {"key": "k", "secret": "s", "skip_instance_cache": True,
                                                 "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})
    fs.connect()  # the client's set-up (seconds on a busy 2-core machine) is not what is timed: the call is
    start = time.monotonic()
    with pytest.raises(Exception) as caught:
        fs.pipe_file(path, b"data")
    assert time.monotonic() - start < 3
    assert storage.is_transient(caught.value)
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"writing bucket/x failed after \d+ attempts"):
        storage.write_atomic(fs, path, b"data", retry=RetryPolicy(base_delay=0.1, max_delay=0.2, total_seconds=1))
    assert time.monotonic() - start < 4


def test_retry_seconds_from_the_environment():
    assert storage.default_retry({}) == RetryPolicy()
    assert storage.default_retry({storage.RETRY_SECONDS_ENV: "2.5"}) == RetryPolicy(total_seconds=2.5)
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(StorageError, match=storage.RETRY_SECONDS_ENV):
            storage.default_retry({storage.RETRY_SECONDS_ENV: bad})
