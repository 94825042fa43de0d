"""`make reliability`'s connection-level suite: hostile clients against one gateway with
its default edge bounds (gateway/edge.py, `limits`), and for each attack the gateway's RSS
and open descriptors, `/healthz` latency probed from another process while it runs, and
what the providers billed for requests the gateway refused (must be nothing)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from reliability.stack import CLIENT_KEY, Stack
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"
# The descriptor limit the gateway runs with here, as on a default Linux box.
GATEWAY_FDS = 1024
PROBE = """
import json, sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
out, end = [], time.monotonic() + seconds
try:
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < end:
            start = time.perf_counter()
            try:
                ok = client.get(url).status_code == 200
            except httpx.HTTPError:
                ok = False
            out.append((time.perf_counter() - start) * 1000 if ok else -1)
            time.sleep(0.02)
except KeyboardInterrupt:
    pass
print(json.dumps(out))
"""


@dataclass
class AttackResult:
    name: str
    what: str
    rss_mib: tuple[float, float, float] = (0, 0, 0)  # before, peak, after
    fds: tuple[int, int, int] = (0, 0, 0)
    healthz_p99_ms: float = 0
    healthz_max_ms: float = 0
    healthz_failed: int = 0
    billed_usd: float = 0
    may_bill_usd: float = 0  # what served (not refused) requests may bill: one cached run
    outcome: dict[str, int] = field(default_factory=dict)

    @property
    def held(self) -> bool:
        return (
            self.healthz_p99_ms < 100
            and self.healthz_failed == 0
            and self.billed_usd <= self.may_bill_usd
            and self.rss_mib[2] < self.rss_mib[0] + 200
            # Redis's connection pool keeps what a burst of requests opened (at most one per
            # request in flight): bounded, and reused by the next burst.
            and self.fds[2] <= self.fds[0] + 64
        )


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _billed_usd(stack: Stack) -> float:
    total = 0
    for emulator in (stack.fal, stack.replicate):
        total += httpx.get(f"{emulator.url}/_emulator/jobs", timeout=10).json()["billed_micros"]
    return total / 1e6


def _connect(gateway: GatewayProcess, timeout: float = 30) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout)
    return sock


def _status(sock: socket.socket) -> str:
    """The status the gateway answered on this socket, or how it ended."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return "closed" if not data else "partial"
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except TimeoutError:
        return "open"
    finally:
        sock.close()
    return data.split(b" ", 2)[1].decode()


def _head(length: int, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer "
        + CLIENT_KEY.encode()
        + b"\r\n"
        + extra
        + b"content-length: "
        + str(length).encode()
        + b"\r\n\r\n"
    )


def run_attack(
    stack: Stack,
    name: str,
    what: str,
    attack: Callable[[GatewayProcess], dict[str, int]],
    may_bill_usd: float = 0,
) -> AttackResult:
    gateway = stack.replicas[0]
    pid = gateway.proc.pid  # type: ignore[union-attr]
    result = AttackResult(name, what, may_bill_usd=may_bill_usd)
    billed = _billed_usd(stack)
    rss0, fds0 = _rss_mib(pid), _fds(pid)
    peak_rss, peak_fds = rss0, fds0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_fds
        while not stop.is_set():
            peak_rss, peak_fds = max(peak_rss, _rss_mib(pid)), max(peak_fds, _fds(pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, f"{gateway.url}/healthz", "1000"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        result.outcome = attack(gateway)
    finally:
        probe.send_signal(2)  # SIGINT: it prints what it measured and exits
    out, _ = probe.communicate()
    time.sleep(5)  # what the attack left behind is freed
    stop.set()
    sampler.join()
    latencies = json.loads(out) if out.strip().startswith("[") else []
    ok = sorted(x for x in latencies if x >= 0)
    result.healthz_failed = sum(1 for x in latencies if x < 0)
    result.healthz_p99_ms = ok[int(len(ok) * 0.99) - 1] if ok else 0
    result.healthz_max_ms = ok[-1] if ok else 0
    result.rss_mib = (rss0, peak_rss, _rss_mib(pid))
    result.fds = (fds0, peak_fds, _fds(pid))
    result.billed_usd = round(_billed_usd(stack) - billed, 6)
    return result


def idle(count: int, hold_s: float) -> Callable[[GatewayProcess], dict[str, int]]:
    """Connections that open and send nothing."""

    def attack(gateway: GatewayProcess) -> dict[str, int]:
        socks = [_connect(gateway, hold_s) for _ in range(count)]
        return _tally(_status(s) for s in socks)

    return attack


def slowloris(count: int, hold_s: float) -> Callable[[GatewayProcess], dict[str, int]]:
    """Connections that trickle a header byte a second and never finish."""

    def attack(gateway: GatewayProcess) -> dict[str, int]:
        socks = [_connect(gateway, 2) for _ in range(count)]
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        end = time.monotonic() + hold_s
        while time.monotonic() < end:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")
            time.sleep(1)
        return _tally(_status(s) for s in socks)

    return attack


def flood(count: int) -> Callable[[GatewayProcess], dict[str, int]]:
    """More connections than the gateway has descriptors for."""

    def attack(gateway: GatewayProcess) -> dict[str, int]:
        socks = []
        for _ in range(count):
            try:
                socks.append(_connect(gateway, 15))
            except OSError:
                break
        time.sleep(3)
        return _tally(_status(s) for s in socks)

    return attack


def header_bombs(count: int, size: int) -> Callable[[GatewayProcess], dict[str, int]]:
    def one(gateway: GatewayProcess) -> str:
        sock = _connect(gateway)
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bomb: ")
            chunk = b"a" * 65536
            for _ in range(size // len(chunk)):
                sock.sendall(chunk)
        except OSError:
            pass  # refused mid-header: the point
        return _status(sock)

    def attack(gateway: GatewayProcess) -> dict[str, int]:
        return _tally(_threads(count, lambda: one(gateway)))

    return attack


def _big_request() -> bytes:
    noise = io.BytesIO()
    Image.effect_noise((512, 512), 64).convert("RGB").save(noise, "PNG")
    image = "data:image/png;base64," + base64.b64encode(noise.getvalue()).decode()
    return json.dumps(
        {"model": MODEL, "image": image, "scale_factor": 4, "response_format": "b64_json"}
    ).encode()


def slow_readers(count: int, hold_s: float) -> Callable[[GatewayProcess], dict[str, int]]:
    """The same cacheable multi-megabyte b64_json answer asked for by clients that never
    read it (a repeat of a cached request costs them nothing)."""
    body = _big_request()

    def attack(gateway: GatewayProcess) -> dict[str, int]:
        socks = []
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(hold_s)
            sock.connect(("127.0.0.1", gateway.port))
            sock.sendall(_head(len(body)) + body)
            socks.append(sock)
        time.sleep(hold_s)
        outcomes = []
        for sock in socks:  # what arrived: the answer's start, then the gateway cut it off
            data = b""
            try:
                sock.settimeout(2)
                while chunk := sock.recv(1 << 20):
                    data += chunk
            except (OSError, TimeoutError):
                pass
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            outcomes.append("cut off" if len(rest) < length else "delivered")
            sock.close()
        return _tally(outcomes)

    return attack


def slow_uploads(
    count: int, size: int, hold_s: float
) -> Callable[[GatewayProcess], dict[str, int]]:
    """Uploads declaring `size` bytes, sent at a kilobyte a second."""

    def attack(gateway: GatewayProcess) -> dict[str, int]:
        socks = []
        for _ in range(count):
            sock = _connect(gateway, 5)
            sock.sendall(_head(size) + b'{"image": "')
            socks.append(sock)
        end = time.monotonic() + hold_s
        while time.monotonic() < end:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b"A" * 1024)
            time.sleep(1)
        return _tally(_status(s) for s in socks)

    return attack


def aborted_uploads(count: int) -> Callable[[GatewayProcess], dict[str, int]]:
    def attack(gateway: GatewayProcess) -> dict[str, int]:
        for _ in range(count):
            sock = _connect(gateway)
            sock.sendall(_head(1_000_000) + b'{"image": "' + b"A" * 20_000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            sock.close()
        time.sleep(1)
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
        return {"5xx counted": sum(1 for line in metrics.splitlines() if '"500"' in line)}

    return attack


def oversized_outputs(count: int) -> Callable[[GatewayProcess], dict[str, int]]:
    """4096x4096 JPEGs at scale_factor 4: over max_output_pixels, refused."""
    big = io.BytesIO()
    Image.effect_noise((4096, 4096), 64).convert("RGB").save(big, "JPEG", quality=80)
    data = big.getvalue()

    def one(gateway: GatewayProcess) -> str:
        answer = httpx.post(
            f"{gateway.url}/v1/images/edits",
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            files={"image": ("big.jpg", data, "image/jpeg")},
            data={"model": MODEL, "scale_factor": "4"},
            timeout=120,
        )
        return str(answer.status_code)

    def attack(gateway: GatewayProcess) -> dict[str, int]:
        return _tally(_threads(count, lambda: one(gateway)))

    return attack


def _threads(count: int, job: Callable[[], str]) -> list[str]:
    out: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        value = job()
        with lock:
            out.append(value)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def _tally(outcomes: object) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:  # type: ignore[attr-defined]
        counts[str(outcome)] = counts.get(str(outcome), 0) + 1
    return counts


ATTACKS: list[tuple[str, str, Callable[[GatewayProcess], dict[str, int]]]] = [
    ("idle", "600 connections that send nothing, for 15 s", idle(600, 15)),
    ("slowloris", "200 connections trickling a header byte a second, 15 s", slowloris(200, 15)),
    ("descriptors", f"1,100 connections on a {GATEWAY_FDS}-descriptor limit", flood(1100)),
    ("header bombs", "8 requests with 1 MB of headers", header_bombs(8, 1 << 20)),
    ("slow readers", "12 unread multi-MB b64_json answers, 40 s", slow_readers(12, 40)),
    ("slow uploads", "120 uploads of 13 MB at 1 KB/s, 20 s", slow_uploads(120, 13_000_000, 20)),
    ("aborted uploads", "50 uploads reset mid-body", aborted_uploads(50)),
    ("oversized outputs", "20 parallel 4096x4096 JPEGs at scale_factor 4", oversized_outputs(20)),
]


def run_edge_suite(workdir: Path) -> list[AttackResult]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The gateway inherits a 1,024-descriptor limit; this process needs more to attack it.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(GATEWAY_FDS, hard), hard))
    try:
        # The cache on: the slow readers repeat one request, which is billed once.
        stack = Stack(workdir, 1, cache={"enabled": True}).__enter__()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        results = []
        for name, what, attack in ATTACKS:
            may_bill = 0.006 if name == "slow readers" else 0.0  # one run, at most Replicate's
            results.append(run_attack(stack, name, what, attack, may_bill))
            print(f"edge attack done: {name}", flush=True)
        return results
    finally:
        stack.__exit__(None, None, None)


def print_edge(results: list[AttackResult]) -> None:
    print(
        "\n| attack | outcome | RSS MiB before / peak / after | open fds before / peak / after "
        "| /healthz p99 / max | billed |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        outcome = ", ".join(f"{k}: {v}" for k, v in sorted(r.outcome.items()))
        rss = " / ".join(f"{x:.0f}" for x in r.rss_mib)
        fds = " / ".join(str(x) for x in r.fds)
        health = f"{r.healthz_p99_ms:.0f} / {r.healthz_max_ms:.0f} ms"
        if r.healthz_failed:
            health += f" ({r.healthz_failed} failed)"
        mark = "" if r.held else " FAIL"
        print(f"| {r.what} | {outcome} | {rss} | {fds} | {health} | {r.billed_usd:g} USD{mark} |")
