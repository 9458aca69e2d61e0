"""One driver per output folder: a lease record in `OUT/_sdbatch/lease.json`, through fsspec.

The record names the run (a random run id), its host and pid, and a heartbeat time that the
holder rewrites every HEARTBEAT_SECONDS. A driver that finds a live lease refuses to start
(exit 2, naming the holder); `--overwrite` is no exception. A lease is stale, and taken over
with a message, when its heartbeat is older than STALE_SECONDS (hosts' clocks must agree to a
few seconds), or at once when its holder ran on this host and its process is gone.

Taking the lease must let exactly one of two drivers started at the same instant win:
- on a local file system the record is created with link(2), which fails if the name exists:
  an atomic create-if-absent;
- s3fs has no conditional create, so on object stores (and for a takeover anywhere) a driver
  writes its record, waits SETTLE_SECONDS and reads it back: of drivers that all saw no live
  lease, the last writer finds its own run id and holds the lease, the others find another's
  and refuse. This relies on the store's read-after-write consistency (S3's since 2020) and on
  each driver's look-then-write taking well under SETTLE_SECONDS.

Fencing: before each shard's metadata file (its commit) is written, the writer reads the record
and commits only if the run id is still its own (`check_holder`), so a driver that lost its
lease stops without committing.
"""
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from jobs import storage
from jobs.sink import Output, OutputError

LEASE_FILE = "_sdbatch/lease.json"
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0
SETTLE_SECONDS = 2.0


class LeaseHeld(OutputError):
    """Another driver holds the lease of this output folder."""


class LeaseLost(OutputError):
    """This driver no longer holds the lease: another one took the folder over."""


def this_host() -> str:
    """The host name, plus the pid namespace where there is one: containers sharing a host name
    do not share pids."""
    try:
        return f"{socket.gethostname()}/pidns:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    started: float  # unix time
    heartbeat: float  # unix time of the last renewal

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"run {self.run_id} (host {self.host.split('/pidns:')[0]}, pid {self.pid}, last heartbeat {age:.0f} s ago)"

    def is_live(self) -> bool:
        if self.host == this_host() and not _pid_alive(self.pid):
            return False
        return time.time() - self.heartbeat < STALE_SECONDS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def read_lease(out: Output) -> LeaseRecord | None:
    """The record, or None if there is none; an unreadable one reads as long dead."""
    try:
        data = storage.read_bytes(out.fs, out.path(LEASE_FILE), retry=out.retry)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return LeaseRecord(**json.loads(data))
    except (ValueError, TypeError):
        return LeaseRecord(run_id="unreadable", host="?", pid=0, started=0.0, heartbeat=0.0)


def check_holder(out: Output, run_id: str) -> None:
    """Raise LeaseLost unless run `run_id` holds the lease (the fence before a commit)."""
    held = read_lease(out)
    if held is None or held.run_id != run_id:
        holder = "nobody" if held is None else held.describe()
        raise LeaseLost(f"{out.name}: this run ({run_id}) no longer holds the output's lease, {holder} does; "
                        "it stops without committing more shards")


class Lease:
    """This driver's lease on `out`: `acquire`, then a heartbeat thread until `release`."""

    def __init__(self, out: Output):
        self.out = out
        self.run_id = uuid.uuid4().hex[:16]
        self.started = time.time()
        self.lost: str | None = None  # why, once the heartbeat found the lease gone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        record = LeaseRecord(self.run_id, this_host(), os.getpid(), self.started, time.time())
        return json.dumps(asdict(record)).encode()

    def acquire(self) -> str | None:
        """Take the lease or raise LeaseHeld; returns a message when a stale lease was taken over."""
        message = None
        for _ in range(3):  # a lost race re-reads the record, which then names the winner
            held = read_lease(self.out)
            if held is not None and held.is_live():
                raise LeaseHeld(f"{self.out.name} is in use by another sdbatch run: {held.describe()}. "
                                f"Wait for it, stop it, or let its lease go stale ({STALE_SECONDS:.0f} s "
                                "without a heartbeat)")
            if held is None and storage.is_local(self.out.fs):
                won = self._create_local()
            else:
                self.out.write(LEASE_FILE, self._record())
                time.sleep(SETTLE_SECONDS)
                after = read_lease(self.out)
                won = after is not None and after.run_id == self.run_id
            if held is not None:
                message = f"took over the stale lease of {held.describe()}"
            if won:
                self._thread = threading.Thread(target=self._beat, name="sdbatch-lease", daemon=True)
                self._thread.start()
                return message
        raise LeaseHeld(f"{self.out.name}: could not take the lease; another sdbatch run is starting there")

    def _create_local(self) -> bool:
        path = self.out.path(LEASE_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{self.run_id}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._record())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if the name exists: the atomic create-if-absent
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                check_holder(self.out, self.run_id)
                self.out.write(LEASE_FILE, self._record())
                last_ok = time.monotonic()
            except LeaseLost as e:
                self.lost = str(e)
                return
            except Exception as e:  # storage trouble: the lease may go stale under us
                if time.monotonic() - last_ok > STALE_SECONDS - 2 * HEARTBEAT_SECONDS:
                    self.lost = f"{self.out.name}: could not renew the output's lease for too long ({e})"
                    return

    def release(self) -> None:
        """Stop the heartbeat and remove the record, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = read_lease(self.out)
            if held is not None and held.run_id == self.run_id:
                self.out.remove(LEASE_FILE)
        except Exception:  # a stale lease expires by itself
            pass
