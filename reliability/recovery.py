"""Recovery drill: how soon a provider that recovers gets its traffic back.

Under a steady load of `concurrency` requests in flight (the openai SDK, no retries, through
the balancer over every replica), fal fails every request (503) for `fail_s` seconds and
then recovers. The blip starts on an empty breaker window (a reset after the warm-up), so
the breaker trips on its first failures with every request in flight. The figure is the
time from fal's recovery until fal again carries at least 90 % of the successful responses,
per sliding one-second window of request start times (the routing decision), read from each
response's `x-upscale-provider` header. DESIGN.md's invariant says: within `open_base_s`
plus one probe, here `open_base_s + 2` s.

Attempts in flight when fal's breaker trips all fail after the trip; if each of those
re-tripped the breaker and doubled its backoff (issue 11), fal would stay out for up to
`open_max_s`. The breaker's record is sampled from Redis as the drill runs, so the result
also says how often it opened and how far its backoff grew.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import redis
import yaml
from openai import OpenAI

from reliability.drills import BASE, MODEL, unique_png
from reliability.stack import CLIENT_KEY, Stack

SHARE = 0.9  # of the successful responses, fal's once it has its traffic back
WINDOW_S = 1.0
STEP_S = 0.1
MIN_SAMPLES = 5  # a window with fewer successes says nothing
WARMUP_S = 3.0
AFTER_S = 3.0  # of load kept up once fal has its traffic back
OBSERVE_S = 40.0  # give up this long after fal recovered


@dataclass(slots=True)
class RecoveryResult:
    concurrency: int
    fail_s: float
    open_base_s: float
    target_s: float  # open_base_s + 2
    recovery_s: float | None  # None: fal did not get its share back within OBSERVE_S
    share_before: float  # fal's share of successes in the warm-up
    requests: int
    ok: int
    opened: int  # times fal's breaker was seen to go from closed to open
    max_opened_count: int  # its highest opened_count (each doubles the backoff)
    max_backoff_s: float  # the longest open_until - changed_at seen
    # (second relative to fal's recovery, successes started in it, fal's share of them)
    per_second: list[tuple[int, int, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def met(self) -> bool:
        return self.recovery_s is not None and self.recovery_s <= self.target_s


@dataclass(frozen=True, slots=True)
class _Sample:
    started: float  # monotonic
    provider: str  # "" when the request failed


class _Load:
    """`concurrency` threads sending one request after another until stopped."""

    def __init__(self, stack: Stack, concurrency: int):
        live = [r for r in stack.replicas if r.proc is not None and r.proc.poll() is None]
        balancer = stack.balancer()
        balancer.ports = [r.port for r in live]
        self.http = httpx.Client(transport=balancer, timeout=60)
        self.client = OpenAI(
            base_url=f"{live[0].url}/v1", api_key=CLIENT_KEY, http_client=self.http, max_retries=0
        )
        self.samples: list[_Sample] = []
        self.errors: Counter[str] = Counter()
        self._rng = random.Random(f"recovery-{uuid.uuid4()}")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)
        ]

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)
        self.http.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                image = unique_png(self._rng)  # never a cache hit
            started = time.monotonic()
            provider = ""
            try:
                raw = self.client.images.with_raw_response.edit(
                    model=MODEL,
                    image=("in.png", image, "image/png"),
                    prompt="x",
                    extra_body={"response_format": "b64_json"},
                )
                body = raw.parse()
                if not body.data or not body.data[0].b64_json:
                    raise RuntimeError("no image in the response")
                provider = raw.headers.get("x-upscale-provider", "?")
            except openai.APIStatusError as exc:
                code = exc.body.get("code") if isinstance(exc.body, dict) else ""
                with self._lock:
                    self.errors[f"{exc.status_code} {code}"] += 1
            except Exception as exc:  # connection errors, unreadable answers
                with self._lock:
                    self.errors[type(exc).__name__] += 1
            with self._lock:
                self.samples.append(_Sample(started, provider))

    def snapshot(self) -> list[_Sample]:
        with self._lock:
            return list(self.samples)


class _BreakerWatch:
    """Samples fal's breaker record in Redis every 50 ms."""

    def __init__(self, stack: Stack, prefix: str):
        self._redis = redis.Redis.from_url(stack.redis.url, decode_responses=True)
        self._key = f"{prefix}:{{fal}}:rec"
        self.opened = 0
        self.max_opened_count = 0
        self.max_backoff_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _BreakerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._redis.close()

    def _run(self) -> None:
        was_open = False
        while not self._stop.wait(0.05):
            try:
                rec: dict[str, Any] = self._redis.hgetall(self._key)  # type: ignore[assignment]
            except redis.RedisError:
                continue
            is_open = rec.get("state") == "open"
            self.opened += is_open and not was_open
            was_open = is_open
            self.max_opened_count = max(self.max_opened_count, int(rec.get("opened") or 0))
            if is_open and rec.get("changed_at"):
                backoff = float(rec.get("open_until") or 0) - float(rec["changed_at"])
                self.max_backoff_s = max(self.max_backoff_s, backoff)


def _share(samples: list[_Sample], start: float, end: float) -> tuple[int, float]:
    ok = [s for s in samples if start <= s.started < end and s.provider]
    return len(ok), (sum(s.provider == "fal" for s in ok) / len(ok) if ok else 0.0)


def _recovered_at(samples: list[_Sample], recovered: float, until: float) -> float | None:
    """Seconds after `recovered` to the first window in which fal had its share back."""
    offset = 0.0
    while recovered + offset + WINDOW_S <= until:
        count, share = _share(samples, recovered + offset, recovered + offset + WINDOW_S)
        if count >= MIN_SAMPLES and share >= SHARE:
            return round(offset, 1)
        offset += STEP_S
    return None


def measure_recovery(stack: Stack, concurrency: int = 32, fail_s: float = 3.0) -> RecoveryResult:
    config = yaml.safe_load((stack.workdir / "gateway.yaml").read_text())
    open_base_s = float(config["routing"]["breaker"]["open_base_s"])
    prefix = config["routing"].get("redis_prefix", "upscale")
    stack.replace_dead()
    stack.reset_breakers()
    stack.fal.faults(**BASE)
    stack.replicate.faults(**BASE)
    with _Load(stack, concurrency) as warm:
        time.sleep(WARMUP_S)
    _, share_before = _share(warm.snapshot(), 0.0, time.monotonic())
    # The blip meets an empty window, as after a quiet spell: behind a window full of
    # successes a 3 s blip never reaches the trip's error share and the breaker stays shut.
    stack.reset_breakers()
    with _BreakerWatch(stack, prefix) as watch:
        stack.fal.faults(**BASE, error_rate=1.0, error_status=503)
        with _Load(stack, concurrency) as load:
            failed = time.monotonic()
            time.sleep(fail_s)
            stack.fal.faults(**BASE)
            recovered = time.monotonic()  # the emulator has applied it when its PUT returns
            while time.monotonic() < recovered + OBSERVE_S:
                time.sleep(0.5)
                # Requests started in the last window may still be running: judge to now - 2 s.
                back = _recovered_at(load.snapshot(), recovered, time.monotonic() - 2.0)
                if back is not None and time.monotonic() > recovered + back + WINDOW_S + AFTER_S:
                    break
    ended = time.monotonic()
    samples = load.samples
    per_second = []
    for second in range(-round(recovered - failed), int(ended - recovered) - 1):
        count, share = _share(samples, recovered + second, recovered + second + 1)
        per_second.append((second, count, round(share, 3)))
    return RecoveryResult(
        concurrency=concurrency,
        fail_s=fail_s,
        open_base_s=open_base_s,
        target_s=open_base_s + 2,
        recovery_s=_recovered_at(samples, recovered, ended - 1.0),
        share_before=round(share_before, 3),
        requests=len(samples) + len(warm.samples),
        ok=sum(1 for s in samples + warm.samples if s.provider),
        opened=watch.opened,
        max_opened_count=watch.max_opened_count,
        max_backoff_s=round(watch.max_backoff_s, 3),
        per_second=per_second,
        errors=load.errors,
    )
