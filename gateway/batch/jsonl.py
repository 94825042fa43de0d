"""Reading a batch input file: its lines found in a stream of chunks (each with its byte
range, so a worker later reads just its own line), and each checked for the shape a batch
line must have. A line's body is checked when it runs, as a live request's would be."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.batch.model import ENDPOINT, Entry

MAX_ERRORS = 100  # reported per file; the count says how many more there were
MAX_CUSTOM_ID = 512
OFF_LOOP = 64 * 1024  # lines longer than this are parsed on a worker thread


@dataclass(slots=True)
class Scanned:
    entries: list[Entry] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0

    def error(self, line: int, message: str, param: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(
                {"code": "invalid_request", "line": line, "message": message, "param": param}
            )


async def scan(chunks: AsyncIterator[bytes], max_line: int, max_lines: int) -> Scanned:
    """Every line's range, and what is wrong with the file (line numbers from 1)."""
    found = Scanned()
    seen: set[str] = set()
    number = 0
    async for offset, length, data in _ranges(chunks, max_line):
        number += 1
        if data is None:
            found.error(number, f"The line is longer than {max_line} bytes.")
            continue
        if not data.strip():
            continue
        if len(found.entries) >= max_lines:
            found.error(number, f"The file has more than {max_lines} requests.")
            break
        line = await asyncio.to_thread(_parse, data) if len(data) > OFF_LOOP else _parse(data)
        problem = _problem(line, seen)
        if problem is not None:
            found.error(number, *problem)
            continue
        seen.add(line["custom_id"])
        found.entries.append(Entry("", number, offset, length))
    if not found.entries and not found.error_count:
        found.error(0, "The input file has no requests.")
    return found


async def _ranges(
    chunks: AsyncIterator[bytes], max_line: int
) -> AsyncIterator[tuple[int, int, bytes | None]]:
    """(offset, length, bytes) of each line without its newline; bytes None for a line over
    `max_line`, whose bytes are counted but never gathered."""
    offset = 0
    gathered = bytearray()
    length = 0
    async for chunk in chunks:
        start = 0
        while start <= len(chunk):
            end = chunk.find(b"\n", start)
            piece_end = len(chunk) if end < 0 else end
            length += piece_end - start
            if length <= max_line:
                gathered += chunk[start:piece_end]
            elif gathered:
                gathered = bytearray()
            if end < 0:
                break
            yield offset, length, bytes(gathered) if length <= max_line else None
            offset += length + 1
            gathered, length = bytearray(), 0
            start = end + 1
    if length:
        yield offset, length, bytes(gathered) if length <= max_line else None


def _parse(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return _Invalid(str(exc))


@dataclass(frozen=True, slots=True)
class _Invalid:
    reason: str


def _problem(line: Any, seen: set[str]) -> tuple[str, str | None] | None:
    if isinstance(line, _Invalid):
        return f"The line is not valid JSON: {line.reason}", None
    if not isinstance(line, dict):
        return "The line must be a JSON object.", None
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "'custom_id' must be a non-empty string.", "custom_id"
    if len(custom_id) > MAX_CUSTOM_ID:
        return f"'custom_id' is longer than {MAX_CUSTOM_ID} characters.", "custom_id"
    if custom_id in seen:
        return f"The custom_id '{custom_id[:80]}' is used by an earlier line.", "custom_id"
    if line.get("method") != "POST":
        return "'method' must be \"POST\".", "method"
    if line.get("url") != ENDPOINT:
        return f"'url' must be \"{ENDPOINT}\", the batch's endpoint.", "url"
    if not isinstance(line.get("body"), dict):
        return "'body' must be a JSON object: the request's body.", "body"
    return None


def custom_id_of(data: bytes) -> str:
    """A line's custom_id, read again when its answer is written."""
    line = _parse(data)
    value = line.get("custom_id") if isinstance(line, dict) else None
    return value if isinstance(value, str) else ""
