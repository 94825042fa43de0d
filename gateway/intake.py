"""Pure ASGI middleware: request bodies are read a few at a time.

asyncio runs every callback that is ready in one turn of the loop, and a request's code runs
on without yielding for as long as what it awaits is already there (a body uvicorn has
buffered, a free semaphore, an in-memory store). A thousand uploads arriving together would
each run from the first middleware through parsing their first chunks before any other task
(the loop probe, a health check, a finished job) ran again: turns of a second and more. With
slots, a request with a body waits at the door, before any of the app's code, until one is
free; the connections of the rest stay paused (uvicorn stops reading past 64 KiB unread),
their bytes in the kernel's buffers.

A turn is short. The slot is given back with the last chunk (what follows it, the last
parse and the handler, runs in no turn), when the app returns, when the client keeps the
request waiting more than `hold_s`, and, when others wait, once it has been held `slice_s`:
a slow or trickling client cannot keep others' bodies unread. A body taken up again goes
before new arrivals, so its client's idle timeout is not spent queueing behind them; a new
arrival that waits `door_s` for a slot gets a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import BodiesBusy, error_response

HOLD_S = 0.05  # a client this slow to send its next bytes gives its slot to another body
# The longest a slot is held while others wait for one: longer than an honest upload takes
# (each body a slice lets in is one more connection being read at once), short enough that
# a client trickling bytes under HOLD_S apart cannot keep the door shut.
SLICE_S = 1.0


def has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return value.strip().lstrip(b"0") != b""
        if name == b"transfer-encoding":
            return True
    return False


class Slots:
    """`size` slots. A freed slot passes straight to a waiter: first to those taking one up
    again mid-body, then to new arrivals, each in the order they came."""

    def __init__(self, size: int):
        self.free = size
        self._resuming: deque[asyncio.Future[None]] = deque()
        self._arriving: deque[asyncio.Future[None]] = deque()

    def waiting(self) -> bool:
        return bool(self._resuming or self._arriving)

    async def take(self, resuming: bool) -> None:
        if self.free > 0 and not self.waiting():
            self.free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._resuming if resuming else self._arriving
        queue.append(granted)
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.give()  # granted, then cancelled before it ran: the slot goes on
            else:
                queue.remove(granted)
            raise

    def give(self) -> None:
        for queue in (self._resuming, self._arriving):
            while queue:
                granted = queue.popleft()
                if not granted.done():
                    granted.set_result(None)
                    return
        self.free += 1


class _Turn:
    """One request's claim on a slot, given back and taken again as its body comes."""

    def __init__(self, slots: Slots, hold_s: float, slice_s: float):
        self._slots = slots
        self._hold_s = hold_s
        self._slice_s = slice_s
        self._held_since: float | None = None
        self._done = False  # the body is in, or the app returned: receives pass through
        self._receiving = False
        self._kept: Message | None = None  # a chunk whose slot wait was cancelled

    async def take(self, resuming: bool) -> None:
        await self._slots.take(resuming)
        self._held_since = time.monotonic()

    def give_back(self) -> None:
        if self._held_since is not None:
            self._held_since = None
            self._slots.give()

    def close(self) -> None:
        self._done = True
        self.give_back()

    def receiving(self, receive: Receive) -> Receive:
        async def receive_in_turn() -> Message:
            if self._done or self._receiving:  # a second receiver is never a second claim
                return await receive()
            self._receiving = True
            try:
                return await self._next(receive)
            finally:
                self._receiving = False

        return receive_in_turn

    async def _next(self, receive: Receive) -> Message:
        message, self._kept = self._kept, None
        if message is None:
            message = await self._wait_for_client(receive)
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.close()  # the last chunk, or a disconnect: no turn needed to hand it on
            return message
        if self._held_since is None:
            try:
                await self.take(resuming=True)
            except BaseException:
                self._kept = message  # the next receive hands it on
                raise
        return message

    async def _wait_for_client(self, receive: Receive) -> Message:
        held = self._held_since
        if held is not None and self._slots.waiting() and time.monotonic() - held > self._slice_s:
            self.give_back()  # its slice is up: the next in line goes first
        pending = asyncio.ensure_future(receive())
        try:
            if self._held_since is not None:
                await asyncio.wait({pending}, timeout=self._hold_s)
            if not pending.done():
                self.give_back()  # waiting on the client: another body's turn
            return await pending
        except BaseException:  # cancelled (the body's idle timeout): so is the read
            pending.cancel()
            raise


class BodyIntake:
    def __init__(
        self,
        app: ASGIApp,
        slots: int,
        door_s: float,
        hold_s: float = HOLD_S,
        slice_s: float = SLICE_S,
    ):
        self.app = app
        self._slots = Slots(slots)
        self._door_s = door_s
        self._hold_s = hold_s
        self._slice_s = slice_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        turn = _Turn(self._slots, self._hold_s, self._slice_s)
        try:
            await asyncio.wait_for(turn.take(resuming=False), self._door_s)
        except TimeoutError:
            busy = BodiesBusy(
                f"The gateway is reading as many uploads as it takes at once, and this one "
                f"found no turn within {self._door_s:g} s; retry in a moment.",
                headers={"retry-after": "1", "connection": "close"},
            )
            await error_response(busy)(scope, receive, send)
            return
        try:
            await self.app(scope, turn.receiving(receive), send)
        finally:
            turn.close()
