"""BodyIntake (gateway/intake.py): bodies are read `slots` at a time, a slow client gives
its slot back, and every way out of a request frees its slot."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.intake import BodyIntake, Slots, has_body

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
    intake = BodyIntake(app, slots=3, door_s=5)
    await asyncio.gather(*(intake(scope(), client(5), ignore) for _ in range(20)))
    assert app.bodies == [50] * 20
    assert app.most == 3


async def test_a_quiet_client_gives_its_slot_to_another_body() -> None:
    app = Reader()
    intake = BodyIntake(app, slots=1, door_s=5, hold_s=0.02)
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
        intake = BodyIntake(app, slots=1, door_s=5, hold_s=1.0)
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

    intake = BodyIntake(app, slots=1, door_s=5, hold_s=10)
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


def trickle(chunks: list[Message], gap_s: float, quiet: asyncio.Event | None = None) -> Receive:
    """Sends `chunks` `gap_s` apart; with `quiet`, waits for it before the second."""
    left = list(chunks)

    async def receive() -> Message:
        if quiet is not None and len(left) < len(chunks):
            await quiet.wait()
        await asyncio.sleep(gap_s)
        return left.pop(0)

    return receive


def body(n: int, last: bool = False) -> Message:
    return {"type": "http.request", "body": b"x" * n, "more_body": not last}


class Holder:
    """An app that, let in, keeps its slot (reads nothing) until released."""

    def __init__(self) -> None:
        self.inside = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.inside.set()
        await self.release.wait()


async def test_a_steady_trickle_gives_way_once_its_slice_is_up() -> None:
    app = Reader()
    intake = BodyIntake(app, slots=1, door_s=5, hold_s=1.0, slice_s=0.02)
    steady = [body(1) for _ in range(60)] + [body(1, last=True)]  # never quiet for 50 ms
    trickler = asyncio.create_task(intake(scope(), trickle(steady, 0.005), ignore))
    await asyncio.sleep(0.03)
    await asyncio.wait_for(intake(scope(), client(2), ignore), 5)
    assert app.bodies == [20] and not trickler.done()  # read between the trickle's chunks
    await trickler
    assert app.bodies == [20, 61]


async def test_a_body_taken_up_again_goes_before_new_arrivals() -> None:
    slots = Slots(1)
    await slots.take(resuming=False)
    arriving = asyncio.create_task(slots.take(resuming=False))
    await asyncio.sleep(0)
    resuming = asyncio.create_task(slots.take(resuming=True))
    await asyncio.sleep(0)
    slots.give()
    await asyncio.sleep(0)
    assert resuming.done() and not arriving.done()
    slots.give()
    await arriving
    slots.give()
    assert slots.free == 1 and not slots.waiting()


async def test_a_cancelled_wait_for_a_slot_passes_it_on() -> None:
    slots = Slots(1)
    await slots.take(resuming=False)
    waiter = asyncio.create_task(slots.take(resuming=False))
    await asyncio.sleep(0)
    slots.give()  # granted to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.free == 1


async def test_a_disconnect_mid_body_needs_no_turn() -> None:
    got: list[str] = []
    quiet = asyncio.Event()

    async def reader(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            got.append(message["type"])
            if message["type"] == "http.disconnect":
                return

    holder = Holder()
    intake = BodyIntake(reader, slots=1, door_s=5, hold_s=0.02)
    gone = [body(5), {"type": "http.disconnect"}]
    leaving = asyncio.create_task(intake(scope(), trickle(gone, 0.001, quiet), ignore))
    await asyncio.sleep(0.1)  # read its first chunk, then fell silent: slot given back
    intake.app = holder
    inside = asyncio.create_task(intake(scope(), client(1), ignore))
    await asyncio.wait_for(holder.inside.wait(), 1)  # the one slot is held now
    quiet.set()
    await asyncio.wait_for(leaving, 1)
    assert got == ["http.request", "http.disconnect"]
    holder.release.set()
    await inside


async def test_receives_after_the_app_or_beside_another_take_no_slot() -> None:
    kept: list[Receive] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kept.append(receive)
        await asyncio.gather(receive(), receive())  # two receivers at once

    intake = BodyIntake(app, slots=2, door_s=5)
    await intake(scope(), client(3), ignore)
    await kept[0]()  # after the app returned
    assert intake._slots.free == 2


async def test_a_chunk_whose_slot_wait_is_cancelled_is_not_lost() -> None:
    seen: list[Any] = []
    quiet = asyncio.Event()

    async def reader(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((await receive())["body"])
        for _ in range(2):
            try:
                seen.append((await asyncio.wait_for(receive(), 0.3))["body"])
            except TimeoutError:
                seen.append("timeout")

    holder = Holder()
    intake = BodyIntake(reader, slots=1, door_s=5, hold_s=0.02)
    chunks = [{"type": "http.request", "body": b"1", "more_body": True},
              {"type": "http.request", "body": b"2", "more_body": True}]  # fmt: skip
    reading = asyncio.create_task(intake(scope(), trickle(chunks, 0.001, quiet), ignore))
    await asyncio.sleep(0.1)  # its first chunk read, its client silent: the slot given back
    intake.app = holder
    holding = asyncio.create_task(intake(scope(), client(1), ignore))
    await asyncio.wait_for(holder.inside.wait(), 1)
    quiet.set()  # chunk 2 arrives; its slot wait times out (the holder keeps the slot)
    await asyncio.sleep(0.4)
    holder.release.set()
    await asyncio.wait_for(reading, 2)
    await holding
    assert seen == [b"1", "timeout", b"2"]


async def test_no_turn_within_the_door_time_is_a_503() -> None:
    holder = Holder()
    intake = BodyIntake(holder, slots=1, door_s=0.05)
    holding = asyncio.create_task(intake(scope(), client(1), ignore))
    await asyncio.wait_for(holder.inside.wait(), 1)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await intake(scope(), client(1), send)
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"1") in sent[0]["headers"]
    assert b"server_busy" in sent[1]["body"]
    holder.release.set()
    await holding
