"""Headless Chromium for the browser tests: Debian's `chromium` driven by Playwright (never a
downloaded browser), with its own background traffic turned off, so every request it makes
is one a page made."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.integration.servers import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Schemes that name no host: inline images and blank pages (a blob: URL names its origin).
LOCAL_SCHEMES = ("data", "about")


@contextmanager
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is not installed (.ci/run installs Debian's chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, timeout=20_000)
        try:
            yield browser
        finally:
            browser.close()


def is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return True
    if parts.scheme == "blob":  # blob:http://127.0.0.1:8080/<uuid>
        return is_loopback(parts.path)
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def artifact(name: str) -> Path:
    """Where a test keeps a file for people to look at: $TEST_ARTIFACTS, or
    var/test-artifacts in the repository."""
    directory = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / "var" / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.unlink(missing_ok=True)
    return path
