"""The S3 test server itself, and what the job relies on from s3fs and pyarrow against it."""
import subprocess
import sys
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# One attempt per call: a refused connection then fails in well under a second instead of
# botocore's default 5 attempts with backoff (8-12 s measured), which a job must not wait on per call.
NO_BOTO_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}


def test_write_read_list(s3_server):
    bucket = s3_server.make_bucket("roundtrip")
    assert s3_server.make_bucket("roundtrip") == bucket  # idempotent
    fs = s3_server.filesystem()
    fs.pipe(f"{bucket}/images/000/a.png", b"png-a")
    fs.pipe(f"{bucket}/images/000/b.png", b"png-b" * 100_000)  # 500 kB: larger than one small request
    fs.pipe(f"{bucket}/metadata/000.parquet", b"meta")
    assert fs.cat(f"{bucket}/images/000/a.png") == b"png-a"
    assert fs.cat(f"{bucket}/images/000/b.png") == b"png-b" * 100_000
    assert sorted(fs.ls(f"{bucket}/images/000")) == [f"{bucket}/images/000/a.png", f"{bucket}/images/000/b.png"]
    assert fs.find(bucket) == [f"{bucket}/images/000/a.png", f"{bucket}/images/000/b.png", f"{bucket}/metadata/000.parquet"]
    assert bucket in [p.rstrip("/") for p in fs.ls("")]
    with pytest.raises(FileNotFoundError):
        fs.cat(f"{bucket}/images/000/missing.png")
    with pytest.raises(FileNotFoundError):
        fs.ls("no-such-bucket-here")

    # The URL form the job uses, with the options it would get from --storage-option.
    url_fs, path = fsspec.core.url_to_fs(f"s3://{bucket}/images/000/a.png", **s3_server.storage_options)
    assert url_fs.cat(path) == b"png-a"


def test_environment_alone_configures_s3fs(s3_server):
    """s3fs (through botocore) reads AWS_ENDPOINT_URL and the key pair from the environment."""
    bucket = s3_server.make_bucket("from-env")
    s3_server.filesystem().pipe(f"{bucket}/x.txt", b"hello")
    code = "import fsspec; fs, p = fsspec.core.url_to_fs('s3://from-env/x.txt'); print(fs.cat(p).decode())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", **s3_server.env},
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello"


def test_parquet_through_s3fs(s3_server):
    bucket = s3_server.make_bucket("parquet")
    fs = s3_server.filesystem()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "id": pa.array(["r0", "r1", "r2"]),
        "seed": pa.array([0, 1, 2**63 - 1], pa.int64()),
        "image": pa.array([{"bytes": bytes([i]) * 1000, "path": f"r{i}.png"} for i in range(3)], image),
    })
    pq.write_table(table, f"{bucket}/metadata/000.parquet", filesystem=fs, row_group_size=2)
    assert pq.read_table(f"{bucket}/metadata/000.parquet", filesystem=fs).equals(table)
    # Streaming read, as the manifest reader does: record batches without loading the file whole.
    with fs.open(f"{bucket}/metadata/000.parquet", "rb") as f:
        batches = list(pq.ParquetFile(f).iter_batches(batch_size=2))
    assert [b.num_rows for b in batches] == [2, 1]
    assert pa.Table.from_batches(batches).equals(table)


def test_listings_are_cached_per_file_system(s3_server):
    """What another process wrote stays invisible to a file system that listed the folder before
    — to `ls` and to `exists` — until its cache is invalidated. Resume scans must invalidate."""
    bucket = s3_server.make_bucket("listing-cache")
    ours, theirs = s3_server.filesystem(), s3_server.filesystem()
    ours.pipe(f"{bucket}/metadata/000.parquet", b"0")
    assert ours.ls(f"{bucket}/metadata") == [f"{bucket}/metadata/000.parquet"]
    theirs.pipe(f"{bucket}/metadata/001.parquet", b"1")
    assert ours.ls(f"{bucket}/metadata") == [f"{bucket}/metadata/000.parquet"]
    assert not ours.exists(f"{bucket}/metadata/001.parquet")
    ours.invalidate_cache(f"{bucket}/metadata")
    assert ours.exists(f"{bucket}/metadata/001.parquet")
    assert len(ours.ls(f"{bucket}/metadata")) == 2


def test_wrong_credentials_are_permission_errors(s3_server):
    bucket = s3_server.make_bucket("locked")
    for wrong in ({"secret": "not-the-secret"}, {"key": "unknown-key", "secret": "x"}):
        fs = s3_server.filesystem(**wrong)
        start = time.monotonic()
        with pytest.raises(PermissionError):
            fs.ls(bucket)  # the cheap check a job can make before any work
        with pytest.raises(PermissionError):
            fs.pipe(f"{bucket}/x", b"x")
        assert time.monotonic() - start < 5  # not retried
    # No credentials at all is refused too (not served anonymously).
    with pytest.raises(PermissionError):
        fsspec.filesystem("s3", anon=True, skip_instance_cache=True,
                          client_kwargs={"endpoint_url": s3_server.endpoint_url}).ls(bucket)


def test_stop_fails_fast_and_restart_keeps_data(s3_server):
    bucket = s3_server.make_bucket("restart")
    s3_server.filesystem().pipe(f"{bucket}/kept.bin", b"kept")
    endpoint = s3_server.endpoint_url
    start = time.monotonic()
    s3_server.stop()
    try:
        assert time.monotonic() - start < 8
        assert not s3_server.running
        assert not s3_server.answering()  # the port is closed, not just the server paused

        from botocore.exceptions import EndpointConnectionError

        fs = s3_server.filesystem(**NO_BOTO_RETRIES)
        start = time.monotonic()
        with pytest.raises(EndpointConnectionError):  # botocore's, not an OSError: retry code must name it
            fs.pipe(f"{bucket}/lost.bin", b"lost")
        assert time.monotonic() - start < 3
    finally:
        s3_server.start()
    assert s3_server.endpoint_url == endpoint
    fs = s3_server.filesystem()
    assert fs.cat(f"{bucket}/kept.bin") == b"kept"
    assert not fs.exists(f"{bucket}/lost.bin")
    fs.pipe(f"{bucket}/after.bin", b"after")
    assert sorted(fs.ls(bucket)) == [f"{bucket}/after.bin", f"{bucket}/kept.bin"]
