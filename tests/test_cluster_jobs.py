"""`sdbatch run` on real Ray clusters on this machine:
- the submission path users take: a head started with `ray start --head` (loopback, free ports,
  dashboard on so the job server runs), `sdbatch run` submitted with JobSubmissionClient;
- a worker node lost mid-job (`ray.cluster_utils.Cluster`): the job completes with every row
  exactly once and PNGs byte-identical to a clean run;
- the model taken from S3 by the actors into a cache per node, the driver holding no weights: one
  download per node, none for the next job, none left half-written by an actor killed mid-download.
Every wait has a timeout, so a hang fails the test rather than the CI job."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray
import torch

from jobs import driver, sources
from jobs.actor import ActorConfig, ShardRunner
from jobs.manifest import open_manifest
from jobs.plan import shards
from tests.jobdata import DEFAULTS, MODEL, check_images, read_dataset, write_manifest, write_tiny_folder

VENV_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"
SDBATCH = str(VENV_BIN / "sdbatch")


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (held open together while picking, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def processes_mentioning(text: str) -> list[int]:
    """Pids of this user's processes whose command line contains `text` (our own temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class RayHead:
    """`ray start --head --block` in its own session; stopped by its process group and by the pids
    that name its dedicated temp dir — never `ray stop`, which stops every Ray on the machine."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="sdb-ray-", dir="/tmp")  # short: Ray's unix sockets live here
        (self.gcs_port, self.dashboard_port, self.client_port, self.agent_port, self.agent_grpc_port,
         self.runtime_env_port, self.metrics_port, self.node_manager_port, self.object_manager_port) = free_ports(9)
        self.log = Path(self.temp_dir) / "ray-start.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> str:
        args = [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self.client_port}",
            f"--dashboard-agent-listen-port={self.agent_port}", f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--runtime-env-agent-port={self.runtime_env_port}", f"--metrics-export-port={self.metrics_port}",
            f"--node-manager-port={self.node_manager_port}", f"--object-manager-port={self.object_manager_port}",
            "--num-cpus=2", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{self.dashboard_port}"
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"ray start exited:\n{self.log.read_text()[-3000:]}"
            try:
                JobSubmissionClient(url).list_jobs()
                return url
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the job server did not answer within {timeout} s:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        deadline = time.monotonic() + 10
        while (pids := processes_mentioning(self.temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in processes_mentioning(self.temp_dir):  # whatever outlived SIGTERM (workers, agents)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def test_sdbatch_run_submitted_to_a_ray_head(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert not ray.is_initialized()
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"prompt {i}" for i in range(5)])
    out = tmp_path / "out"
    head = RayHead()
    try:
        client = JobSubmissionClient(head.start())
        job_id = client.submit_job(entrypoint=" ".join([
            SDBATCH, "run", str(manifest), "--model", MODEL, "--output", str(out), "--actors", "1", "--shard-size", "2",
            "--width", "64", "--height", "64", "--steps", "2", "--scheduler", "ddim"]))
        deadline = time.monotonic() + 150
        while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.monotonic() < deadline, f"job still {status} after 150 s:\n{client.get_job_logs(job_id)[-3000:]}"
            time.sleep(1)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
    finally:
        head.stop()
    assert "done: 5 images, 0 failed" in logs
    assert not processes_mentioning(head.temp_dir)
    meta, failures = read_dataset(out)
    assert sorted(meta, key=int) == [str(i) for i in range(5)] and not failures
    check_images(out, meta)
    assert (out / "_SUCCESS").exists()


def clean_run(manifest: Path, out: Path, shard_size: int, rows: int) -> dict[str, bytes]:
    """The same manifest without Ray: every shard through the code an actor runs."""
    threads = torch.get_num_threads()
    runner = ShardRunner(ActorConfig(manifest=str(manifest), output=str(out), model=MODEL, defaults=DEFAULTS,
                                     device="cpu", batch_size=4, cpu_threads=1))
    try:
        for shard in shards(rows, shard_size, skip=set()):
            runner.run_shard(shard)
    finally:
        runner.close()
        torch.set_num_threads(threads)
    meta, _ = read_dataset(out)
    return {i: (out / m["image_path"]).read_bytes() for i, m in meta.items()}


def test_worker_node_lost_mid_job(tmp_path):
    from ray.cluster_utils import Cluster

    rows, shard_size = 16, 2
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"prompt {i}" for i in range(rows)], steps=[8] * rows)
    expected = clean_run(manifest, tmp_path / "clean", shard_size, rows)

    # The head has no CPU: each actor takes the one CPU of a worker node, one actor per node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        node_a = cluster.add_node(num_cpus=1, resources={"node_a": 1})
        node_b = cluster.add_node(num_cpus=1, resources={"node_b": 1})
        cluster.wait_for_nodes(timeout=60)
        ray.init(address=cluster.address, log_to_driver=False)
        workers = {node_a.node_id[:8]: "a", node_b.node_id[:8]: "b"}

        removed = threading.Event()
        dispatched = []

        def on_dispatch(actor, shard):
            # The third dispatch comes after the first shard is done; both actors are busy then.
            dispatched.append(shard.id)
            if len(dispatched) == 3 and not removed.is_set():
                cluster.remove_node(node_b, allow_graceful=False)
                removed.set()

        opts = driver.RunOptions(manifest=str(manifest), model=MODEL, output=str(tmp_path / "out"), defaults=DEFAULTS,
                                 actors=2, batch_size=4, shard_size=shard_size)
        result = run_with_timeout(lambda: driver.run(opts, on_dispatch=on_dispatch), 150)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed.is_set()
    assert result.actor_restarts >= 1
    assert sorted(workers.get(a.node, a.node) for a in result.actors) == ["a", "b"]  # one actor on each worker
    out = tmp_path / "out"
    meta, failures = read_dataset(out)  # asserts every id once
    assert not failures and sorted(meta, key=int) == [str(i) for i in range(rows)]
    got = check_images(out, meta)
    assert got.keys() == expected.keys() and all(got[i] == expected[i] for i in expected)  # byte-identical PNGs
    assert (out / "_SUCCESS").exists()


def run_with_timeout(fn, timeout: float):
    """`fn()` on a helper thread; fails the test if it has not returned within `timeout` seconds."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"driver.run did not return within {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


# --- the model from object storage, cached once per node ------------------------------------------------

def upload_model(s3_server, folder: Path) -> str:
    bucket = s3_server.make_bucket(f"models-{uuid.uuid4().hex[:8]}")
    s3_server.filesystem().put(str(folder), f"{bucket}/sd15", recursive=True)
    return f"s3://{bucket}/sd15/"


def cached_files(cache: Path) -> set[str]:
    """The model files in a node's cache (records, locks and temporary files left out)."""
    (source,) = (cache / "fsspec").iterdir()
    return {p.relative_to(source).as_posix() for p in source.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.relative_to(source).parts[0] not in (".sdbatch", ".partial")}


def partial_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "fsspec").rglob("*.part")] if (cache / "fsspec").exists() else []


def test_model_from_s3_downloaded_once_per_node(tmp_path, s3_server, monkeypatch):
    """Two worker nodes with two actors each and a cache of their own; the driver has no weights."""
    from ray.cluster_utils import Cluster

    release = write_tiny_folder(tmp_path / "sd15", release_layout=True)
    model = upload_model(s3_server, release)
    wanted = set(sources.select([p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()],
                                torch.float32, model)[1])
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "driver-cache"))  # the driver's (and the head's) cache
    rows = 24
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"prompt {i}" for i in range(rows)])
    caches = {name: tmp_path / f"cache-{name}" for name in "ab"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        nodes = {name: cluster.add_node(num_cpus=2, env_vars={sources.CACHE_ENV: str(cache)})
                 for name, cache in caches.items()}
        cluster.wait_for_nodes(timeout=60)
        ray.init(address=cluster.address, log_to_driver=False)
        names = {node.node_id[:8]: name for name, node in nodes.items()}
        results = []
        for out in ("out1", "out2"):
            opts = driver.RunOptions(manifest=str(manifest), model=model, output=str(tmp_path / out), defaults=DEFAULTS,
                                     actors=4, batch_size=2, shard_size=1, storage_options=s3_server.storage_options)
            results.append(run_with_timeout(lambda: driver.run(opts), 180))
    finally:
        ray.shutdown()
        cluster.shutdown()
    first, second = results
    # Two actors per node; on a loaded machine one may still be starting when the last shard commits.
    placed = [names[a.node] for a in first.actors if a.node != "?"]
    assert set(placed) == {"a", "b"} and len(placed) >= 3, placed
    for name in "ab":  # each node fetched each file once, whichever of its actors did
        assert sum(a.model_files_downloaded for a in first.actors if names.get(a.node) == name) == len(wanted)
        assert cached_files(caches[name]) == wanted and not partial_files(caches[name])
    assert [a.model_files_downloaded for a in second.actors] == [0] * 4  # the next job finds the caches full
    assert not (tmp_path / "driver-cache").exists()

    meta, failures = read_dataset(tmp_path / "out1")
    assert not failures and len(meta) == rows
    check_images(tmp_path / "out1", meta)
    job = json.loads((tmp_path / "out1" / "_sdbatch" / "job.json").read_text())
    revision = job["settings"]["model_source"]["revision"]
    assert {f["path"] for f in job["settings"]["model_source"]["files"]} == wanted
    assert revision.startswith("files:") and {m["model_revision"] for m in meta.values()} == {revision}
    assert {m["model"] for m in meta.values()} == {model}


def processes_with_open(folder: Path) -> list[int]:
    """Pids of processes holding a file under `folder` open."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(os.readlink(fd).startswith(str(folder)) for fd in (entry / "fd").iterdir()):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_an_actor_killed_mid_download(tmp_path, s3_server):
    """The actor downloading the model dies; its node's other actor takes over the download and a
    replacement actor finds the cache full. No temporary file is left, and the job completes."""
    from ray.cluster_utils import Cluster

    folder = write_tiny_folder(tmp_path / "sd15", text_encoder_padding=256 << 20)  # ~1 s to download
    model = upload_model(s3_server, folder)
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"prompt {i}" for i in range(4)])
    cache = tmp_path / "cache"
    killed = []

    def kill_the_downloader():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for part in partial_files(cache):
                for pid in processes_with_open(part.parent):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, env_vars={sources.CACHE_ENV: str(cache)})
        cluster.wait_for_nodes(timeout=60)
        ray.init(address=cluster.address, log_to_driver=False)
        threading.Thread(target=kill_the_downloader, daemon=True).start()
        opts = driver.RunOptions(manifest=str(manifest), model=model, output=str(tmp_path / "out"), defaults=DEFAULTS,
                                 actors=2, batch_size=2, shard_size=2, storage_options=s3_server.storage_options)
        result = run_with_timeout(lambda: driver.run(opts), 240)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert killed and result.actor_restarts >= 1 and result.images == 4
    assert not partial_files(cache)
    (source,) = (cache / "fsspec").iterdir()
    for rel in cached_files(cache):
        assert (source / rel).read_bytes() == (folder / rel).read_bytes(), rel
