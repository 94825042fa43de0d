"""Prometheus collectors, in one place, on a registry of the app's own (no module globals).

One process (GATEWAY_WORKERS=1): values live in the process and a scrape renders them.

Several workers: the supervisor prepares a private directory and names it in
PROMETHEUS_MULTIPROC_DIR before any worker starts, so that prometheus_client (which reads that
variable once, when it is imported) keeps every value in a memory-mapped file per worker pid;
the worker that answers a scrape merges all the files. Per kind of metric:
- counters and histograms: summed over every file, a dead worker's too (its files stay), so a
  total never drops when a worker dies and is replaced;
- per-worker gauges: a `live*` mode, whose files the supervisor removes when the worker exits
  (`bury`), so a dead worker's value never lingers;
- gauges of shared state (the breakers, read from the store every worker shares): not in
  files at all. Any worker's fresh view is the whole truth, and merging views of different
  ages would mix stale ones in; the answering worker renders its own, refreshed for the scrape.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gateway.state.base import LATENCY_BOUNDS

BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_DERIVED_PREFIX = "upscale-gateway-metrics-"


class MetricsDirError(Exception):
    """PROMETHEUS_MULTIPROC_DIR names a place the gateway must not keep its metrics in."""


def multiprocess_dir() -> str | None:
    """Where this process's values live, when they live in files (see the module doc)."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir(configured: str | None) -> tuple[Path, bool]:
    """The supervisor's, before any worker starts: an empty directory that only this user
    can read or write, as (path, derived). `configured` is the operator's
    PROMETHEUS_MULTIPROC_DIR, created if missing; without one, a fresh directory under the
    temporary directory (/tmp, a tmpfs in the container), which the caller removes at exit.

    Private, because whoever can write there adds samples to every scrape, and the files name
    clients' spend. Wiped, because counter files left by an earlier run would be summed into
    this one's totals."""
    if not configured:
        return Path(tempfile.mkdtemp(prefix=_DERIVED_PREFIX)), True  # mode 0700, empty
    path = Path(configured)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise MetricsDirError(f"{MULTIPROC_ENV}={configured}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise MetricsDirError(f"{MULTIPROC_ENV}={configured} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        # Refused, not chmod-ed: the directory may be shared on purpose (a world-writable /tmp).
        raise MetricsDirError(
            f"{MULTIPROC_ENV}={configured} is not private: it must belong to the gateway's "
            f"user with mode 0700 (it has {stat.filemode(info.st_mode)}), or not exist yet "
            "(the gateway then creates it so)"
        )
    # Only what prometheus_client writes (and its collector reads): anything else an operator
    # keeps there stays.
    for stale in path.glob("*.db"):
        if not stale.is_dir():
            stale.unlink(missing_ok=True)
    return path, False


def bury(pids: Iterable[int], path: str | Path) -> None:
    """Workers that exited: their live gauges leave the scrape; their counters stay in it."""
    for pid in pids:
        mark_process_dead(pid, str(path))


class _ViewChild:
    __slots__ = ("_key", "_values")

    def __init__(self, values: dict[tuple[str, ...], float], key: tuple[str, ...]) -> None:
        self._values = values
        self._key = key

    def set(self, value: float) -> None:
        self._values[self._key] = float(value)


class ViewGauge:
    """A gauge of this process's view of shared state, held in memory only, in both modes
    (prometheus_client's own Gauge would go to the files with several workers). It offers
    the `labels(...).set(v)` the routing code calls on a Gauge."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def labels(self, *values: str) -> _ViewChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        return _ViewChild(self._values, tuple(str(v) for v in values))

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, value in sorted(self._values.items()):
            family.add_metric(list(key), value)
        yield family


class Metrics:
    """`multiprocess_dir`: where the workers' files are (`multiprocess_dir()` in a worker);
    None renders this process's own values."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        if multiprocess_dir and _values.ValueClass is getattr(_values, "MutexValue", None):
            # prometheus_client chose in-memory values when it was imported: nothing would
            # reach the files, and every worker's scrape would show zeros for the others.
            raise RuntimeError(f"{MULTIPROC_ENV} was set after prometheus_client was imported")
        self._multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "upscale_provider_requests",
            "Provider attempts by outcome (ok, error class, cancelled).",
            ["provider", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "upscale_provider_latency_seconds",
            "Provider time of successful attempts.",
            ["provider"],
            buckets=LATENCY_BOUNDS[:-1],
            registry=r,
        )
        self.failovers = Counter(
            "upscale_failovers",
            "Requests moved on to another provider after a failure.",
            ["from_provider"],
            registry=r,
        )
        self.hedges = Counter(
            "upscale_hedges",
            "Hedged attempts: started, won, lost, or denied by the budget.",
            ["outcome"],
            registry=r,
        )
        self.breaker = ViewGauge(
            "upscale_breaker_state",
            "Circuit per provider: 0 closed, 1 half-open, 2 open.",
            ["provider"],
        )
        r.register(self.breaker)
        self.spend = Counter(
            "upscale_spend_usd",
            "Spend in USD by provider (hedge losers included).",
            ["provider"],
            registry=r,
        )
        self.requests = Counter(
            "upscale_requests", "Upscale requests by HTTP status.", ["status"], registry=r
        )
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How late a probe task woke on the event loop (10 ms period): a stall of the loop.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        # Each worker has its own connection to the store: 1 when any live worker has lost
        # it (livemax), so one series, as with one process, and none from a dead worker.
        self.store_degraded = Gauge(
            "upscale_state_store_degraded",
            "1 while the shared state store is unreachable.",
            registry=r,
            multiprocess_mode="livemax",
        )
        # The same for the results store (a bucket, or the local directory): results, cache
        # hits and replays that need it are refused with a retryable 503 meanwhile.
        self.results_store_degraded = Gauge(
            "upscale_results_store_degraded",
            "1 while the results store (bucket or directory) is unreachable.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.batches = Counter(
            "upscale_batches", "Batches ended, by final status.", ["status"], registry=r
        )
        self.batch_lines = Counter(
            "upscale_batch_lines", "Batch lines answered, by outcome.", ["outcome"], registry=r
        )
        self.batch_lines_reclaimed = Counter(
            "upscale_batch_lines_reclaimed",
            "Batch lines taken over from a worker that stopped (it died).",
            registry=r,
        )
        self.batch_spend_usd = Counter(
            "upscale_batch_spend_usd", "What batch lines billed, in USD.", registry=r
        )
        self.batch_lines_running = Gauge(
            "upscale_batch_lines_running",
            "Batch lines this replica runs now.",
            registry=r,
            multiprocess_mode="livesum",
        )

    @property
    def multiprocess(self) -> bool:
        return self._multiprocess_dir is not None

    def render(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        # A registry per scrape, as prometheus_client's multiprocess guide has it: the
        # collector reads the files afresh on each collect.
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self._multiprocess_dir)
        merged.register(self.breaker)
        return generate_latest(merged)
