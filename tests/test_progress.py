"""jobs.progress: the recent rate behind the ETA of `sdbatch run` and `sdbatch status`, on
synthetic timings, and `status --json` agreeing with the text."""
import io
import json
import os
import time

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.lease import LEASE_FILE, LeaseRecord, this_host
from jobs.manifest import Defaults
from jobs.progress import Progress, RateWindow, duration, eta_seconds, progress_line, recent_rate, with_eta
from jobs.sink import JobSpec, Output, OutputStatus


def slow_then_fast() -> list[tuple[float, int]]:
    """(seconds, images done): 0.1 images/s for 10 minutes (loading, warming up), then 2 images/s
    for 5 minutes."""
    return [(t, t // 10) for t in range(0, 600, 5)] + [(t, 60 + 2 * (t - 600)) for t in range(600, 901, 5)]


def test_the_eta_follows_the_recent_rate_not_the_average():
    samples = slow_then_fast()
    assert recent_rate(samples, window=300) == pytest.approx(2.0)
    assert eta_seconds(1000, recent_rate(samples, window=300)) == pytest.approx(500)
    average = samples[-1][1] / samples[-1][0]  # what an ETA since start-up would use: 0.73 images/s
    assert eta_seconds(1000, average) > 1300
    # while the window still holds some of the slow part, it counts in proportion
    assert samples[149] == (745, 350) and samples[89] == (445, 44)
    assert recent_rate(samples[:150], window=300) == pytest.approx((350 - 44) / 300)


def test_rate_window_keeps_only_what_the_window_needs():
    window = RateWindow(300)
    for t, done in slow_then_fast():
        window.add(t, done)
    assert window.rate() == pytest.approx(2.0)
    assert window.samples[0][0] <= 900 - 300 < window.samples[1][0]


def test_no_rate_before_two_samples_span_time():
    assert recent_rate([]) is None and recent_rate([(5.0, 3)]) is None and recent_rate([(5.0, 3), (5.0, 4)]) is None
    assert eta_seconds(10, None) is None and eta_seconds(10, 0.0) is None and eta_seconds(0, None) == 0.0


def test_durations():
    assert [duration(s) for s in (0, 42.4, 185, 3725, float("inf"), None)] == ["0s", "42s", "3m05s", "1h02m", "?", "?"]


def test_progress_line_of_a_run_with_a_slow_start():
    clock = iter(t for t, _ in slow_then_fast())
    stream = io.StringIO()
    progress = Progress(stream, total=1660, done_before=0, every=0.0, window=300, clock=lambda: next(clock))
    lines = [progress.line(done, failed=1, actors=2) for _, done in slow_then_fast()[1:]]
    assert lines[-1] == "images 660/1,660 (40%) | 2.00 images/s | ETA 8m20s | failed 1 | actors 2"
    assert progress_line(5, 10, 0, 1, None) == "images 5/10 (50%) | 0.00 images/s | ETA ? | failed 0 | actors 1"


def status_with_commits(commits: dict[str, tuple[float, int]], images: int) -> OutputStatus:
    return OutputStatus(
        url="out", job={}, shards=20, shards_done=len(commits), rows=images, rows_done=sum(n for _, n in commits.values()),
        images=images, images_done=sum(n for _, n in commits.values()), failures=0, success=None,
        shard_timing=[(shard, n, 1.0) for shard, (_, n) in sorted(commits.items())])


def live_holder(started: float) -> LeaseRecord:
    return LeaseRecord(run_id="r", host=this_host(), pid=os.getpid(), started=started, heartbeat=time.time())


def test_status_eta_from_the_shards_committed_recently_by_the_running_driver():
    now = time.time()
    # an earlier run committed 4 shards of 10 images; this one started 20 minutes ago, took 10
    # minutes to commit its first shard, then one every 30 s
    commits = {f"shard-{i:06d}": (now - 86400 + i, 10) for i in range(4)}
    started = now - 1200
    commits |= {f"shard-{4 + i:06d}": (started + 600 + 30 * i, 10) for i in range(21)}
    times = {shard: t for shard, (t, _) in commits.items()}
    status = with_eta(status_with_commits(commits, images=450), live_holder(started), times, window=300)
    assert status.running.startswith("run r (host ")
    assert status.images_per_second == pytest.approx(10 / 30)
    assert status.eta_seconds == pytest.approx(200 / (10 / 30))
    assert "running   run r" in status.format() and "0.33 images/s recently, ETA 10m00s" in status.format()

    assert with_eta(status_with_commits(commits, 450), None, times).running is None
    dead = LeaseRecord(run_id="r", host=this_host(), pid=os.getpid(), started=started, heartbeat=now - 3600)
    assert with_eta(status_with_commits(commits, 450), dead, times).eta_seconds is None
    assert with_eta(status_with_commits(commits, 450), live_holder(started), {}).images_per_second is None


def test_status_json_agrees_with_the_text(tmp_path):
    out = Output(str(tmp_path / "out"))
    out.prepare(JobSpec(manifest="m.parquet", manifest_fingerprint="m", model="builtin:tiny", model_fingerprint="f",
                        rows=3, images=5, shard_size=2, defaults=Defaults(), dtype="fp32"))
    out.write(LEASE_FILE, json.dumps(vars(live_holder(time.time() - 60))).encode())
    runner = CliRunner()
    text = runner.invoke(app, ["status", str(tmp_path / "out")])
    got = runner.invoke(app, ["status", str(tmp_path / "out"), "--json"])
    assert text.exit_code == got.exit_code == 0, (text.output, got.output)
    facts = json.loads(got.stdout)
    assert facts | {"running": None} == {
        "url": str(tmp_path / "out"), "manifest": "m.parquet", "model": "builtin:tiny",
        "shards_done": 0, "shards_total": 3, "shards_remaining": 3, "rows_done": 0, "rows_total": 3,
        "images_done": 0, "images_total": 5, "failures": 0, "finished": False, "success_stale": False,
        "running": None, "images_per_second": None, "eta_seconds": None, "shard_timing": [],
        "timing_total": {"shard": "all", "images": 0, "seconds": 0.0, "images_per_second": None},
        "first_failures": [], "damaged": {}, "job_from": None, "keep": None}
    assert facts["running"].startswith("run ") and f"running   {facts['running']}: - images/s recently, ETA ?" in text.stdout
    for line in ("shards    0/3 done (3 remaining)", "rows      0/3 done", "images    0/5 written", "failures  0", "_SUCCESS  no"):
        assert line in text.stdout


@pytest.mark.parametrize("where", ["local", "memory"])
def test_commit_times_are_the_metadata_files_times(tmp_path, where):
    url = str(tmp_path / "out") if where == "local" else f"memory://progress-{os.getpid()}/out"
    out = Output(url)
    before = time.time()
    out.write("metadata/shard-000003.parquet", b"x")
    out.write("metadata/notes.parquet", b"x")
    times = out.commit_times()
    assert list(times) == ["shard-000003"] and before - 2 <= times["shard-000003"] <= time.time() + 2
    assert Output(str(tmp_path / "empty")).commit_times() == {}
