"""The first status poll's wait, learned from the run times providers report (adapters/pace.py)."""

from __future__ import annotations

import pytest

from adapters.pace import (
    DEADLINE_SHARE,
    KEEP,
    MAX_AGE_S,
    MIN_SEEN,
    SHARE,
    SIZES,
    JobPace,
    run_time,
)

SIZE = (512, 512)
LEFT = 120.0


def ran(pace: JobPace, seconds: float, times: int = MIN_SEEN, size: tuple[int, int] = SIZE) -> None:
    for _ in range(times):
        pace.ran(size, seconds, existed=seconds + 1)


def test_no_wait_before_enough_jobs_of_the_size_succeeded() -> None:
    pace = JobPace()
    ran(pace, 10.0, MIN_SEEN - 1)
    assert pace.first_wait(SIZE, LEFT) == 0.0
    ran(pace, 10.0, 1)
    assert pace.first_wait(SIZE, LEFT) == pytest.approx(SHARE * 10.0)


def test_only_the_same_size_counts() -> None:
    """Another size's run time says nothing about this one's: a larger input may run
    faster (its output is capped), a smaller one may not be faster by a known amount."""
    pace = JobPace()
    ran(pace, 20.0, size=(1024, 1024))
    assert pace.first_wait((512, 512), LEFT) == 0.0
    assert pace.first_wait((1024, 512), LEFT) == 0.0
    assert pace.first_wait((1024, 1024), LEFT) == pytest.approx(SHARE * 20.0)


def test_the_wait_is_a_low_quantile_of_recent_runs() -> None:
    pace = JobPace()
    for seconds in (2.0, 2.0, 2.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0):
        pace.ran(SIZE, seconds, existed=seconds + 1)
    assert pace.first_wait(SIZE, LEFT) == pytest.approx(SHARE * 2.0)
    # A faster provider is learned as its jobs succeed: the old runs age out.
    ran(pace, 10.0, KEEP)
    assert pace.first_wait(SIZE, LEFT) == pytest.approx(SHARE * 10.0)
    ran(pace, 1.0, KEEP // 4)
    assert pace.first_wait(SIZE, LEFT) == pytest.approx(SHARE * 1.0)


def test_the_wait_leaves_most_of_the_deadline() -> None:
    """A late poll must still leave time to fetch the result of a job already billed."""
    pace = JobPace()
    ran(pace, 30.0)
    assert pace.first_wait(SIZE, 10.0) == pytest.approx(DEADLINE_SHARE * 10.0)
    assert pace.first_wait(SIZE, -1.0) == 0.0


@pytest.mark.parametrize("reported", [None, "3.5", -1.0, float("nan"), float("inf"), True, 1e9])
def test_a_run_time_that_is_not_one_is_ignored(reported: object) -> None:
    pace = JobPace()
    ran(pace, 10.0)
    for _ in range(KEEP):
        pace.ran(SIZE, reported, existed=100.0)
    assert pace.first_wait(SIZE, LEFT) == pytest.approx(SHARE * 10.0)


def test_sizes_are_bounded() -> None:
    pace = JobPace()
    ran(pace, 5.0, size=(100, 100))
    for side in range(200, 200 + SIZES):
        pace.ran((side, side), 1.0, existed=2.0)
    assert pace.first_wait((100, 100), LEFT) == 0.0  # the least recently seen went first
    assert len(pace._runs) == SIZES


def test_run_time_reads_the_providers_metrics() -> None:
    assert run_time({"metrics": {"inference_time": 4.2}}, "inference_time") == 4.2
    assert run_time({"metrics": {"predict_time": 4.2}}, "inference_time") is None
    assert run_time({"metrics": None}, "predict_time") is None
    assert run_time(["metrics"], "predict_time") is None


def test_a_run_time_longer_than_the_job_existed_counts_as_its_age() -> None:
    """A run time in milliseconds, or a made-up one, cannot hold jobs back longer than
    jobs of that size have taken end to end."""
    pace = JobPace()
    for _ in range(MIN_SEEN):
        pace.ran(SIZE, 2_000.0, existed=2.5)
    assert pace.first_wait(SIZE, LEFT) == pytest.approx(SHARE * 2.5)


def test_old_run_times_are_not_used() -> None:
    pace = JobPace()
    for _ in range(MIN_SEEN):
        pace.ran(SIZE, 10.0, existed=11.0, now=1000.0)
    assert pace.first_wait(SIZE, LEFT, now=1000.0 + MAX_AGE_S - 1) == pytest.approx(SHARE * 10)
    assert pace.first_wait(SIZE, LEFT, now=1000.0 + MAX_AGE_S + 1) == 0.0
