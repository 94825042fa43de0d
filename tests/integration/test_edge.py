"""The connection edge against hostile clients, over raw sockets: idle and slowloris
connections, header bombs, a connection flood, slow and aborted uploads, clients that never
read their answer, and a key's burst refused before its bodies are read. Each bound is
small here (the config's `limits`), so each attack ends in seconds."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.integration.conftest import Emulator, own_gateway
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"
LIMITS = {
    "max_connections": 24,
    "header_timeout_s": 1.5,
    "max_header_bytes": 16 * 1024,
    "write_timeout_s": 2.0,
    "body_idle_timeout_s": 2.5,
    "body_timeout_s": 4.0,
    "bodies_in_flight_bytes": 3 * 1024 * 1024,
    "bodies_reading": 1,  # one body read at a time: a client gone quiet gives its turn up
}
BURSTY = "bursty"  # a named key with max_concurrent: 2
BURSTY_KEY = "sk-edge-bursty-4411"
PLAIN_KEY = "sk-edge-plain-7102"  # no limits of its own
STEADY_KEY = "sk-edge-steady-5520"  # requests_per_minute: 2


def post_head(length: int, key: str = PLAIN_KEY) -> bytes:
    return (
        b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer " + key.encode() + b"\r\n"
        b"content-length: " + str(length).encode() + b"\r\n\r\n"
    )


@pytest.fixture(scope="module")
def edge(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    bursty = {"sha256": hashlib.sha256(BURSTY_KEY.encode()).hexdigest(), "max_concurrent": 2}
    plain = {"sha256": hashlib.sha256(PLAIN_KEY.encode()).hexdigest()}
    steady = {
        "sha256": hashlib.sha256(STEADY_KEY.encode()).hexdigest(),
        "requests_per_minute": 2,
    }
    with own_gateway(
        tmp_path_factory,
        fal_emulator,
        replicate_emulator,
        limits=LIMITS,
        clients={"keys": {BURSTY: bursty, "plain": plain, "steady": steady}},
    ) as process:
        yield process


def connect(gateway: GatewayProcess, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(15)
    sock.connect(("127.0.0.1", gateway.port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def read_head(sock: socket.socket) -> bytes:
    """An answer's status line, headers and body, on a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(v for k, v in _headers(head) if k == b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def healthy(gateway: GatewayProcess) -> bool:
    return httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200


def test_idle_and_slowloris_connections_are_closed(edge: GatewayProcess) -> None:
    idle = connect(edge)
    slow = connect(edge)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for _ in range(8):  # a header byte every 0.3 s: past the 1.5 s header deadline
        try:
            slow.sendall(b"X")
        except OSError:
            break
        time.sleep(0.3)
    assert status_of(read_all(idle)) == 408  # closed, not left open for good
    assert status_of(read_all(slow)) == 408
    assert healthy(edge)


def test_a_header_bomb_gets_431_and_nothing_else_waits(edge: GatewayProcess) -> None:
    sock = connect(edge)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bomb: " + b"a" * 200_000 + b"\r\n\r\n")
    assert status_of(read_all(sock)) == 431
    # One header line that never ends: refused once it passes the cap, not at the deadline.
    endless = connect(edge)
    endless.settimeout(1.0)  # under the 1.5 s header deadline
    with contextlib.suppress(OSError):
        endless.sendall(b"GET /healthz HTTP/1.1\r\nX-Bomb: " + b"a" * 100_000)
    assert status_of(read_all(endless)) == 431
    assert healthy(edge)


def test_a_connection_flood_makes_room_for_real_requests(edge: GatewayProcess) -> None:
    # Past the cap, the connections that waited longest for a request are closed to make
    # room: the flood's oldest go first, and a health check that arrives is served at once.
    socks = [connect(edge) for _ in range(LIMITS["max_connections"] + 6)]
    try:
        # Well before the 1.5 s header deadline, some were closed to make room (which ones,
        # of a burst accepted together, is the event loop's order; older idle sockets of
        # this module may go first).
        answered, _, _ = select.select(socks, [], [], 1.0)
        assert answered
        for sock in answered:
            answer = read_all(sock)
            assert status_of(answer) == 408 and b"request_timeout" in answer, answer
        assert healthy(edge)  # a new connection, with the cap still full of idle ones
    finally:
        for sock in socks:
            sock.close()


def test_a_body_must_arrive_whole_within_its_deadline(edge: GatewayProcess) -> None:
    body = json.dumps({"model": MODEL, "image": "data:image/png;base64,AAAA"}).encode()
    sock = connect(edge)
    sock.sendall(post_head(len(body)))
    for byte in body:  # a byte each 0.2 s: well within the idle timeout, never done in time
        if select.select([sock], [], [], 0.2)[0]:
            break  # answered
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
    answer = read_all(sock)
    assert status_of(answer) == 408, answer[:300]
    assert b"within 4 s" in answer


def test_a_client_that_never_reads_is_cut_off(edge: GatewayProcess) -> None:
    # A b64_json answer of megabytes, to a socket with a tiny receive window that reads
    # nothing: after write_timeout_s the gateway aborts it (it had buffered it all).
    noise = io.BytesIO()
    Image.effect_noise((512, 512), 64).convert("RGB").save(noise, "PNG")  # no compression
    image = "data:image/png;base64," + base64.b64encode(noise.getvalue()).decode()
    body = json.dumps(
        {"model": MODEL, "image": image, "scale_factor": 4, "response_format": "b64_json"}
    ).encode()
    sock = connect(edge, rcvbuf=4096)
    sock.sendall(post_head(len(body)) + body)
    time.sleep(8)  # the upscale, then write_timeout_s (2 s) with nothing read
    received = read_all(sock)
    head, _, rest = received.partition(b"\r\n\r\n")
    length = int(next(v for k, v in _headers(head) if k == b"content-length"))
    assert status_of(received) == 200
    assert len(rest) < length  # cut off: the rest was never sent
    assert healthy(edge)


def test_a_slow_reader_that_keeps_reading_gets_all_of_it(edge: GatewayProcess) -> None:
    # The write deadline is about progress: a whole answer sits in the transport's buffer,
    # which drains below its low-water mark only near the end; a slow, steady reader must
    # get all of it however much longer than write_timeout_s (2 s) that takes.
    noise = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(noise, "PNG")
    image = "data:image/png;base64," + base64.b64encode(noise.getvalue()).decode()
    body = json.dumps(
        {"model": MODEL, "image": image, "scale_factor": 2, "response_format": "b64_json"}
    ).encode()
    sock = connect(edge, rcvbuf=4096)
    sock.sendall(post_head(len(body)) + body)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(v for k, v in _headers(head) if k == b"content-length"))
    started = time.monotonic()
    while len(rest) < length:
        chunk = sock.recv(32 * 1024)
        assert chunk, f"cut off at {len(rest)} of {length} bytes"
        rest += chunk
        time.sleep(0.1)
    assert time.monotonic() - started > LIMITS["write_timeout_s"]  # it was slow, and whole
    assert json.loads(rest)["data"][0]["b64_json"]


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines)]


def test_a_keys_burst_is_refused_before_its_bodies_are_read(edge: GatewayProcess) -> None:
    # max_concurrent: 2. Ten uploads that send their headers and then stall: two are read
    # (and time out); the other eight get their 429 without sending a byte of body.
    socks = []
    for _ in range(10):
        sock = connect(edge)
        sock.sendall(post_head(1_000_000, BURSTY_KEY))  # two fit the bodies' budget
        socks.append(sock)
    statuses = [status_of(read_head(s)) for s in socks]
    assert sorted(statuses) == [408, 408] + [429] * 8, statuses


def test_a_key_past_its_rate_is_refused_before_its_body_is_read(edge: GatewayProcess) -> None:
    # requests_per_minute: 2. Two small requests are served; the third declares 2 MB and
    # sends none of it: its 429 comes at once, not the 408 of a body that never came.
    small = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(small, "PNG")
    image = "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()
    body = json.dumps({"model": MODEL, "image": image, "response_format": "b64_json"}).encode()
    for _ in range(2):
        sock = connect(edge)
        sock.sendall(post_head(len(body), STEADY_KEY) + body)
        assert status_of(read_head(sock)) == 200
        sock.close()
    sock = connect(edge)
    sock.sendall(post_head(2_000_000, STEADY_KEY))
    answer = read_head(sock)  # a body that was waited for would end in a 408
    assert status_of(answer) == 429 and b"rate_limit_exceeded" in answer, answer[:300]
    assert b"retry-after: " in answer.lower()


def test_a_stalled_body_keeps_no_other_body_unread(edge: GatewayProcess) -> None:
    stalled = connect(edge)
    stalled.sendall(post_head(5000) + b'{"model": ')  # and then a byte now and then
    body = json.dumps({"model": MODEL, "image": "data:image/png;base64,AAAA"}).encode()
    other = connect(edge)
    other.sendall(post_head(len(body)) + body)
    while not select.select([other], [], [], 0.3)[0]:
        assert not select.select([stalled], [], [], 0)[0], "the stalled body was answered first"
        stalled.sendall(b" ")  # within the idle timeout: the gateway keeps waiting on it
    assert not select.select([stalled], [], [], 0)[0], "the stalled body was answered first"
    answer = read_head(other)
    assert status_of(answer) == 415, answer[:300]  # read whole and parsed: not an image
    assert status_of(read_all(stalled)) == 408  # its body never came whole


def test_bodies_past_the_memory_budget_get_503(edge: GatewayProcess) -> None:
    # 3 MiB of bodies at once: a stalled 2 MB upload holds 2 MB; a second is refused at once.
    first, second = connect(edge), connect(edge)
    head = post_head(2_000_000)
    first.sendall(head)
    time.sleep(0.5)
    second.sendall(head)
    answer = read_head(second)
    assert status_of(answer) == 503 and b"server_busy" in answer, answer[:300]
    assert status_of(read_all(first)) == 408


def test_an_aborted_upload_is_no_server_error(edge: GatewayProcess) -> None:
    sock = connect(edge)
    sock.sendall(post_head(100_000) + b"{" * 1000)
    time.sleep(0.3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset, mid-body
    time.sleep(1.0)
    lines = [line for line in edge.log().splitlines() if '"status":' in line]
    assert any('"status":499' in line for line in lines), lines[-3:]
    assert "Traceback" not in edge.log()
    assert not any('"status":500' in line for line in lines)
