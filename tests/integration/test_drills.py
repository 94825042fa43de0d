"""A fast subset of `make reliability`'s fault drills, on three replicas and one Redis: each
drill's load is sent through the openai SDK (two retries, an Idempotency-Key per request)
and must lose no request and pay no provider job twice that any replica knew of.

The one exception is proved job by job, never assumed: a replica SIGKILLed after a provider
accepted its job and before the journal write reached Redis leaves a job no replica knew of
(in no journal, never charged), and the client's retry pays again for that input. Only the
kill drills may have such jobs; every double charge must be one of them, and the ledger plus
their cost must equal the bills to the micro-dollar."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability.drills import DRILLS, Drill, kill_replica, run_drill
from reliability.stack import Stack, stack

FAST = ("fal 5xx", "fal hangs", "truncated", "Redis stopped", "replica killed (SIGKILL) under")


@pytest.fixture(scope="module")
def drill_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("drills"))
    with stack(workdir, 3, cache={"enabled": False}, idempotency={"lease_s": 2}) as running:
        yield running


@pytest.mark.parametrize(
    "drill", [d for d in DRILLS if d.name.startswith(FAST)], ids=lambda d: d.name
)
def test_drill_loses_nothing_and_pays_once(drill_stack: Stack, drill: Drill) -> None:
    concurrency = 6
    result = run_drill(drill_stack, drill, requests=16, concurrency=concurrency)
    assert result.lost == 0, result.errors
    if drill.event is not kill_replica:
        assert result.unknown == []
    assert result.unknown_unexplained == []  # only the killed replica's last moment
    assert len(result.unknown) <= concurrency  # at most one per request in flight
    assert result.double_charged == result.doubled_unknowingly, (result.doubled, result.unknown)
    assert result.ok + result.excused == result.requests
    assert result.bills.ok, result.bills.message()  # ledger = bills, to the micro-dollar
