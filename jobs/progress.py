"""What `sdbatch run` and `sdbatch status` say about a job's progress: the rate, the ETA, the
progress line and the end-of-run summary.

The rate is the recent one: images over the last RATE_WINDOW seconds, not since start-up, so
a slow start (model loading, compiling, a cold cache) or a change of pace (actors added or lost)
stops weighing on the ETA once it is RATE_WINDOW seconds old. Everything here but `Progress` (a
status line on a stream) is a pure function of counters and times.
"""
import bisect
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from jobs.driver import RunResult
    from jobs.lease import LeaseRecord
    from jobs.sink import OutputStatus

RATE_WINDOW = 300.0  # seconds of history behind the rate and the ETA


def recent_rate(samples: Sequence[tuple[float, float]], window: float = RATE_WINDOW) -> float | None:
    """Images per second over the last `window` seconds of `samples`: (time, images done so far)
    in time order. The rate starts at the latest sample at or before the window's start (so it
    spans the whole window once the samples do), else at the first; None until two samples
    span some time."""
    if len(samples) < 2:
        return None
    end_time, end_done = samples[-1]
    start = max(bisect.bisect_right(samples, end_time - window, key=lambda s: s[0]) - 1, 0)
    start_time, start_done = samples[start]
    if end_time <= start_time:
        return None
    return (end_done - start_done) / (end_time - start_time)


def eta_seconds(remaining: int, rate: float | None) -> float | None:
    """Seconds until `remaining` images are done at `rate` (None: unknown)."""
    if remaining <= 0:
        return 0.0
    if not rate or rate <= 0:
        return None
    return remaining / rate


def duration(seconds: float | None) -> str:
    """1h02m, 3m05s, 42s; "?" for an unknown or infinite time."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class RateWindow:
    """(time, images done) samples of one run, kept for RATE_WINDOW seconds and one more sample."""

    def __init__(self, window: float = RATE_WINDOW):
        self.window = window
        self.samples: list[tuple[float, float]] = []

    def add(self, t: float, done: float) -> None:
        self.samples.append((t, done))
        # drop what no longer starts the window: the window's start stays at or after samples[0]
        cut = bisect.bisect_right(self.samples, t - self.window, key=lambda s: s[0]) - 1
        if cut > 0:
            del self.samples[:cut]

    def rate(self) -> float | None:
        return recent_rate(self.samples, self.window)


def progress_line(done: int, total: int, failed: int, actors: int, rate: float | None) -> str:
    eta = eta_seconds(total - done, rate)
    pct = 100.0 * done / total if total else 100.0
    return (f"images {done:,}/{total:,} ({pct:.0f}%) | {rate or 0.0:.2f} images/s | ETA {duration(eta)} | "
            f"failed {failed:,} | actors {actors}")


class Progress:
    """One status line on stderr: redrawn in place on a terminal, printed every `every` seconds elsewhere
    (logs of `ray job logs`, CI)."""

    def __init__(self, stream: TextIO, total: int, done_before: int, *, every: float = 10.0,
                 window: float = RATE_WINDOW, clock=time.monotonic):
        self.stream, self.total = stream, total
        self.interactive = stream.isatty()
        self.every = every
        self.clock = clock
        self.rates = RateWindow(window)
        self.rates.add(clock(), done_before)
        self._last_print = 0.0
        self._shown = ""

    def line(self, done: int, failed: int, actors: int) -> str:
        self.rates.add(self.clock(), done)
        return progress_line(done, self.total, failed, actors, self.rates.rate())

    def show(self, done: int, failed: int, actors: int, *, force: bool = False) -> None:
        text = self.line(done, failed, actors)
        now = self.clock()
        if self.interactive:
            if text != self._shown:
                self.stream.write("\r" + text.ljust(len(self._shown)))
                self.stream.flush()
                self._shown = text
        elif force or now - self._last_print >= self.every:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print = now

    def message(self, text: str) -> None:
        if self.interactive and self._shown:
            self.stream.write("\r" + " " * len(self._shown) + "\r")
            self._shown = ""
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive and self._shown:
            self.stream.write("\n")
            self.stream.flush()


def format_summary(result: "RunResult") -> str:
    """What `sdbatch run` prints when the job is done."""
    rate = result.run_images / result.wall_seconds if result.wall_seconds else 0.0
    lines = [f"done: {result.images:,} images, {result.failures:,} failed in {result.output}"
             + (f" ({result.shards_skipped:,} shards were already done)" if result.shards_skipped else ""),
             f"  this run: {result.run_images:,} images, {result.run_failures:,} failed, {result.shards_run:,} shards "
             f"in {duration(result.wall_seconds)} ({rate:.2f} images/s)"
             + (f", the first {duration(result.startup_seconds)} checking, starting Ray and loading the model"
                if result.startup_seconds is not None else "")
             + (f", {result.actor_restarts} actor(s) replaced" if result.actor_restarts else "")]
    for a in result.actors:
        d = a.as_dict()
        scoring = f", {a.scoring_seconds / a.busy_seconds:.0%} of it scoring" if a.scoring_seconds else ""
        lines.append(f"  actor {a.slot} ({a.device}, node {a.node}): {a.images:,} images, {d['images_per_second']:.2f} "
                     f"images/s while generating{scoring}")
    if result.failures:
        lines.append(f"  failed images are listed with their errors in {result.output}/failures/")
    if result.keep is not None:
        from jobs.scorers import format_keep_report

        lines.append(format_keep_report(result.keep))
    return "\n".join(lines)


def with_eta(status: "OutputStatus", holder: "LeaseRecord | None", committed: dict[str, float],
             window: float = RATE_WINDOW) -> "OutputStatus":
    """`status` with `running`, `images_per_second` and `eta_seconds` filled in while a live driver
    holds the output's lease. `committed`: shard -> unix time of its commit. The rate is that of
    the shards committed in the last `window` seconds of that driver's run, counted from its
    start, so an earlier run's pace does not count."""
    if holder is None or not holder.is_live():
        return status
    times = [(committed.get(shard), n) for shard, n, _ in status.shard_timing]
    done = sum(n for t, n in times if t is not None and t < holder.started)
    samples = [(holder.started, done)]
    for t, n in sorted((t, n) for t, n in times if t is not None and t >= holder.started):
        done += n
        samples.append((t, done))
    rate = recent_rate(samples, window)
    remaining = max(status.images - status.images_done - status.failures, 0)
    return replace(status, running=holder.describe(), images_per_second=rate, eta_seconds=eta_seconds(remaining, rate))
