"""The breaker against a reference model: a hypothesis state machine drives the in-process
store and the Redis store side by side with a small pure-Python model of the rules, starting
attempts and finishing them in any order (so outcomes of attempts that were in flight at a
trip, a close or a reset land after it), and checks after every step that both stores agree
with the model.

The rules (DESIGN.md, Invariants, Breaker): only the half-open probe moves an open breaker
(one that started half-open: not one a replica took on a stale view of it); an attempt
started before the last transition (trip, re-open, close, reset) counts in the window but
moves nothing; otherwise a success closes (resetting the run of failures) and a
failure extends the run, tripping on `failure_threshold` in a row that are also at least
`trip_error_rate` of the window, with a backoff that doubles per trip since the last close.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.state.base import Outcome, Policy, ProviderRecord
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore
from tests.integration.redis_server import RedisServer

T = TypeVar("T")
POLICY = Policy(failure_threshold=3, trip_error_rate=0.5, open_base_s=5, open_max_s=40, bucket_s=10)
P = "fal"
PROBE_TTL_S = 600.0  # longer than any example: the lock is released, never expired
_prefixes = itertools.count()


@dataclass(frozen=True)
class Attempt:
    id: int
    started_at: float
    probe: bool


@dataclass
class Model:
    """The breaker's rules, written out plainly."""

    state: str = "closed"
    open_until: float = 0.0
    opened_count: int = 0
    consecutive_failures: int = 0
    changed_at: float = 0.0
    recovered_at: float = 0.0
    windows: dict[int, list[int]] = field(default_factory=dict)  # bucket -> [ok, fail]
    probe_holder: int | None = None

    def circuit(self, now: float) -> str:
        if self.state == "open":
            return "open" if now < self.open_until else "half_open"
        return "closed"

    def window(self, now: float) -> tuple[int, int]:
        rows = [self.windows.get(i, [0, 0]) for i in POLICY.buckets(now)]
        return sum(r[0] for r in rows), sum(r[1] for r in rows)

    def record(self, ok: bool, started_at: float | None, probe: bool, now: float) -> None:
        self.windows.setdefault(int(now // POLICY.bucket_s), [0, 0])[0 if ok else 1] += 1
        started = now if started_at is None else started_at
        if started < self.changed_at:
            return  # in flight at the last transition: the window only
        if self.state == "open" and not (probe and started >= self.open_until):
            return  # only the probe moves an open breaker, and only one started half-open
        if ok:
            if self.state == "open":
                self.recovered_at = self.changed_at = now
            self.state, self.opened_count, self.open_until = "closed", 0, 0.0
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        oks, fails = self.window(now)
        if self.state == "open" or (
            self.consecutive_failures >= POLICY.failure_threshold
            and fails >= POLICY.trip_error_rate * (oks + fails)
        ):
            self.opened_count += 1
            backoff = min(POLICY.open_max_s, POLICY.open_base_s * 2 ** (self.opened_count - 1))
            self.state, self.open_until, self.changed_at = "open", now + backoff, now

    def reset(self, now: float) -> None:
        self.state, self.open_until, self.opened_count = "closed", 0.0, 0
        self.consecutive_failures, self.changed_at = 0, now
        self.windows.clear()
        self.probe_holder = None


class BreakerMachine(RuleBasedStateMachine):
    redis_url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.memory = MemoryStore()
        self.redis = RedisStore(self.redis_url, prefix=f"model{next(_prefixes)}")
        self.model = Model()
        self.now = 1_750_000_000.25
        self.ids = itertools.count()
        self.inflight: list[Attempt] = []  # oldest first; probes too

    def teardown(self) -> None:
        self.loop.run_until_complete(self.redis.aclose())
        self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def both(self, method: str, *args: Any) -> list[Any]:
        return [self.run(getattr(s, method)(*args)) for s in (self.memory, self.redis)]

    @rule(dt=st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 45.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.model.circuit(self.now) == "open")
    @rule(late=st.sampled_from([0.0, 0.5, 3.0]), probe=st.booleans())
    def wait_out_the_backoff(self, late: float, probe: bool) -> None:
        self.now = self.model.open_until + late
        if probe:
            self.start("router")

    @rule(how=st.sampled_from(["router", "router", "stale", "stale probe", "burst"]))
    def start(self, how: str) -> None:
        """`router`: what a router does (a closed provider is tried; a half-open one only
        as the probe, holding the lock); `stale`: a replica routing on a view up to a second
        old (not the probe, in any state); `stale probe`: one whose view still says half-open
        after a failed probe re-opened it, taking the lock; `burst`: 20 requests at once."""
        circuit = self.model.circuit(self.now)
        if how == "burst" and circuit == "closed":
            self.inflight += [Attempt(next(self.ids), self.now, False) for _ in range(20)]
        elif how == "stale" or (how == "router" and circuit == "closed"):
            self.inflight.append(Attempt(next(self.ids), self.now, False))
        elif (how == "router" and circuit == "half_open") or (
            how == "stale probe" and circuit == "open"
        ):
            if self.model.probe_holder is not None:
                return
            attempt = Attempt(next(self.ids), self.now, True)
            assert self.both("try_probe", P, str(attempt.id), PROBE_TTL_S) == [True, True]
            self.model.probe_holder = attempt.id
            self.inflight.append(attempt)

    @precondition(lambda self: self.model.probe_holder is not None)
    @rule()
    def probe_is_held(self) -> None:
        assert self.both("try_probe", P, "intruder", PROBE_TTL_S) == [False, False]

    @precondition(lambda self: self.inflight)
    @rule(
        pick=st.sampled_from(["probe", "oldest", "newest"]) | st.integers(0, 30),
        ok=st.booleans(),
        count=st.sampled_from([1, 1, 5, 20]),
        latency=st.sampled_from([0.2, 1.0, 7.0]),
    )
    def finish(self, pick: str | int, ok: bool, count: int, latency: float) -> None:
        """Finish `count` attempts in flight, in any order: the probe if there is one, the
        oldest (in flight since before a trip, a close or a reset), the newest, any."""
        for _ in range(count):
            if not self.inflight:
                return
            probes = [n for n, a in enumerate(self.inflight) if a.probe]
            if pick == "probe" and probes:
                index = probes[0]
            elif pick == "newest":
                index = len(self.inflight) - 1
            elif isinstance(pick, int):
                index = pick % len(self.inflight)
            else:
                index = 0
            self.finished(self.inflight.pop(index), ok, latency)

    @precondition(lambda self: any(a.probe for a in self.inflight))
    @rule(ok=st.booleans())
    def finish_probe(self, ok: bool) -> None:
        self.finish("probe", ok, 1, 0.3)

    def finished(self, attempt: Attempt, ok: bool, latency: float) -> None:
        outcome = Outcome(
            ok,
            latency if ok else None,
            "" if ok else "HTTP 503",
            started_at=attempt.started_at,
            probe=attempt.probe,
        )
        before = self.model.circuit(self.now)
        stale = attempt.started_at < self.model.changed_at
        kind = "stale" if stale else "fresh"
        if attempt.probe:
            kind = "probe" if attempt.started_at >= self.model.open_until else "early probe"
        event(f"{kind} {ok=} {before}")
        self.both("record", P, outcome, self.now, POLICY)
        self.model.record(ok, attempt.started_at, attempt.probe, self.now)
        if attempt.probe:
            self.both("release_probe", P, str(attempt.id))
            if self.model.probe_holder == attempt.id:
                self.model.probe_holder = None

    @rule(ok=st.booleans(), count=st.sampled_from([1, 3]))
    def record_untimed(self, ok: bool, count: int) -> None:
        """A caller that fills no start time: the attempt counts as started now."""
        for _ in range(count):
            self.both("record", P, Outcome(ok, 0.5 if ok else None, "boom"), self.now, POLICY)
            self.model.record(ok, None, False, self.now)

    @rule()
    def reset(self) -> None:
        self.both("reset_breaker", P, self.now)
        self.model.reset(self.now)

    @invariant()
    def stores_agree_with_the_model(self) -> None:
        memory, redis = (r[P] for r in self.both("snapshot", [P], self.now, POLICY))
        assert isinstance(memory, ProviderRecord) and isinstance(redis, ProviderRecord)
        m, now = self.model, self.now
        expected = (
            m.circuit(now),
            m.opened_count,
            m.open_until,
            m.consecutive_failures,
            m.changed_at,
            m.recovered_at,
            m.window(now),
        )
        for name, rec in (("memory", memory), ("redis", redis)):
            got = (
                rec.circuit(now),
                rec.opened_count,
                rec.open_until,
                rec.consecutive_failures,
                rec.changed_at,
                rec.recovered_at,
                (rec.successes, rec.failures),
            )
            assert got == expected, f"{name}: {rec!r}"
        assert memory.state == redis.state == m.state
        assert memory.ewma_s == pytest.approx(redis.ewma_s)
        assert memory.p95_s == redis.p95_s


def test_breaker_matches_the_model(redis_server: RedisServer) -> None:
    BreakerMachine.redis_url = redis_server.url
    run_state_machine_as_test(
        BreakerMachine,
        settings=settings(
            max_examples=100,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
