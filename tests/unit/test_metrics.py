"""gateway.metrics: the multiprocess directory, and what one scrape shows of several workers.

Several workers are simulated in one process the way prometheus_client's own tests do it: its
file-backed value class, built for a chosen pid, stands in for the in-memory one while one
worker's Metrics is built."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    Metrics,
    MetricsDirError,
    ViewGauge,
    bury,
    prepare_multiprocess_dir,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def scraped(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_derived_directory_is_fresh_private_and_temporary() -> None:
    path, derived = prepare_multiprocess_dir(None)
    try:
        assert derived
        assert path.parent == Path(tempfile.gettempdir())
        assert mode(path) == 0o700 and not any(path.iterdir())
        again, _ = prepare_multiprocess_dir(None)
        assert again != path  # two gateways on one host never share one
        again.rmdir()
    finally:
        shutil.rmtree(path)


def test_named_directory_is_created_private(tmp_path: Path) -> None:
    path, derived = prepare_multiprocess_dir(str(tmp_path / "a" / "metrics"))
    assert not derived  # the operator's: left in place at exit
    assert path == tmp_path / "a" / "metrics" and mode(path) == 0o700


def test_named_directory_loses_an_earlier_runs_files_only(tmp_path: Path) -> None:
    named = tmp_path / "metrics"
    named.mkdir(mode=0o700)
    for name in ("counter_41.db", "gauge_livemax_41.db", "histogram_41.db", "README"):
        (named / name).write_bytes(b"x")
    path, _ = prepare_multiprocess_dir(str(named))
    assert sorted(p.name for p in path.iterdir()) == ["README"]


@pytest.mark.parametrize("bits", [0o750, 0o705, 0o1777])
def test_named_directory_others_can_reach_is_refused(tmp_path: Path, bits: int) -> None:
    named = tmp_path / "shared"
    named.mkdir()
    named.chmod(bits)
    (named / "counter_7.db").write_bytes(b"x")
    with pytest.raises(MetricsDirError, match="not private"):
        prepare_multiprocess_dir(str(named))
    assert (named / "counter_7.db").exists()  # nothing wiped in a directory it refused


def test_named_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(MetricsDirError):
        prepare_multiprocess_dir(str(tmp_path / "file"))


def test_a_directory_without_file_backed_values_is_refused(tmp_path: Path) -> None:
    # prometheus_client was imported without PROMETHEUS_MULTIPROC_DIR here (in-memory values)
    with pytest.raises(RuntimeError, match="after prometheus_client was imported"):
        Metrics(str(tmp_path))


def test_view_gauge_renders_what_was_set_and_checks_labels() -> None:
    gauge = ViewGauge("g", "help", ["provider"])
    gauge.labels("fal").set(2)
    gauge.labels("fal").set(1)
    gauge.labels("replicate").set(0)
    (family,) = gauge.collect()
    assert [(s.labels, s.value) for s in family.samples] == [
        ({"provider": "fal"}, 1.0),
        ({"provider": "replicate"}, 0.0),
    ]
    with pytest.raises(ValueError):
        gauge.labels("fal", "extra")


def test_one_process_renders_its_own_registry() -> None:
    metrics = Metrics()
    metrics.requests.labels("200").inc()
    metrics.breaker.labels("fal").set(2)
    seen = scraped(metrics.render())
    assert seen[("upscale_requests_total", (("status", "200"),))] == 1
    assert seen[("upscale_breaker_state", (("provider", "fal"),))] == 2
    assert seen[("upscale_state_store_degraded", ())] == 0


class Workers:
    """Workers' Metrics on one directory. prometheus_client makes a labelled child's value
    when `labels()` is first called, with the value class of that moment: `at(pid)` makes
    that pid's class current before handing out the pid's Metrics."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        self._monkeypatch = monkeypatch
        self._classes: dict[int, object] = {}
        self._metrics: dict[int, Metrics] = {}

    def at(self, pid: int) -> Metrics:
        if pid not in self._classes:
            self._classes[pid] = values.MultiProcessValue(lambda: pid)
        self._monkeypatch.setattr(values, "ValueClass", self._classes[pid])
        if pid not in self._metrics:
            self._metrics[pid] = Metrics(str(self.path))
        return self._metrics[pid]


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workers:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return Workers(tmp_path, monkeypatch)


def test_one_scrape_sums_every_worker(workers: Workers) -> None:
    workers.at(101).attempts.labels("fal", "ok").inc()
    workers.at(102).attempts.labels("fal", "ok").inc(2)
    workers.at(101).latency.labels("fal").observe(0.04)
    workers.at(102).latency.labels("fal").observe(5.0)
    workers.at(101).spend.labels("fal").inc(0.004)
    workers.at(102).spend.labels("fal").inc(0.004)
    workers.at(102).store_degraded.set(1)
    assert sorted(os.listdir(workers.path)) == [
        f"{kind}_{pid}.db"
        for kind in ("counter", "gauge_livemax", "gauge_livesum", "histogram")
        for pid in (101, 102)
    ]
    seen = scraped(workers.at(101).render())
    assert seen == scraped(workers.at(102).render())  # any worker answers the same
    ok = ("upscale_provider_requests_total", (("outcome", "ok"), ("provider", "fal")))
    assert seen[ok] == 3
    fal = (("provider", "fal"),)
    assert seen[("upscale_provider_latency_seconds_count", fal)] == 2
    assert seen[("upscale_provider_latency_seconds_bucket", (("le", "0.05"), *fal))] == 1
    assert seen[("upscale_spend_usd_total", fal)] == pytest.approx(0.008)
    # One series, as with one process: 1 while any live worker has lost the store.
    assert [k for k in seen if k[0] == "upscale_state_store_degraded"] == [
        ("upscale_state_store_degraded", ())
    ]
    assert seen[("upscale_state_store_degraded", ())] == 1


def test_a_dead_worker_keeps_its_counts_and_loses_its_gauges(workers: Workers) -> None:
    workers.at(101).requests.labels("200").inc(5)
    workers.at(102).requests.labels("200").inc(2)
    workers.at(102).store_degraded.set(1)
    bury([102], workers.path)
    seen = scraped(workers.at(101).render())
    assert seen[("upscale_requests_total", (("status", "200"),))] == 7
    assert seen[("upscale_state_store_degraded", ())] == 0
    assert sorted(os.listdir(workers.path)) == [
        "counter_101.db",
        "counter_102.db",
        "gauge_livemax_101.db",
        "gauge_livesum_101.db",
        "histogram_101.db",  # event-loop lag: cumulative, kept as the counters are
        "histogram_102.db",
    ]


def test_breakers_are_the_answering_workers_view_not_a_merge(workers: Workers) -> None:
    workers.at(101).breaker.labels("fal").set(2)  # a stale view, from its last request
    workers.at(102).breaker.labels("fal").set(0)  # read from the store just now
    fal = ("upscale_breaker_state", (("provider", "fal"),))
    assert scraped(workers.at(102).render())[fal] == 0
    assert scraped(workers.at(101).render())[fal] == 2
    assert not any(name.startswith("gauge_all") for name in os.listdir(workers.path))
