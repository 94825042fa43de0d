"""A first run, as a user makes it: `python -m gateway --sandbox --port N`, then what the log
says to do next, then GET / in a browser. The log names the gateway's own address once (not
the in-process emulators'), its curl line works as printed, the landing page links the docs
and fetches nothing from elsewhere, and sandbox spend is marked simulated everywhere."""

from __future__ import annotations

import contextlib
import html
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from tests.conftest import make_image
from tests.integration.conftest import Emulator
from tests.integration.servers import DEFAULT_ADMIN_KEY, GatewayProcess

MODEL = "recraft-crisp-upscale"
SIMULATED = "simulated (sandbox: nothing is billed)"
LINKS = {"/docs", "/redoc", "/openapi.json", "/status", "/playground", "/v1/models"}
CLIENT_KEY = "first-run-key-3d9a1c"
_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}:\d+")


def sandbox_process(workdir: Path, **env: str) -> GatewayProcess:
    """Started as a user would: the CLI flags, no admin or signing key unless given."""
    process = GatewayProcess({"GATEWAY_ADMIN_KEY": "", "GATEWAY_SIGNING_KEY": "", **env}, workdir)
    process.args = ("--sandbox", "--port", str(process.port))
    return process


def wait_for_log(process: GatewayProcess, text: str, count: int = 1, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = process.log_path.read_text(errors="replace")
        if log.count(text) >= count:
            return log
        assert time.monotonic() < deadline, f"{text!r} x{count} never logged:\n{log}"
        time.sleep(0.1)


def next_step(log: str) -> str:
    """The printed curl line (as a shell would run it, comment and all)."""
    lines = [line.split("try it: ", 1)[1] for line in log.splitlines() if "try it: " in line]
    assert len(lines) == 1, log
    assert lines[0].startswith("curl "), lines[0]
    return lines[0]


def as_httpx(command: str, key: str | None = None) -> httpx.Response:
    """The curl line's request, made with httpx: its URL, -F fields (@ = a file of the
    working directory) and -H headers ($KEY expanded as a shell would)."""
    words = shlex.split(command, comments=True)
    assert words[:2] == ["curl", "-s"], words
    url, rest = words[2], words[3:]
    data: dict[str, str] = {}
    files: dict[str, tuple[str, bytes, str]] = {}
    headers: dict[str, str] = {}
    for flag, value in zip(rest[::2], rest[1::2], strict=True):
        if flag == "-F":
            name, _, field = value.partition("=")
            if field.startswith("@"):
                files[name] = (field[1:], make_image(64, 48), "image/png")
            else:
                data[name] = field
        elif flag == "-H":
            name, _, header = value.partition(": ")
            headers[name] = header.replace("$KEY", key or "").strip()  # as curl sends it
        else:
            raise AssertionError(f"unexpected curl flag {flag}")
    return httpx.post(url, data=data, files=files, headers=headers, timeout=60)


def upscaled_size(answer: dict[str, Any]) -> tuple[int, int]:
    fetched = httpx.get(answer["data"][0]["url"], timeout=10)
    assert fetched.status_code == 200, fetched.text
    return Image.open(io.BytesIO(fetched.content)).size


def emulator_urls(process: GatewayProcess) -> list[str]:
    """The emulators' addresses: the process's own listening sockets other than the gateway's
    (/readyz shows them to the admin key only, and this gateway has none)."""
    assert process.proc is not None
    pid = process.proc.pid
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    ports.discard(process.port)
    assert len(ports) == 2, ports
    return [f"http://127.0.0.1:{port}" for port in sorted(ports)]


def assert_names_only_the_gateway(log: str, process: GatewayProcess, shown: str) -> None:
    """`shown` (the announced URL) once as an address and once in the curl line; no other
    address in the whole log, and no emulator's."""
    listening = [line for line in log.splitlines() if "upscale-gateway listening on" in line]
    assert len(listening) == 1, log
    assert f"listening on {shown}" in listening[0], listening
    assert len(re.findall(re.escape(shown) + r"(?![\d/])", log)) == 1, log
    assert log.count(f"{shown}/v1/images/edits") == 1, log
    assert "Uvicorn running on" not in log and "emulated at" not in log, log
    assert set(_ADDRESS.findall(log)) <= {f"127.0.0.1:{process.port}"}, log


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = sandbox_process(tmp_path_factory.mktemp("first-run")).start()
    try:
        wait_for_log(process, "try it: ")
        yield process
    finally:
        process.stop()


def test_the_log_names_the_gateway_once_and_one_next_step(first_run: GatewayProcess) -> None:
    log = first_run.log_path.read_text()
    assert_names_only_the_gateway(log, first_run, first_run.url)
    for url in emulator_urls(first_run):
        assert url.split("//")[1] not in log, (url, log)
    assert log.count("SANDBOX MODE") == 1, log
    assert "(docs: /docs, playground: /playground)" in log
    command = next_step(log)
    assert "-H" not in command  # no client keys: nothing to send
    assert f"-F model={MODEL}" in command and "-F image=@source.png" in command


def test_the_printed_curl_line_upscales(first_run: GatewayProcess, tmp_path: Path) -> None:
    command = next_step(first_run.log_path.read_text())
    answer = as_httpx(command)
    assert answer.status_code == 200, answer.text
    assert upscaled_size(answer.json()) == (128, 96)  # scale_factor=2 of 64x48

    if shutil.which("curl"):  # and the line itself, in a shell, as a user pastes it
        (tmp_path / "source.png").write_bytes(make_image(50, 40))
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert upscaled_size(httpx.Response(200, text=done.stdout).json()) == (100, 80)


def test_the_landing_page_links_everything_and_fetches_nothing_elsewhere(
    first_run: GatewayProcess, tmp_path: Path
) -> None:
    answer = httpx.get(f"{first_run.url}/", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    page = answer.text
    hrefs = set(re.findall(r'href="([^"]*)"', page))
    assert hrefs == LINKS, hrefs
    for href in sorted(hrefs):  # open to a first-run user (development, no admin key)
        assert httpx.get(f"{first_run.url}{href}", timeout=10).status_code == 200, href
    # Nothing is loaded: no script, stylesheet, image or frame; the only URLs are its own.
    assert not re.search(r"<(script|link|img|iframe)\b|\bsrc=|@import|url\(", page), page
    for url in re.findall(r"https?://[^\s\"'<&]+", html.unescape(page)):
        assert url.startswith(first_run.url), url
    assert "sandbox: emulated providers, nothing is billed" in page
    assert f'<code id="model">{MODEL}</code>' in page
    for name in ("fal", "replicate"):
        row = re.search(rf'<tr data-provider="{name}">(.*?)</tr>', page)
        assert row and "enabled, emulated" in row[1], page
    assert "127.0.0.1:" + emulator_urls(first_run)[0].rsplit(":", 1)[1] not in page

    # Its examples are the log's next step and a script that runs as shown.
    curl = re.search(r'<pre id="curl">(.*?)</pre>', page, re.S)
    assert curl and html.unescape(curl[1]) == next_step(first_run.log()).split("   #")[0]
    python = re.search(r'<pre id="python">(.*?)</pre>', page, re.S)
    assert python, page
    (tmp_path / "example.py").write_text(html.unescape(python[1]))
    (tmp_path / "source.png").write_bytes(make_image(48, 40))
    run = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert upscaled_size({"data": [{"url": run.stdout.strip()}]}) == (96, 80)


def test_sandbox_spend_is_simulated(first_run: GatewayProcess) -> None:
    client = OpenAI(base_url=f"{first_run.url}/v1", api_key="any", max_retries=0, timeout=60)
    client.images.edit(model=MODEL, image=("a.png", make_image(40, 40)), prompt="x")

    figures = httpx.get(f"{first_run.url}/status.json", timeout=10).json()
    assert figures["simulated"] is True and figures["sandbox"] is True
    assert figures["spend_today"]["simulated"] is True
    assert figures["spend_today"]["spend_usd"] > 0
    page = httpx.get(f"{first_run.url}/status", timeout=10).text
    assert f'<div class="note" id="spend-simulated">{SIMULATED}</div>' in page
    assert re.search(r'id="spend">\$0\.0\d+<', page), page  # the figure itself stays bare

    usage = httpx.get(f"{first_run.url}/v1/usage", timeout=10).json()
    assert usage["simulated"] is True and usage["today"]["spend_usd"] > 0


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Sandbox with client keys, an admin key and a public URL (another name of the same
    loopback address, so its printed line can be run)."""
    process = sandbox_process(
        tmp_path_factory.mktemp("configured"),
        GATEWAY_API_KEYS=CLIENT_KEY,
        GATEWAY_ADMIN_KEY=DEFAULT_ADMIN_KEY,
    )
    process.env["GATEWAY_PUBLIC_URL"] = f"http://localhost:{process.port}/"
    process.start()
    try:
        wait_for_log(process, "try it: ")
        yield process
    finally:
        process.stop()


def test_with_keys_and_a_public_url_the_next_step_says_so(
    configured: GatewayProcess, tmp_path: Path
) -> None:
    public = f"http://localhost:{configured.port}"
    log = configured.log_path.read_text()
    assert_names_only_the_gateway(log, configured, public)
    assert f"listening on {public}, bound to 127.0.0.1:{configured.port}," in log
    command = next_step(log)
    assert command.startswith(f"curl -s {public}/v1/images/edits ")
    assert '-H "Authorization: Bearer $KEY"' in command and "KEY: a client key" in command
    assert as_httpx(command, key=None).status_code == 401  # the hint is needed
    answer = as_httpx(command, key=CLIENT_KEY)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"][0]["url"].startswith(f"{public}/v1/files/")

    page = httpx.get(f"{configured.url}/", timeout=10).text
    example = html.unescape(page)
    assert f'base_url="{public}/v1",\n    api_key=os.environ["KEY"],' in example
    assert "Client keys are configured" in page


def test_admin_spend_is_simulated_in_sandbox(configured: GatewayProcess) -> None:
    admin = {"Authorization": f"Bearer {DEFAULT_ADMIN_KEY}"}
    spend = httpx.get(f"{configured.url}/admin/spend", headers=admin, timeout=10)
    assert spend.status_code == 200 and spend.json()["simulated"] is True
    usage = httpx.get(
        f"{configured.url}/v1/usage", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert usage.status_code == 200 and usage.json()["simulated"] is True
    figures = httpx.get(f"{configured.url}/status.json", headers=admin, timeout=10).json()
    assert figures["simulated"] is True and figures["spend_today"]["simulated"] is True


def test_live_spend_is_not_simulated(
    gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    """The shared live gateway (real credentials against the emulators' URLs): nothing is
    marked simulated, and the landing page says live."""
    admin = {"Authorization": f"Bearer {gateway.admin_key}"}
    figures = httpx.get(f"{gateway.url}/status.json", headers=admin, timeout=10).json()
    assert figures["simulated"] is False and figures["spend_today"]["simulated"] is False
    assert SIMULATED not in httpx.get(f"{gateway.url}/status", headers=admin, timeout=10).text
    assert httpx.get(f"{gateway.url}/v1/usage", timeout=10).json()["simulated"] is False
    spend = httpx.get(f"{gateway.url}/admin/spend", headers=admin, timeout=10).json()
    assert spend["simulated"] is False
    page = httpx.get(f"{gateway.url}/", timeout=10).text
    assert 'class="mode live"' in page and "emulated" not in page
    log = wait_for_log(gateway, "try it: ")
    assert log.count("upscale-gateway listening on") == 1 and "SANDBOX" not in log


def test_workers_announce_the_address_once(tmp_path: Path) -> None:
    process = GatewayProcess(
        {"GATEWAY_WORKERS": "2", "GATEWAY_SANDBOX": "true", "GATEWAY_SIGNING_KEY": ""},
        tmp_path,
    ).start()
    try:
        # Both workers are up (each logs this once it started), and the parent announced.
        wait_for_log(process, f"serving {MODEL} through", count=2)
        log = wait_for_log(process, "try it: ")
        assert_names_only_the_gateway(log, process, process.url)
        assert f"listening on {process.url} with 2 workers" in log
        assert as_httpx(next_step(log)).status_code == 200
    finally:
        process.stop()
