"""The connection edge: bounds that uvicorn does not set, applied where they cost nothing,
in its HTTP protocol (httptools), before a request reaches the app.

- A cap on open connections: past it, the connection that has waited longest for a request
  is closed to make room, and only when every one is busy with a request does the new one get
  a 503; so a flood of idle sockets exhausts neither the descriptors nor `/healthz`.
- A header deadline: a request's line and headers must have arrived within `header_timeout_s`
  of the connection opening or of the request's first byte; a fresh connection that sends
  nothing, and a slowloris trickling header bytes, are closed. uvicorn's keep-alive timer
  covers only the wait between requests, and any byte resets it.
- A header size cap: past `max_header_bytes` of request line and headers, a 431 and close.
  httptools would otherwise buffer and parse megabytes of headers on the event loop.
- A write deadline: a client that reads none of its answer for `write_timeout_s` is cut off
  (the transport is aborted, which frees what it buffered: a whole b64_json answer).

Why a protocol subclass rather than an ASGI layer or another server: headers, idle sockets
and the transport's write buffer are all below ASGI (an app sees a request only once its
headers are in), and the rest of uvicorn (workers, graceful drain, lifespan) serves us well.
The subclass overrides uvicorn's public protocol callbacks only."""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import Limits
from gateway.settings import get_settings

log = logging.getLogger("gateway.edge")
_RESERVED_FDS = 64  # files, Redis, provider connections and the listening socket


class _HeadersTooLarge(Exception):
    pass


def connection_cap(wanted: int) -> int:
    """`wanted`, but never more than the descriptor limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - _RESERVED_FDS))


def _response(status: bytes, message: str) -> bytes:
    body = message.encode()
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _envelope(message: str, code: str) -> str:
    return (
        '{"error":{"message":"' + message + '","type":"server_error","param":null,'
        '"code":"' + code + '"}}'
    )


BUSY = _response(
    b"503 Service Unavailable",
    _envelope("The gateway holds as many connections as it can; retry shortly.", "server_busy"),
)
TOO_LARGE = _response(
    b"431 Request Header Fields Too Large",
    _envelope("The request line and headers are larger than the gateway reads.", "headers"),
)
TOO_SLOW = _response(
    b"408 Request Timeout",
    _envelope("The request's headers did not arrive in time.", "request_timeout"),
)


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's `http=` protocol (as "gateway.edge:EdgeProtocol", so that each worker
    process imports it); its bounds come from the config's `limits`."""

    max_connections = 1000
    header_timeout_s = 10.0
    max_header_bytes = 64 * 1024
    write_timeout_s = 30.0
    _configured = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not EdgeProtocol._configured:
            EdgeProtocol.configure(get_settings().load_config().limits)
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_left = 0  # bytes buffered at the last write check
        self._refused = False
        self._waiting_since = 0.0  # when it began to wait for a request's headers
        # Bytes fed while a request's headers are incomplete: httptools hands a header over
        # only once its line ends, so one endless header line is counted here.
        self._in_headers = True
        self._header_fed = 0

    @classmethod
    def configure(cls, limits: Limits) -> None:
        EdgeProtocol.max_connections = connection_cap(limits.max_connections)
        EdgeProtocol.header_timeout_s = limits.header_timeout_s
        EdgeProtocol.max_header_bytes = limits.max_header_bytes
        EdgeProtocol.write_timeout_s = limits.write_timeout_s
        EdgeProtocol._configured = True

    # Connections
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting_since = self.loop.time()
        if len(self.connections) > self.max_connections and not self._evict_idlest():
            self._refuse(BUSY, "connection cap reached (%d open)", len(self.connections))
            return
        self._await_headers()

    def _evict_idlest(self) -> bool:
        """At the cap, the connection that has waited longest for a request's headers makes
        room (an idle or slowloris socket, rather than the health check that just arrived);
        only when every connection is busy with a request is the new one refused."""
        idlest: EdgeProtocol | None = None
        for other in self.connections:
            if other is self or not isinstance(other, EdgeProtocol) or other._refused:
                continue
            if other.cycle is not None and not other.cycle.response_complete:
                continue  # serving a request
            if other.transport.get_write_buffer_size():
                continue  # still delivering an answer
            if idlest is None or other._waiting_since < idlest._waiting_since:
                idlest = other
        if idlest is None:
            return False
        idlest._refuse(TOO_SLOW, "evicted at the connection cap (%d open)", len(self.connections))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        if self._in_headers:
            self._header_fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # as uvicorn's own data_received does
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadersTooLarge) or self._header_bytes > (
                self.max_header_bytes
            ):
                self._refuse(TOO_LARGE, "request headers over %d bytes", self.max_header_bytes)
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        if self._in_headers and self._header_fed > self.max_header_bytes:
            self._refuse(TOO_LARGE, "request headers over %d bytes", self.max_header_bytes)

    # Headers: size and deadline
    def on_message_begin(self) -> None:
        super().on_message_begin()
        # Not at a response's end: the rest of a body answered early may still be arriving.
        self._in_headers, self._header_bytes = True, 0
        self._waiting_since = self.loop.time()
        if self._header_timer is None:  # a keep-alive connection's next request
            self._await_headers()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers, self._header_fed = False, 0
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            raise _HeadersTooLarge

    def _await_headers(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self._refuse(TOO_SLOW, "headers not in after %.0f s", self.header_timeout_s)

    # Writes: a client that reads nothing is cut off
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_left = self.transport.get_write_buffer_size()
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_check)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _write_check(self) -> None:
        """A whole answer is written at once, so the buffer drains below the low-water mark
        only near its end: what counts is progress. A slow reader that keeps reading is
        given its time; one that read nothing for write_timeout_s is cut off."""
        left = self.transport.get_write_buffer_size()
        if left < self._write_left:
            self._write_left = left
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_check)
            return
        self._write_timer = None
        log.info(
            "client %s read nothing for %.0f s: connection aborted",
            self.client[0] if self.client else "?",
            self.write_timeout_s,
        )
        self.transport.abort()  # close() would wait for the buffer to drain: it never would

    def on_response_complete(self) -> None:
        self._waiting_since = self.loop.time()  # idle from here, for the cap's eviction
        super().on_response_complete()

    # Refusals
    def _refuse(self, response: bytes, why: str, *args: Any) -> None:
        self._refused = True
        self._cancel_timers()
        log.info("connection refused: " + why, *args)
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._write_timer = None
