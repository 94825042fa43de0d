"""BodyIntake (gateway/intake.py): bodies are read `slots` at a time, a slow client gives
its slot back, and every way out of a request frees its slot."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.intake import BodyIntake, has_body

pytestmark = pytest.mark.anyio


def scope(method: str = "POST", length: int | None = 30) -> Scope:
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    return {"type": "http", "method": method, "path": "/v1/images/edits", "headers": headers}


def client(chunks: int, stall: asyncio.Event | None = None) -> Receive:
    """Sends `chunks` chunks; with `stall`, only once it is set (a client gone quiet)."""
    sent = 0

    async def receive() -> Message:
        nonlocal sent
        if stall is not None:
            await stall.wait()
        await asyncio.sleep(0.001)  # bytes on their way
        sent += 1
        return {"type": "http.request", "body": b"x" * 10, "more_body": sent < chunks}

    return receive


async def ignore(message: Message) -> None:
    pass


class Reader:
    """An app that reads the whole body, counting how many bodies are being read at once."""

    def __init__(self) -> None:
        self.reading = 0
        self.most = 0
        self.bodies: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.reading += 1
        self.most = max(self.most, self.reading)
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break  # the slot is given back with the last chunk
            await asyncio.sleep(0)  # parsing the chunk
        self.reading -= 1
        await asyncio.sleep(0)  # the last chunk's parse, and the rest of the request
        self.bodies.append(size)


async def test_bodies_are_read_slots_at_a_time() -> None:
    app = Reader()
    intake = BodyIntake(app, slots=3)
    await asyncio.gather(*(intake(scope(), client(5), ignore) for _ in range(20)))
    assert app.bodies == [50] * 20
    assert app.most == 3


async def test_a_quiet_client_gives_its_slot_to_another_body() -> None:
    app = Reader()
    intake = BodyIntake(app, slots=1, hold_s=0.02)
    stall = asyncio.Event()
    quiet = asyncio.create_task(intake(scope(), client(3, stall), ignore))
    await asyncio.sleep(0.01)  # it holds the one slot, its client silent
    await asyncio.wait_for(intake(scope(), client(3), ignore), 5)
    assert app.bodies == [30] and not quiet.done()
    stall.set()
    await asyncio.wait_for(quiet, 5)
    assert app.bodies == [30, 30]


async def test_every_way_out_frees_the_slot() -> None:
    async def refuses(scope: Scope, receive: Receive, send: Send) -> None:
        pass  # answers before reading a byte (a 413 on Content-Length, a 429)

    async def times_out(scope: Scope, receive: Receive, send: Send) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(receive(), 0.05)  # the body's idle timeout

    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise ValueError("a parse that failed mid-body")

    stall = asyncio.Event()  # never set: a client that sends nothing
    for app, receive in ((refuses, client(3)), (times_out, client(3, stall)), (fails, client(3))):
        intake = BodyIntake(app, slots=1, hold_s=1.0)
        with pytest.raises(ValueError) if app is fails else _nothing():
            await asyncio.wait_for(intake(scope(), receive, ignore), 5)
        reader = Reader()
        intake.app = reader  # the next body gets the slot at once
        await asyncio.wait_for(intake(scope(), client(1), ignore), 1)
        assert reader.bodies == [10], app.__name__


async def test_requests_without_a_body_never_wait() -> None:
    stall = asyncio.Event()
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["method"])
        if scope["method"] == "POST":
            await receive()

    intake = BodyIntake(app, slots=1, hold_s=10)
    stalled = asyncio.create_task(intake(scope(), client(1, stall), ignore))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(intake(scope("GET", None), client(1), ignore), 1)
    await asyncio.wait_for(intake(scope("POST", 0), client(1), ignore), 1)
    assert seen == ["POST", "GET", "POST"]
    stall.set()
    await stalled


def test_what_has_a_body() -> None:
    chunked: Any = {"headers": [(b"transfer-encoding", b"chunked")]}
    assert has_body(scope()) and has_body(chunked)
    assert not has_body(scope("GET", None)) and not has_body(scope("POST", 0))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
