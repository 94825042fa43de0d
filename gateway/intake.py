"""Pure ASGI middleware: request bodies are read a few at a time.

asyncio runs every callback that is ready in one turn of the loop, and a request's code runs
on without yielding for as long as what it awaits is already there (a body uvicorn has
buffered, a free semaphore, an in-memory store). A thousand uploads arriving together would
each run from the first middleware through parsing their first chunks before any other task
(the loop probe, a health check, a finished job) ran again: turns of a second and more. With
slots, a request with a body waits at the door, before any of the app's code, until one is
free; a turn then holds at most `slots` bodies' work, and the connections of the rest stay
paused (uvicorn stops reading past 64 KiB unread), their bytes in the kernel's buffers.

A slot is given back when the body has been read, when the app returns (an early refusal),
and whenever the client keeps the request waiting for more than `hold_s`: a slow client
cannot keep others' bodies unread, and takes a slot again once its bytes come.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HOLD_S = 0.05  # a client this slow to send its next bytes gives its slot to another body


def has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


class _Turn:
    """One request's claim on a slot, taken and given back as its body comes."""

    def __init__(self, slots: asyncio.Semaphore, hold_s: float):
        self._slots = slots
        self._hold_s = hold_s
        self.held = False
        self.read = False  # the whole body is in: later receives (a disconnect) pass through

    async def take(self) -> None:
        await self._slots.acquire()
        self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self._slots.release()

    def receiving(self, receive: Receive) -> Receive:
        async def receive_in_turn() -> Message:
            if self.read:
                return await receive()
            pending = asyncio.ensure_future(receive())
            try:
                if self.held:
                    await asyncio.wait({pending}, timeout=self._hold_s)
                if not pending.done():
                    self.give_back()  # waiting on the client: another body's turn
                    await pending
                    await self.take()  # its bytes are here: parsed in turn with the rest
            except BaseException:  # cancelled (the body's idle timeout): so is the read
                pending.cancel()
                raise
            message = pending.result()
            if not message.get("more_body", False):
                self.read = True
                self.give_back()
            return message

        return receive_in_turn


class BodyIntake:
    def __init__(self, app: ASGIApp, slots: int, hold_s: float = HOLD_S):
        self.app = app
        self._slots = asyncio.Semaphore(slots)
        self._hold_s = hold_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        turn = _Turn(self._slots, self._hold_s)
        await turn.take()
        try:
            await self.app(scope, turn.receiving(receive), send)
        finally:
            turn.give_back()
