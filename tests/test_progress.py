"""jobs.progress: the recent rate behind the ETA of `sdbatch run`, on synthetic timings."""
import io

import pytest

from jobs.progress import Progress, RateWindow, duration, eta_seconds, progress_line, recent_rate


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

