"""Result images for `response_format=url`: stored by the gateway and handed out as its own
signed, expiring URL (never the provider's, which expires and names the provider)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from pathlib import Path

from gateway.errors import ResultsUnavailable
from gateway.imaging import CONTENT_TYPES

log = logging.getLogger("gateway.results")


_ID = re.compile(r"^img_[A-Za-z0-9_-]{22,64}\.(png|jpeg|gif|webp|avif)$")


class UrlSigner:
    def __init__(self, secret: bytes):
        self._secret = secret

    def signature(self, file_id: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{file_id}\n{expires}".encode(), hashlib.sha256)
        return mac.hexdigest()

    def verify(self, file_id: str, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        # bytes: compare_digest refuses a str with non-ASCII characters (a 500)
        return hmac.compare_digest(self.signature(file_id, expires).encode(), signature.encode())


class FileResultStore:
    """One file per result under `root`; a sweep deletes those past their time to live, and
    the oldest go first whenever the total passes `max_bytes` (at 40 requests a second of
    3 MB, an hour of results is 400 GB: the time to live alone does not bound the disk)."""

    def __init__(self, root: str | Path, ttl_s: int, max_bytes: int = 10 << 30):
        self.root = Path(root)
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._bytes = 0  # an estimate between sweeps: what the last sweep saw plus new puts
        self._trimming: asyncio.Task[int] | None = None

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._bytes = sum(e.stat().st_size for e in os.scandir(self.root) if e.is_file())

    @staticmethod
    def content_type(file_id: str) -> str | None:
        match = _ID.match(file_id)
        return CONTENT_TYPES[match[1]] if match else None

    async def put(self, data: bytes, output_format: str) -> str:
        file_id = f"img_{secrets.token_urlsafe(24)}.{output_format}"
        try:
            await asyncio.to_thread(self._write, self.root / file_id, data)
        except OSError as exc:
            log.error("result not stored: %s", exc)
            raise ResultsUnavailable(
                "The gateway could not store the result image; retry, or ask for "
                "response_format=b64_json.",
                code="results_storage_unavailable",
            ) from exc
        self._bytes += len(data)
        if self._bytes > self.max_bytes and (self._trimming is None or self._trimming.done()):
            self._trimming = asyncio.create_task(asyncio.to_thread(self.sweep))
        return file_id

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see a half-written file

    async def keep(self, file_id: str, for_s: float) -> None:
        """Keep a result at least `for_s` from now: the sweep goes by modification time, so
        the time is moved forward (never back)."""
        path = self.path(file_id)
        if path is not None:
            when = time.time() + max(0.0, for_s - self.ttl_s)
            await asyncio.to_thread(os.utime, path, (when, when))

    def path(self, file_id: str) -> Path | None:
        if not _ID.match(file_id):
            return None
        path = self.root / file_id
        return path if path.is_file() else None

    def sweep(self) -> int:
        """Delete expired results, then the oldest until the total is under 90 % of the cap."""
        cutoff = time.time() - self.ttl_s
        removed = 0
        kept: list[tuple[float, int, str]] = []
        for entry in os.scandir(self.root):
            if not entry.is_file():  # the cache's own store lives in a subdirectory
                continue
            with contextlib.suppress(OSError):
                stat = entry.stat()
                if stat.st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
                else:
                    kept.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in kept)
        if total > self.max_bytes:
            kept.sort()  # oldest first (results kept for an idempotent replay sort last)
            for _, size, path in kept:
                if total <= self.max_bytes * 0.9:
                    break
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed += 1
                    total -= size
        self._bytes = total
        return removed

    async def sweep_forever(self, every_s: float = 60.0) -> None:
        while True:
            await asyncio.to_thread(self.sweep)
            await asyncio.sleep(every_s)
