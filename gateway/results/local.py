"""Results in a local directory, the embedded default: one file per result, served by the
gateway itself. Replicas share results only if they share the directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.results.base import (
    ID,
    Blob,
    Held,
    StoreHealth,
    content_type,
    new_id,
    sweep_loop,
    to_evict,
    unavailable,
)

log = logging.getLogger("gateway.results")
_PINS = ".pins"  # a subdirectory, which the sweep's listing of results passes over


def _size(path: Path) -> int | None:
    """The size of a regular file; None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _later(path: Path, when: float) -> None:
    """Move the file's modification time forward to `when`, never back."""
    with contextlib.suppress(FileNotFoundError):  # swept meanwhile
        if os.stat(path).st_mtime < when:
            os.utime(path, (when, when))


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

    async def put(self, data: bytes, output_format: str, pin_s: float | None = None) -> str:
        file_id = new_id(output_format)
        try:
            if pin_s is not None:  # pinned before it exists: no sweep can catch it unpinned
                await asyncio.to_thread(self._pin, file_id, self._clock() + pin_s)
            await asyncio.to_thread(self._write, self.root / file_id, data)
        except OSError as exc:
            if pin_s is not None:  # no orphan pin per failed attempt (a full disk)
                with contextlib.suppress(OSError):
                    await asyncio.to_thread((self.root / _PINS / file_id).unlink)
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
        path = await self._find(file_id)
        if path is not None:
            when = self._clock() + max(0.0, for_s - self.ttl_s)
            await asyncio.to_thread(_later, path, when)

    async def pin(self, file_id: str, for_s: float) -> None:
        """Keep it `for_s` from now, and out of the byte cap's reach until then: a marker
        in `.pins/` whose modification time is when the pin ends."""
        if await self._find(file_id) is None:
            return
        until = self._clock() + for_s
        await asyncio.to_thread(self._pin, file_id, until)

    def _pin(self, file_id: str, until: float) -> None:
        marker = self.root / _PINS / file_id
        marker.parent.mkdir(exist_ok=True)
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            _later(marker, until)  # pinned before: the later end holds
        else:
            os.utime(marker, (until, until))

    def path(self, file_id: str) -> Path | None:
        """The result's file, if it is there (a stat: call it off the event loop)."""
        if not ID.match(file_id):
            return None
        path = self.root / file_id
        return path if path.is_file() else None

    async def _find(self, file_id: str) -> Path | None:
        if not ID.match(file_id):  # no disk access for a name the gateway never makes
            return None
        return await asyncio.to_thread(self.path, file_id)  # a slow disk stalls no request

    async def exists(self, file_id: str) -> bool:
        return await self._find(file_id) is not None

    async def read(self, file_id: str) -> bytes | None:
        path = await self._find(file_id)
        if path is None:
            return None
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def open_blob(self, file_id: str, *, body: bool = True) -> Blob | None:
        kind = content_type(file_id)
        if kind is None:
            return None
        path = self.root / file_id
        size = await asyncio.to_thread(_size, path)
        return None if size is None else Blob(size, kind, path=path)

    async def delete(self, file_id: str) -> bool:
        path = await self._find(file_id)
        if path is None:
            return False
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):  # a pin of its own, if any, goes with it
            await asyncio.to_thread((self.root / _PINS / file_id).unlink)
        return True

    def _pins(self, now: float) -> dict[str, float]:
        """The live pins (file id -> when each ends); ended ones are deleted."""
        pins: dict[str, float] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / _PINS):
                with contextlib.suppress(OSError):
                    until = entry.stat().st_mtime
                    if until > now:
                        pins[entry.name] = until
                    else:
                        os.unlink(entry.path)
        return pins

    def sweep(self) -> int:
        """Delete expired results, then past the cap the least recently kept (pinned ones
        only past their share: results.base.to_evict) until under 90 % of it."""
        now = self._clock()
        cutoff = now - self.ttl_s
        pins = self._pins(now)
        removed = 0
        held: list[Held] = []
        for entry in os.scandir(self.root):
            if not entry.is_file():  # the cache's own store lives in a subdirectory
                continue
            with contextlib.suppress(OSError):
                info = entry.stat()
                until = pins.get(entry.name, 0.0)
                if not until and info.st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
                else:
                    held.append(Held(info.st_mtime, entry.path, info.st_size, until))
        total = sum(h.size for h in held)
        for blob in to_evict(held, self.max_bytes, str(self.root)):
            with contextlib.suppress(OSError):
                os.unlink(blob.key)
                removed += 1
                total -= blob.size
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
