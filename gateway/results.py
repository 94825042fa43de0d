"""Result images for `response_format=url`: stored by the gateway and handed out as its own
signed, expiring URL (never the provider's, which expires and names the provider)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import time
from pathlib import Path

from gateway.imaging import CONTENT_TYPES

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
        return hmac.compare_digest(self.signature(file_id, expires), signature)


class FileResultStore:
    """One file per result under `root`; a sweep deletes those past their time to live."""

    def __init__(self, root: str | Path, ttl_s: int):
        self.root = Path(root)
        self.ttl_s = ttl_s

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def content_type(file_id: str) -> str | None:
        match = _ID.match(file_id)
        return CONTENT_TYPES[match[1]] if match else None

    async def put(self, data: bytes, output_format: str) -> str:
        file_id = f"img_{secrets.token_urlsafe(24)}.{output_format}"
        await asyncio.to_thread(self._write, self.root / file_id, data)
        return file_id

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see a half-written file

    def path(self, file_id: str) -> Path | None:
        if not _ID.match(file_id):
            return None
        path = self.root / file_id
        return path if path.is_file() else None

    def sweep(self) -> int:
        cutoff = time.time() - self.ttl_s
        removed = 0
        for entry in os.scandir(self.root):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    async def sweep_forever(self, every_s: float = 60.0) -> None:
        while True:
            await asyncio.to_thread(self.sweep)
            await asyncio.sleep(every_s)
