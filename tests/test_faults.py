"""The randomized fault test: rounds of one job with drivers killed (SIGKILL or SIGTERM), actors
killed, and a second driver started, each at a random moment; then a final run. Seeded: set
SDBATCH_FAULT_SEED to replay a failure (the seed is in the assertion messages)."""
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from tests.jobdata import check_images, read_dataset, write_manifest
from tests.test_run import SDBATCH, TINY, descendants

SEED = int(os.environ.get("SDBATCH_FAULT_SEED", "20261206"))
ROUNDS = 6
FAULTS = ("kill driver", "stop driver", "kill actor", "second driver")


def wait_quiet(folder: Path, seconds=2.0, timeout=30.0) -> None:
    """Until nothing under `folder` changed for `seconds` (an orphaned actor may still commit)."""
    def state():
        return sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []

    last, since, deadline = state(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < seconds and time.monotonic() < deadline:
        time.sleep(0.2)
        if (now := state()) != last:
            last, since = now, time.monotonic()


def test_random_faults_leave_every_row_exactly_once(tmp_path):
    rng = random.Random(SEED)
    rows = 40  # about 25 s of work on one CPU actor: most faults land mid-job
    counts = [rng.choice([1, 1, 1, 2, 3]) for _ in range(rows)]
    counts[rows // 2] = 8  # a row whose images span three shards
    manifest = write_manifest(tmp_path / "m.parquet", id=[f"r{i}" for i in range(rows)],
                              prompt=[f"prompt {i}" for i in range(rows)], num_images=counts, steps=[20] * rows)
    out = tmp_path / "out"
    command = [SDBATCH, "run", str(manifest), "--output", str(out), "--shard-size", "3", *TINY]
    log = []
    started = time.monotonic()
    for round_ in range(ROUNDS):
        fault, delay = rng.choice(FAULTS), rng.uniform(1.5, 10.0)
        driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        second = None
        try:
            time.sleep(delay)
            if driver.poll() is None:
                if fault == "kill driver":
                    driver.send_signal(signal.SIGKILL)
                elif fault == "stop driver":
                    driver.send_signal(signal.SIGTERM)
                elif fault == "kill actor":
                    actors = [pid for pid, cmd in descendants(driver.pid).items() if "ShardActor" in cmd]
                    if actors:
                        os.kill(rng.choice(actors), signal.SIGKILL)
                    else:
                        fault = "kill actor (none yet)"
                else:
                    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
            _, stderr = driver.communicate(timeout=180)
        finally:
            if driver.poll() is None:
                driver.kill()
        log.append((round_, fault, round(delay, 1), driver.returncode, second and second.returncode))
        assert "Traceback" not in stderr, (SEED, log, stderr)
        assert driver.returncode in (0, -signal.SIGKILL, 130), (SEED, log, stderr)
        if second is not None:  # refused while the first runs; or the first had finished the job
            assert second.returncode == 0 or (
                second.returncode == 2 and "is in use by another sdbatch run" in second.stderr), (SEED, log, second.stderr)
        wait_quiet(out)

    final = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, (SEED, log, final.stderr)
    meta, failures = read_dataset(out)  # asserts that no id appears twice
    expected = {f"r{i}" if n == 1 else f"r{i}-{k}" for i, n in enumerate(counts) for k in range(n)}
    assert set(meta) | set(failures) == expected and not failures, (SEED, log, sorted(expected - set(meta)))
    check_images(out, meta)
    pngs = {str(p.relative_to(out)) for p in (out / "images").rglob("*.png")}
    assert pngs == {m["image_path"] for m in meta.values()}, (SEED, log)
    shards = {}  # a shard holds --shard-size images, whatever rows they come from
    for m in meta.values():
        shards.setdefault(m["image_path"].split("/")[1], []).append(m["id"])
    assert len(shards) == -(-len(expected) // 3) and all(len(ids) <= 3 for ids in shards.values()), (SEED, log)
    success = json.loads((out / "_SUCCESS").read_text())
    assert (success["images"], success["failures"], success["rows"]) == (len(expected), 0, rows)
    assert not (out / "_sdbatch" / "lease.json").exists()
    print(f"seed {SEED}: {ROUNDS} rounds {log} in {time.monotonic() - started:.0f} s")
