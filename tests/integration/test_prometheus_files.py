"""deploy/prometheus.yml and deploy/alerts.yml, checked by Debian's promtool: the config and
the rules pass `promtool check`, the rules pass their unit tests (deploy/alerts.test.yml)
and fire each alert, and every metric an alert reads is one gateway/metrics.py makes."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.metrics import Metrics
from tests.integration.servers import ROOT

DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# Series Prometheus makes itself, not the gateway.
BUILTIN_SERIES = {"up"}
# Named by a rule before gateway/metrics.py has them: name -> who adds it. Remove an entry
# once the collector exists (the test warns until then).
PENDING_METRICS: dict[str, str] = {}
_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is not installed: Debian's `prometheus` package (.ci/run)")
    return subprocess.run(
        [PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )


# ---------------------------------------------------------------- Prometheus


def test_promtool_checks_the_prometheus_config(tmp_path: Path) -> None:
    # Checked as compose mounts it, but for two paths that exist only in the container: the
    # scrape key's file (written at start) and the rules beside the config.
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    key = tmp_path / "metrics_key"
    key.write_text("test-metrics-key")
    for scrape in config["scrape_configs"]:
        if "authorization" in scrape:
            scrape["authorization"]["credentials_file"] = str(key)
    config["rule_files"] = [str(DEPLOY / path) for path in config["rule_files"]]
    rendered = tmp_path / "prometheus.yml"
    rendered.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", "deploy/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "deploy/alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (enough of PromQL for alerts.yml)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # matchers and ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = re.findall(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {w for w in words if w not in _PROMQL_KEYWORDS}


def test_series_names_reads_promql() -> None:
    expr = 'sum by (provider) (rate(a_total{x="b_c"}[5m])) / on(z) b > 0.25 and bool c'
    assert series_names(expr) == {"a_total", "b", "c"}


def exported_names() -> set[str]:
    """Every series name gateway/metrics.py exports (a counter as `_total`, a histogram as
    `_bucket`, `_sum`, `_count`)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_every_metric_an_alert_reads_exists() -> None:
    exported = exported_names()
    for rule in alert_rules():
        for name in series_names(rule["expr"]) - exported - BUILTIN_SERIES:
            assert name in PENDING_METRICS, f"{rule['alert']}: gateway/metrics.py has no {name}"
            warnings.warn(
                f"{rule['alert']} reads {name}, not yet in gateway/metrics.py "
                f"({PENDING_METRICS[name]})",
                stacklevel=1,
            )


def test_every_alert_is_unit_tested_firing() -> None:
    tests = yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in alert_rules()} <= fired
