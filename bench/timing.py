"""Timing helpers and machine facts.

The machines this runs on are shared, so A and B are never timed in two separate blocks: their
repetitions alternate (A B, B A, A B, ...), each figure is the median, and a ratio compares
medians taken over the same stretch of time.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: bool = True,
                device: str = "cpu", log: Callable[[str], None] | None = None,
                shares: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds of each of `reps` calls of every fn, the call order alternating between repetitions.

    `shares`, if given, receives each call's CPU share: this process's CPU seconds over wall seconds
    times torch's threads. Near 1 the run had the cores to itself; well below, other processes took
    them, and its time says more about them than about the code.
    """
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
        sync(device)
    times = {name: [] for name in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            sync(device)
            wall = time.perf_counter() - t0
            times[name].append(wall)
            if shares is not None:
                shares.setdefault(name, []).append((time.process_time() - c0) / (wall * torch.get_num_threads()))
        if log:
            log("  rep %d/%d: %s" % (r + 1, reps, ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names)))
    return times


def run_child(cmd: list[str], what: str, *, timeout: float, env: dict | None = None) -> tuple[str, float]:
    """`cmd` in a fresh process from the repository root: (its stdout, wall seconds). Raises
    RuntimeError with the end of its stderr if it fails."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=timeout, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return done.stdout, seconds


def child_json(args: list[str], what: str, *, timeout: float) -> tuple[dict, float]:
    """`python ARGS...` (a bench module) in a fresh process: (the JSON of its last line, wall seconds)."""
    stdout, seconds = run_child([sys.executable, *args], what, timeout=timeout)
    return json.loads(stdout.strip().splitlines()[-1]), seconds


def verdict(ok: bool) -> str:
    """How a report line judges a figure against the issue's target."""
    return "met" if ok else "NOT met"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        cpu = fields["model name"]
    generation = _amd_generation(fields)
    if generation:
        # Virtual machines here all say "AMD EPYC"; the core generation decides which kernels are fast.
        cpu += f" ({generation}, family {fields['cpu family']} model {fields['model']})"
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": mem_gib,
        "python": platform.python_version(),
        "os": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _amd_generation(cpuinfo: dict) -> str | None:
    """Zen 4 or Zen 5 from /proc/cpuinfo's family and flags (Zen 3 has no AVX-512)."""
    if cpuinfo.get("vendor_id") != "AuthenticAMD":
        return None
    family, avx512 = cpuinfo.get("cpu family"), "avx512f" in cpuinfo.get("flags", "").split()
    if family == "26":
        return "Zen 5"
    if family == "25":
        return "Zen 4" if avx512 else "Zen 3"
    return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "sdbatch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        out["sdbatch_commit"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parents[1],
            capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["sdbatch_commit"] = None
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), file-backed (memory-mapped) pages included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
