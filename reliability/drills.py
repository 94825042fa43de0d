"""Fault drills: a load of logical requests, each with its own image and Idempotency-Key,
sent through the openai SDK (its default two retries) and a balancer over the replicas,
while a fault script or an event (Redis stopped, a replica killed) hits the stack.

Per drill: requests lost (no image after the SDK's retries), double charges, server errors
seen by clients, p50/p99 of what clients waited, and "ledger = providers' bills": what the
gateways' ledger gained per provider against what the emulators billed meanwhile, to the
micro-dollar (tests/integration/reconcile.py), and `upscale_spend_usd` summed over the
replicas against the ledger (n/a when a replica was killed or stopped: its counters went
with it).

A double charge is an input for which the providers completed, and billed, more than one
good job: one of them was paid for in vain. Jobs whose output a provider fault spoiled (a
malformed answer, a truncated file, no image) are not double charges, but they are real
spend: the provider billed them, so the ledger must hold them like any other job."""

from __future__ import annotations

import io
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import orjson
import redis
from openai import OpenAI
from PIL import Image

from bench.hedging import quantile
from reliability.stack import CLIENT_KEY, Stack
from tests.integration import reconcile
from tests.integration.redis_server import RedisServer

MODEL = "recraft-crisp-upscale"
BASE = {"latency_ms": 300, "jitter_ms": 100}
# A job no replica knew of was submitted by the killed one in the moment before the kill
# (between the provider's accept and the journal write): created at most this long before.
KILL_WINDOW_S = 5.0
QUIET_S = 1.5  # the ledger stands still this long before it is read (settle retries: 1 s)


@dataclass(frozen=True, slots=True)
class Drill:
    name: str
    fal: dict[str, Any] = field(default_factory=dict)
    replicate: dict[str, Any] = field(default_factory=dict)
    event: Callable[[Stack], None] | None = None  # run once, a second into the load


@dataclass(slots=True)
class DrillResult:
    name: str
    requests: int
    ok: int
    lost: int  # failed, and not every provider it tried had a fault injected
    excused: int  # failed after a fault on every provider it tried
    server_errors: int
    double_charged: int
    p50_s: float
    p99_s: float
    bills: reconcile.Reconciliation  # ledger vs the emulators' bills vs the counters
    errors: Counter[str] = field(default_factory=Counter)
    doubled: list[list[dict[str, Any]]] = field(default_factory=list)  # the jobs paid twice
    # billed jobs no replica knew of (see unknown_to_gateways), and the double charges
    # they explain: a retry paid again for an input whose first job was one of them
    unknown: list[dict[str, Any]] = field(default_factory=list)

    killed_at: float | None = None  # when the drill's SIGKILL went out (time.time)

    @property
    def doubled_unknowingly(self) -> int:
        """Double charges an unknown job explains: at most one per unknown job."""
        ids = {j["id"] for j in self.unknown}
        return sum(min(len(g) - 1, sum(j["id"] in ids for j in g)) for g in self.doubled)

    @property
    def unknown_unexplained(self) -> list[dict[str, Any]]:
        """Unknown jobs the kill cannot explain: with no kill, or created more than
        KILL_WINDOW_S before it (or after it). A billed job a live replica failed to charge
        (say, of a request whose journal its release deleted) lands here."""
        if self.killed_at is None:
            return list(self.unknown)
        killed = self.killed_at
        # A submit whose body was in flight at the kill becomes a job a moment after it.
        return [
            j for j in self.unknown if not killed - KILL_WINDOW_S <= j["created_at"] <= killed + 1.0
        ]


def unique_png(rng: random.Random, side: int = 48) -> bytes:
    """An image no other request sends: the emulators tell jobs apart by their input."""
    img = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def restart_redis(stack: Stack, down_s: float = 3.0) -> None:
    """Redis goes away for down_s and comes back with what it held, as the compose Redis
    does with its append-only file (the drills' Redis has no persistence of its own: killed,
    it would come back empty, taking the ledger, holds and idempotency keys with it)."""
    redis.Redis(port=stack.redis.port).shutdown(save=True)  # refuses clients, then exits
    if stack.redis.proc is not None:
        stack.redis.proc.wait(10)
    time.sleep(down_s)
    stack.redis = RedisServer(stack.workdir, port=stack.redis.port).start()


def kill_replica(stack: Stack) -> None:
    victim = stack.replicas[0]
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    stack.killed_at = time.time()


def terminate_replica(stack: Stack) -> None:
    victim = stack.replicas[-1]
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGTERM)  # drains in-flight requests, then exits
    victim.proc.wait(60)


DRILLS = (
    Drill("fal hangs (attempt timeouts)", fal={"hang_rate": 1.0}),
    Drill("fal 5xx", fal={"error_rate": 1.0, "error_status": 503}),
    Drill("fal 429 with Retry-After", fal={"rate_limit_rate": 1.0, "retry_after_s": 5}),
    Drill("malformed JSON (half)", fal={"malformed_rate": 0.5}),
    Drill("truncated result images (half)", fal={"truncated_rate": 0.5}),
    Drill("slow downloads (half, 256 KB/s)", fal={"slow_download_rate": 0.5}),
    Drill(
        "both flaky: replicate 5xx, fal job failures",
        fal={"job_failure_rate": 0.3},
        replicate={"error_rate": 0.3, "error_status": 500},
    ),
    Drill("Redis stopped 3 s and restarted", event=restart_redis),
    Drill("replica killed (SIGKILL) under load", event=kill_replica),
    Drill(
        "replica killed (SIGKILL) while Replicate serves",
        fal={"error_rate": 1.0, "error_status": 503},
        event=kill_replica,
    ),
    Drill("replica stopped (SIGTERM) under load", event=terminate_replica),
)


class Clients:
    """Logical requests as an SDK user sends them: the openai SDK with its default two
    retries, one Idempotency-Key and one fresh image each, through the balancer."""

    def __init__(self, stack: Stack, seed: str):
        live = [r for r in stack.replicas if r.proc is not None and r.proc.poll() is None]
        balancer = stack.balancer()
        balancer.ports = [r.port for r in live]
        self.http = httpx.Client(transport=balancer, timeout=60)
        self.client = OpenAI(
            base_url=f"{live[0].url}/v1", api_key=CLIENT_KEY, http_client=self.http, max_retries=2
        )
        self.rng = random.Random(seed)
        self.waits: list[float] = []
        self.outcomes: Counter[str] = Counter()
        # (x-upscale-attempts, message) of the requests that failed for good
        self.failures: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def image(self) -> bytes:
        with self._lock:
            return unique_png(self.rng)

    def send(self, index: int) -> None:
        image = self.image()
        started = time.monotonic()
        failure: tuple[str, str] | None = None
        try:
            result = self.client.images.edit(
                model=MODEL,
                image=("in.png", image, "image/png"),
                prompt="x",
                extra_body={"response_format": "b64_json" if index % 2 else "url"},
                extra_headers={"Idempotency-Key": str(uuid.uuid4())},
            )
            item = result.data[0]
            if item.url:  # through the balancer: its host is the one the URL names
                self.download(item.url)
            elif not item.b64_json:
                raise RuntimeError("no image in the response")
            outcome = "ok"
        except openai.APIStatusError as exc:
            code = exc.body.get("code") if isinstance(exc.body, dict) else ""
            outcome = f"{exc.status_code} {code}"
            failure = (exc.response.headers.get("x-upscale-attempts", ""), exc.message)
        except Exception as exc:  # connection errors after the retries, unreadable URLs
            outcome = type(exc).__name__
        with self._lock:
            self.waits.append(time.monotonic() - started)
            self.outcomes[outcome] += 1
            if failure is not None:
                self.failures[failure] += 1

    def download(self, url: str, attempts: int = 3) -> None:
        """GET a result URL as a downloader does: a connection that broke mid-answer (the
        replica serving it was killed) is retried, as the SDK retries its own calls; the
        URL is idempotent, and any replica serves it."""
        for attempt in range(attempts):
            try:
                self.http.get(url, timeout=30).raise_for_status()
                return
            except httpx.TransportError:
                if attempt == attempts - 1:
                    raise

    def excused(self) -> int:
        """Failures where the faults left nothing to fail over to: each provider failed
        (x-upscale-attempts) or was not tried for its state, which only the injected faults
        put it in (a 429's cool-down, an open circuit; the error message says which)."""
        return sum(
            n for (attempts, message), n in self.failures.items() if excused(attempts, message)
        )

    def close(self) -> None:
        self.http.close()


PROVIDERS = ("fal", "replicate")


def excused(attempts: str, message: str) -> bool:
    failed = {a.split("=")[0] for a in attempts.split(",") if "=" in a and "=ok" not in a}
    skipped = {
        p
        for p in PROVIDERS
        if f"{p}: not tried, rate limited" in message
        or f"{p}: not tried, circuit open" in message
        or f"{p}: rate limited" in message
        or f"{p}: circuit open" in message
    }
    return bool(failed) and (failed | skipped) >= set(PROVIDERS)


# Faults after which a job still succeeds (and is billed) but its output cannot be used.
SPOILING = frozenset({"malformed", "truncated", "empty_output"})


def double_charges(jobs: list[dict[str, Any]]) -> int:
    """Good jobs paid for in vain: per input, billed jobs with a usable output past the
    first. (Spoiled jobs are no double charge; their cost is in the ledger check.)"""
    return sum(len(group) - 1 for group in doubled(jobs))


def doubled(jobs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The jobs of each input that the providers completed with a usable output more than
    once: what a failed drill shows, to tell where the second job came from."""
    good: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        if job["state"] == "succeeded" and job["fault"] not in SPOILING and job["input_sha256"]:
            good.setdefault(job["input_sha256"], []).append(job)
    return [group for group in good.values() if len(group) > 1]


def unknown_to_gateways(stack: Stack, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Billed jobs that no replica knew of: named in no idempotency claim's journal and never
    charged in the ledger (the emulators' request ids against the shared Redis). Only a
    replica killed after a provider accepted its job and before its journal write reached
    Redis leaves one: neither provider takes an idempotency key or lists a caller's jobs, so
    that window (one Redis write) cannot be closed from the gateway. The retry of such a
    request submits again and pays again; every other job is followed, never paid twice."""
    known: set[str] = set()
    client = redis.Redis(port=stack.redis.port, decode_responses=True)
    try:
        for key in client.scan_iter(match="*:job:*", count=1000):  # the ledger's charges
            known.add(key.rsplit(":", 1)[1])
        for key in client.scan_iter(match="*:idem:*", count=1000):  # the journals
            for name, value in client.hgetall(key).items():
                if name.startswith("job:"):
                    known.update(str(v) for v in orjson.loads(value)["handle"].values())
    finally:
        client.close()
    return [j for j in jobs if j["billed"] and j["id"] not in known]


def emulators(stack: Stack) -> dict[str, reconcile.EmulatorLike]:
    return {"fal": stack.fal, "replicate": stack.replicate}


def run_drill(stack: Stack, drill: Drill, requests: int, concurrency: int) -> DrillResult:
    stack.replace_dead()
    stack.reset_breakers()
    stack.killed_at = None
    stack.fal.faults(**{**BASE, **drill.fal})
    stack.replicate.faults(**{**BASE, **drill.replicate})
    before = {j["id"] for j in stack.jobs()}
    billed_before = reconcile.snapshot(emulators(stack))
    clients = Clients(stack, f"{drill.name}-{os.getpid()}")
    timer: threading.Timer | None = None
    if drill.event is not None:
        event = drill.event
        timer = threading.Timer(1.0, lambda: event(stack))
        timer.start()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(clients.send, range(requests)))
    clients.close()
    if timer is not None:
        timer.join()  # a short load can end first: Redis must be back before the ledger is read
    # Jobs still running at the providers finish (and are billed), and the ledger settles:
    # still for longer than the second after which a replica retries a settle Redis missed.
    bills = reconcile.check(billed_before, emulators(stack), quiet_s=QUIET_S)
    new_jobs = [j for j in stack.jobs() if j["id"] not in before]
    twice = doubled(new_jobs)
    unknown = unknown_to_gateways(stack, new_jobs)
    for job in unknown:
        bills.figures[job["provider"]].unknown += int(job["price_micros"])
    outcomes = clients.outcomes
    ok = outcomes.pop("ok", 0)
    excused = clients.excused()
    return DrillResult(
        name=drill.name,
        requests=requests,
        ok=ok,
        lost=requests - ok - excused,
        excused=excused,
        server_errors=sum(n for e, n in outcomes.items() if e[:1] == "5"),
        double_charged=sum(len(group) - 1 for group in twice),
        p50_s=quantile(clients.waits, 0.5),
        p99_s=quantile(clients.waits, 0.99),
        bills=bills,
        errors=outcomes,
        doubled=twice,
        unknown=unknown,
        killed_at=stack.killed_at,
    )
