"""What every bad-input test shares: sending a request (httpx or a raw socket), the checks
every answer must pass, the tally of inputs tried, and a record of every violation with a
reproduction, so one run reports all the defects it met instead of stopping at the first."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.integration.servers import GatewayProcess

EDITS = "/v1/images/edits"
MODEL = "recraft-crisp-upscale"
ENVELOPE_KEYS = {"message", "type", "param", "code"}
# Examples per hypothesis test. The default keeps `make test` fast; `make reliability` sets
# it so that all generators together try at least 10,000 bad inputs.
EXAMPLES = int(os.environ.get("RELIABILITY_EXAMPLES", "150"))
# How long a request whose body never ends may hold its connection before the gateway must
# answer or close it.
STALL_BOUND_S = float(os.environ.get("RELIABILITY_STALL_BOUND_S", "10"))
# Peak RSS one input may add to the gateway's resident set. Inputs inside the limits are
# decoded: 16 MP x 4 bytes x 4 copies (decode, RGBA, RGB, PNG for the provider) = 256 MiB.
RSS_BUDGET_KIB = int(os.environ.get("RELIABILITY_RSS_BUDGET_MIB", "256")) * 1024
# Resident set the gateway may keep over its warmed-up baseline after a test (leaks).
LEAK_BUDGET_KIB = int(os.environ.get("RELIABILITY_LEAK_BUDGET_MIB", "96")) * 1024
REQUEST_TIMEOUT_S = 30.0

# Inputs tried per generator, for the closing summary and `make reliability`'s table.
TRIED: Counter[str] = Counter()
ACCEPTED: Counter[str] = Counter()  # of those, answered 200 (the input happened to be valid)
STATUSES: Counter[int] = Counter()


@dataclass(slots=True)
class Violation:
    generator: str
    signature: str
    detail: str
    repro: bytes
    count: int = 1


@dataclass(slots=True)
class Violations:
    """Distinct violations by signature, each with its smallest reproduction."""

    found: dict[str, Violation] = field(default_factory=dict)

    def add(self, generator: str, signature: str, detail: str, repro: bytes) -> None:
        seen = self.found.get(signature)
        if seen is None:
            self.found[signature] = Violation(generator, signature, detail, repro)
            return
        seen.count += 1
        if len(repro) < len(seen.repro):
            seen.repro, seen.detail = repro, detail

    def report(self, artifacts: Path | None = None) -> str:
        lines = []
        for n, v in enumerate(self.found.values()):
            where = ""
            if artifacts is not None:
                artifacts.mkdir(parents=True, exist_ok=True)
                path = artifacts / f"violation-{n}.http"
                path.write_bytes(v.repro)
                where = f"\n    full request: {path}"
            lines.append(
                f"[{v.generator}] x{v.count} {v.signature}\n    {v.detail}{where}\n"
                f"    request: {v.repro[:600]!r}"
            )
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return bool(self.found)


# Every test's violations, for the closing summary.
ALL_VIOLATIONS: list[Violations] = []


def new_violations() -> Violations:
    found = Violations()
    ALL_VIOLATIONS.append(found)
    return found


Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Sent:
    """One request as it goes on the wire (enough to replay it with a raw socket)."""

    headers: tuple[Header, ...]
    body: bytes
    path: str = EDITS
    chunked: bool = False  # sent with Transfer-Encoding: chunked instead of a length

    def wire(self) -> bytes:
        head = [f"POST {self.path} HTTP/1.1".encode(), b"Host: gateway"]
        head += [name + b": " + value for name, value in self.headers]
        head.append(b"Content-Length: %d" % len(self.body))
        return b"\r\n".join(head) + b"\r\n\r\n" + self.body

    def content(self) -> bytes | Iterator[bytes]:
        if not self.chunked:
            return self.body
        step = max(1, len(self.body) // 3)
        return iter([self.body[i : i + step] for i in range(0, len(self.body), step)])


def multipart_headers(boundary: bytes = b"gw-boundary", *extra: Header) -> tuple[Header, ...]:
    return ((b"Content-Type", b"multipart/form-data; boundary=" + boundary), *extra)


def _last_exception(gateway: GatewayProcess) -> str:
    """The last `SomeError: ...` line of the gateway's log: a 500's cause."""
    matches = re.findall(r"^(\w+(?:Error|Exception|Warning)\b.*)$", gateway.log(), re.M)
    return matches[-1][:160] if matches else "no exception in the log"


def check_answer(
    response: httpx.Response,
    gateway: GatewayProcess,
    generator: str,
    sent: Sent,
    found: Violations,
) -> None:
    """Record every way the answer breaks the contract for bad input."""
    problems: list[str] = []
    status = response.status_code
    if status >= 500:
        problems.append(f"{status} ({_last_exception(gateway)})")
    if status < 400 and status != 200:
        problems.append(f"unexpected status {status}")
    ctype = response.headers.get("content-type", "")
    if ctype.split(";")[0].strip() != "application/json":
        problems.append(f"content-type {ctype!r}")
    if not response.headers.get("x-request-id"):
        problems.append(f"{status} without x-request-id")
    if status >= 400:
        problems += envelope_problems(response.content)
    for problem in problems:
        detail = f"{status}: {response.content[:300]!r}"
        found.add(generator, problem, detail, sent.wire())


def envelope_problems(content: bytes) -> list[str]:
    try:
        body: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        return ["error body is not JSON"]
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(error, dict):
        return ["error body is not {'error': {...}}"]
    problems = []
    if set(error) != ENVELOPE_KEYS:
        problems.append(f"envelope keys {sorted(error)}")
    if not isinstance(error.get("message"), str) or not error.get("message"):
        problems.append("envelope message missing")
    if not isinstance(error.get("type"), str):
        problems.append("envelope type not a string")
    for key in ("param", "code"):
        if error.get(key) is not None and not isinstance(error.get(key), str):
            problems.append(f"envelope {key} neither string nor null")
    return problems


@dataclass(slots=True)
class Costliest:
    """The input that raised the gateway's peak RSS the most (clear_refs resets the peak)."""

    kib: int = 0
    generator: str = ""
    repro: bytes = b""

    def measure(self, gateway: GatewayProcess, generator: str, sent: Sent, rss_before: int) -> int:
        grew = gateway.peak_rss_kib() - rss_before
        if grew > self.kib:
            self.kib, self.generator, self.repro = grew, generator, sent.wire()
        return grew


COSTLIEST = Costliest()


def reset_peak(gateway: GatewayProcess) -> int:
    """Reset the process's peak RSS to its current RSS (Linux: `5 > clear_refs`); returns
    the current RSS in KiB."""
    assert gateway.proc is not None
    Path(f"/proc/{gateway.proc.pid}/clear_refs").write_text("5")
    return rss_kib(gateway)


def memory_problems(gateway: GatewayProcess, baseline_kib: int) -> list[str]:
    problems = []
    if not healthy(gateway):
        problems.append(f"gateway stopped answering /healthz\n{gateway.log()}")
    if COSTLIEST.kib >= RSS_BUDGET_KIB:
        problems.append(
            f"one input raised peak RSS by {COSTLIEST.kib} KiB (budget {RSS_BUDGET_KIB}): "
            f"[{COSTLIEST.generator}] {COSTLIEST.repro[:400]!r}"
        )
    kept = rss_kib(gateway) - baseline_kib
    if kept >= LEAK_BUDGET_KIB:
        problems.append(f"RSS stays {kept} KiB over the warmed-up baseline (leak?)")
    return problems


def send(
    client: httpx.Client,
    gateway: GatewayProcess,
    generator: str,
    sent: Sent,
    found: Violations,
) -> httpx.Response | None:
    """POST one input, count it, check the answer and the memory it cost; None when there
    was no answer."""
    TRIED[generator] += 1
    before = reset_peak(gateway)
    try:
        return _send(client, gateway, generator, sent, found)
    finally:
        COSTLIEST.measure(gateway, generator, sent, before)


def _send(
    client: httpx.Client,
    gateway: GatewayProcess,
    generator: str,
    sent: Sent,
    found: Violations,
) -> httpx.Response | None:
    try:
        response = client.post(
            f"{gateway.url}{sent.path}",
            content=sent.content(),
            headers=list(sent.headers),
            timeout=REQUEST_TIMEOUT_S,
        )
    except httpx.TimeoutException:
        found.add(generator, "no answer within 30 s", "timeout", sent.wire())
        return None
    except httpx.TransportError as exc:
        alive = gateway.proc is not None and gateway.proc.poll() is None
        problem = f"connection failed ({type(exc).__name__})" + ("" if alive else ": process died")
        found.add(generator, problem, str(exc)[:200], sent.wire())
        return None
    STATUSES[response.status_code] += 1
    if response.status_code == 200:
        ACCEPTED[generator] += 1
    check_answer(response, gateway, generator, sent, found)
    return response


def healthy(gateway: GatewayProcess) -> bool:
    try:
        return httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def rss_kib(gateway: GatewayProcess) -> int:
    """Current resident set (VmRSS); `peak_rss_kib` is the high-water mark."""
    assert gateway.proc is not None
    for line in Path(f"/proc/{gateway.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@dataclass(frozen=True, slots=True)
class RawAnswer:
    status: int | None  # None: closed without a status line
    headers: dict[str, str]
    body: bytes
    seconds: float
    closed: bool  # the server closed the connection (or reset it)


def raw_exchange(
    gateway: GatewayProcess,
    data: bytes,
    *,
    wait_s: float = 10.0,
    hold_open: bool = True,
) -> RawAnswer:
    """Send bytes on a raw socket and read until one full answer, a close, or `wait_s`.
    With hold_open the write side stays open, as a client that has not finished its body."""
    host, port = gateway.url.removeprefix("http://").split(":")
    started = time.monotonic()
    raw = b""
    closed = False
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        if not hold_open:
            sock.shutdown(socket.SHUT_WR)
        deadline = started + wait_s
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            raw += chunk
            if _complete(raw):
                break
    return _parse_raw(raw, time.monotonic() - started, closed)


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return match is not None and len(body) >= int(match[1])


def _parse_raw(raw: bytes, seconds: float, closed: bool) -> RawAnswer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = None
    if lines and lines[0].startswith("HTTP/1."):
        status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(status, headers, body, seconds, closed)


class StallProbe:
    """Requests whose body never ends: headers and part of the body, then silence. Started
    at the session's start so that waiting out STALL_BOUND_S costs no wall time; the test
    that checks them joins them when its turn comes."""

    def __init__(self, gateway: GatewayProcess, stalls: dict[str, bytes]):
        self.gateway = gateway
        self.stalls = stalls
        self.answers: dict[str, RawAnswer] = {}
        self.healthz_s: float | None = None  # /healthz latency while the bodies hang
        self._threads = [
            threading.Thread(target=self._stall, args=(name,), daemon=True) for name in stalls
        ]

    def _stall(self, name: str) -> None:
        self.answers[name] = raw_exchange(self.gateway, self.stalls[name], wait_s=STALL_BOUND_S + 1)

    def start(self) -> StallProbe:
        for thread in self._threads:
            thread.start()
        TRIED["handmade"] += len(self._threads)
        time.sleep(0.3)
        started = time.monotonic()
        if healthy(self.gateway):
            self.healthz_s = time.monotonic() - started
        return self

    def results(self) -> dict[str, RawAnswer]:
        for thread in self._threads:
            thread.join()
        return self.answers


def summary() -> str:
    total = sum(TRIED.values())
    parts = ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
    accepted = sum(ACCEPTED.values())
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(STATUSES.items()))
    violations = sum(len(v.found) for v in ALL_VIOLATIONS)
    return (
        f"largest peak-RSS rise from one input: {COSTLIEST.kib // 1024} MiB "
        f"[{COSTLIEST.generator}]; "
        f"bad inputs tried: {total} ({parts}); answered 200 (input was valid after all): "
        f"{accepted}; statuses {{{statuses}}}; distinct violations: {violations}"
    )
