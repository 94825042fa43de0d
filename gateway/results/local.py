"""Results in a local directory, the embedded default: one file per result, served by the
gateway itself. Replicas share results only if they share the directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.results.base import (
    ID,
    Blob,
    StoreHealth,
    content_type,
    new_id,
    sweep_loop,
    unavailable,
)

log = logging.getLogger("gateway.results")


class FileResultStore:
    """One file per result under `root`; a sweep deletes those past their time to live, and
    the oldest go first whenever the total passes `max_bytes` (at 40 requests a second of
    3 MB, an hour of results is 400 GB: the time to live alone does not bound the disk)."""

    kind = "local"

    def __init__(
        self,
        root: str | Path,
        ttl_s: int,
        max_bytes: int = 10 << 30,
        health: StoreHealth | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.root = Path(root)
        self._clock = clock
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.health = health or StoreHealth(self.kind)
        self._bytes = 0  # an estimate between sweeps: what the last sweep saw plus new puts
        self._trimming: asyncio.Task[int] | None = None
        self._location: str | None = None

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._bytes = sum(e.stat().st_size for e in os.scandir(self.root) if e.is_file())
        self._location = _disk_id(self.root)

    async def start(self) -> None:
        await asyncio.to_thread(self.open)

    async def aclose(self) -> None:
        if self._trimming is not None:
            with contextlib.suppress(Exception):
                await self._trimming

    @property
    def location(self) -> str:
        if self._location is None:
            self._location = _disk_id(self.root)
        return self._location

    @staticmethod
    def content_type(file_id: str) -> str | None:
        return content_type(file_id)

    async def put(self, data: bytes, output_format: str) -> str:
        file_id = new_id(output_format)
        try:
            await asyncio.to_thread(self._write, self.root / file_id, data)
        except OSError as exc:
            log.error("result not stored: %s", exc)
            self.health.failed(exc)
            raise unavailable(exc) from exc
        self.health.succeeded()
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
            when = self._clock() + max(0.0, for_s - self.ttl_s)
            with contextlib.suppress(FileNotFoundError):  # swept meanwhile
                await asyncio.to_thread(os.utime, path, (when, when))

    def path(self, file_id: str) -> Path | None:
        if not ID.match(file_id):
            return None
        path = self.root / file_id
        return path if path.is_file() else None

    async def exists(self, file_id: str) -> bool:
        return self.path(file_id) is not None

    async def read(self, file_id: str) -> bytes | None:
        path = self.path(file_id)
        if path is None:
            return None
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def open_blob(self, file_id: str, *, body: bool = True) -> Blob | None:
        path = self.path(file_id)
        kind = content_type(file_id)
        if path is None or kind is None:
            return None
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return Blob(size, kind, path=path)

    async def delete(self, file_id: str) -> bool:
        path = self.path(file_id)
        if path is None:
            return False
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        return True

    def sweep(self) -> int:
        """Delete expired results, then the oldest until the total is under 90 % of the cap."""
        cutoff = self._clock() - self.ttl_s
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

    async def purge(self) -> int:
        return await asyncio.to_thread(self.sweep)

    async def sweep_forever(self, every_s: float = 60.0) -> None:
        await sweep_loop(self, every_s)

    async def ping(self) -> bool:
        ok = await asyncio.to_thread(lambda: self.root.is_dir() and os.access(self.root, os.W_OK))
        if ok:
            self.health.succeeded()
        else:
            self.health.failed(OSError(f"{self.root} is not a writable directory"))
        return ok

    async def presign(self, file_ids: Sequence[str], expires_s: int) -> list[str] | None:
        return None  # only the gateway serves a local directory


def _disk_id(root: Path) -> str:
    """A name for the disk under a file store: made once, in a file beside the images (in a
    subdirectory, which the sweep leaves alone), so every replica on a shared results
    directory reads the same one and replicas on disks of their own read different ones."""
    marker = root / ".disk" / "id"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            draft = marker.with_name(f"id.{secrets.token_hex(8)}.part")
            draft.write_text(secrets.token_hex(16))
            try:
                os.link(draft, marker)  # atomic, and only if absent: the first replica wins
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links
                os.replace(draft, marker)
            finally:
                draft.unlink(missing_ok=True)
        return marker.read_text().strip()
    except OSError as exc:
        log.warning("cache disk not named (%s): its evicted entries are run unnamed", exc)
        return ""
