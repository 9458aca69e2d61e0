"""One driver per output folder (jobs.lease), as the adversarial run found it: a second driver on a
running job's folder (with and without --overwrite), two drivers started at the same instant, a
stale lease, a driver whose lease was taken over mid-job, and the protocol on a real S3 server."""
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jobs.lease import LEASE_FILE, this_host
from tests.jobdata import check_images, read_dataset, write_manifest
from tests.test_run import SDBATCH, TINY, assert_user_error, invoke, sdbatch


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([SDBATCH, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})


def finish(process: subprocess.Popen, timeout=240) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_for(condition, what: str, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def slow_manifest(tmp_path: Path, name="m.parquet", rows=24, prompt="prompt") -> Path:
    return write_manifest(tmp_path / name, prompt=[f"{prompt} {i}" for i in range(rows)], steps=[20] * rows)


def test_second_driver_is_refused_and_overwrite_cannot_take_a_live_lease(tmp_path):
    manifest, other = slow_manifest(tmp_path), slow_manifest(tmp_path, "other.parquet", rows=5, prompt="other")
    out = tmp_path / "out"
    first = start("run", manifest, "--output", out, "--shard-size", 3, *TINY)
    try:
        wait_for(lambda: any((out / "metadata").glob("*.parquet")), "the first shard")
        holder = json.loads((out / LEASE_FILE).read_text())
        assert holder["pid"] == first.pid and holder["host"] == this_host()
        for args in ([manifest], [other, "--overwrite"], [manifest, "--resume"]):
            r = invoke("run", *args, "--output", out, "--shard-size", 3, *TINY)
            assert_user_error(r, f"is in use by another sdbatch run: run {holder['run_id']} (host ",
                              f"pid {first.pid}, last heartbeat")
    finally:
        r = finish(first)
    assert r.returncode == 0, r.stderr
    meta, failures = read_dataset(out)
    assert sorted(meta, key=int) == [str(i) for i in range(24)] and not failures
    assert {m["prompt"] for m in meta.values()} == {f"prompt {i}" for i in range(24)}
    check_images(out, meta)
    assert len(list((out / "images").rglob("*.png"))) == 24
    assert not (out / LEASE_FILE).exists()


def test_two_drivers_started_at_the_same_instant_exactly_one_runs(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"p {i}" for i in range(6)])
    out = tmp_path / "out"
    drivers = [start("run", manifest, "--output", out, "--shard-size", 2, *TINY) for _ in range(2)]
    results = {d.pid: finish(d) for d in drivers}
    assert sorted(r.returncode for r in results.values()) == [0, 2], [(r.returncode, r.stderr[-500:]) for r in results.values()]
    (winner_pid, winner), = [(pid, r) for pid, r in results.items() if r.returncode == 0]
    (loser,) = [r for r in results.values() if r.returncode == 2]
    assert_user_error(loser, "is in use by another sdbatch run", f"pid {winner_pid},")
    assert "this run: 6 images" in winner.stdout
    meta, _ = read_dataset(out)
    assert len(meta) == 6 and len(list((out / "images").rglob("*.png"))) == 6


def test_stale_lease_is_taken_over_with_a_message(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a", "b"])
    out = tmp_path / "out"
    (out / "_sdbatch").mkdir(parents=True)
    old = time.time() - 3600
    (out / LEASE_FILE).write_text(json.dumps({"run_id": "0123456789abcdef", "host": "elsewhere", "pid": 4242,
                                              "started": old, "heartbeat": old}))
    r = sdbatch("run", manifest, "--output", out, *TINY)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^took over the stale lease of run 0123456789abcdef \(host elsewhere, pid 4242, "
                     r"last heartbeat 36\d\d s ago\)$", r.stderr, re.MULTILINE), r.stderr
    assert len(read_dataset(out)[0]) == 2 and not (out / LEASE_FILE).exists()


def test_driver_whose_lease_was_taken_over_stops_without_committing(tmp_path):
    manifest = slow_manifest(tmp_path)
    out = tmp_path / "out"
    first = start("run", manifest, "--output", out, "--shard-size", 3, *TINY)
    try:
        wait_for(lambda: any((out / "metadata").glob("*.parquet")), "the first shard")
        # Another driver, elsewhere, holds the folder now (as after a takeover while this one was paused).
        now = time.time()
        (out / LEASE_FILE).write_text(json.dumps({"run_id": "feedfacefeedface", "host": "elsewhere", "pid": 1,
                                                  "started": now, "heartbeat": now + 3600}))
        taken = time.time()
    finally:
        r = finish(first)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "no longer holds the output's lease, run feedfacefeedface (host elsewhere, pid 1" in r.stderr
    late = [p.name for p in (out / "metadata").glob("*.parquet") if p.stat().st_mtime > taken]
    assert not late, late
    assert not (out / "_SUCCESS").exists()
    assert json.loads((out / LEASE_FILE).read_text())["run_id"] == "feedfacefeedface"  # not removed: not its own


RACE = """
import sys, time
from jobs.lease import Lease, LeaseHeld
from jobs.sink import Output
out = Output(sys.argv[1])
lease = Lease(out)
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    lease.acquire()
except LeaseHeld as e:
    print("refused", e)
    sys.exit(2)
print("holds", lease.run_id)
time.sleep(3)
lease.release()
"""


def test_lease_on_s3_two_drivers_at_once_and_overhead_per_shard(s3_server):
    bucket = s3_server.make_bucket(f"lease-{uuid.uuid4().hex[:8]}")
    env = {**os.environ, **s3_server.env}
    for round_ in range(3):
        url = f"s3://{bucket}/out{round_}"
        at = str(time.time() + 2.0)  # both processes imported and waiting: they look within milliseconds
        racers = [subprocess.Popen([sys.executable, "-c", RACE, url, at], stdout=subprocess.PIPE, text=True, env=env)
                  for _ in range(2)]
        outcomes = sorted(p.communicate(timeout=60)[0].split()[0] for p in racers)
        assert outcomes == ["holds", "refused"], outcomes

    from jobs.lease import Lease, check_holder
    from jobs.sink import Output

    out = Output(f"s3://{bucket}/timed", s3_server.storage_options)
    lease = Lease(out)
    lease.acquire()
    try:
        start_time = time.perf_counter()
        for _ in range(20):
            check_holder(out, lease.run_id)
        per_shard = (time.perf_counter() - start_time) / 20
    finally:
        lease.release()
    print(f"lease check per shard commit on SeaweedFS S3: {per_shard * 1000:.1f} ms")
    assert per_shard < 0.5
