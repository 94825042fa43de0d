"""The status page in headless Chromium (Debian's `chromium`): it renders the live figures
of the gateway it is served by, behind the admin key. The screenshot is kept as an artifact
(STATUS_SCREENSHOT_DIR, default var/artifacts)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import make_image
from tests.integration.conftest import Emulator, start_gateway, write_config
from tests.integration.servers import GatewayProcess

ADMIN = "admin-status-5e0b"
ARTIFACTS = Path(os.environ.get("STATUS_SCREENSHOT_DIR", "var/artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def watched(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("status")
    config = write_config(workdir / "g.yaml", cache={"enabled": True})
    process = start_gateway(
        workdir, fal_emulator, replicate_emulator, config, GATEWAY_ADMIN_KEY=ADMIN
    )
    yield process
    process.stop()


def chromium(*args: str) -> str:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    return done.stdout


def tile(dom: str, ident: str) -> str:
    match = re.search(rf'id="{ident}">([^<]*)<', dom)
    assert match, dom[:2000]
    return match[1]


def test_status_page_renders_live_figures_in_chromium(
    watched: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, _ = emulators
    client = OpenAI(base_url=f"{watched.url}/v1", api_key="any", max_retries=0, timeout=60)
    image = make_image(48, 40)
    for _ in range(3):  # one miss, then two hits
        client.images.edit(model="recraft-crisp-upscale", image=("a.png", image), prompt="x")
    fal.faults(error_rate=1, error_status=500)  # one failover to replicate
    client.images.edit(
        model="recraft-crisp-upscale", image=("b.png", make_image(50, 40)), prompt="x"
    )
    assert httpx.get(f"{watched.url}/status").status_code == 401
    assert httpx.get(f"{watched.url}/status", auth=("ops", "wrong")).status_code == 401

    page = watched.url.replace("http://", f"http://ops:{ADMIN}@") + "/status"
    dom = chromium("--dump-dom", page)
    assert tile(dom, "requests") == "4"
    assert tile(dom, "failovers") == "1"
    assert tile(dom, "errors") == "0"
    assert tile(dom, "spend") == "$0.0100"  # fal 0.004 + replicate 0.006
    assert tile(dom, "cache-hit-rate") == "50.0 %"  # 2 hits of 4 lookups
    fal_row = re.search(r'<tr data-provider="fal">(.*?)</tr>', dom, re.S)
    assert fal_row and "500" in fal_row[1], dom[:3000]  # its last error
    assert 'data-provider="replicate"' in dom

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = (ARTIFACTS / "status-page.png").resolve()
    shot.unlink(missing_ok=True)
    chromium("--window-size=1280,720", f"--screenshot={shot}", page)
    assert shot.stat().st_size > 10_000 and shot.read_bytes().startswith(b"\x89PNG")
    print(f"status page screenshot: {shot}")
