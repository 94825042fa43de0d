"""How a `url` answer's images reach the client: `presigned`, an expiring GET on the store
itself (the gateway moves no result bytes), or `proxy`, the gateway's own signed URL
(`/v1/files/{id}/content`), which any replica streams from the store (private buckets; the
local directory always). Presigned URLs are made while the request is answered (`prepare`,
async: signing may fetch credentials) and read back when its body is written."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from gateway.results.base import ResultStore

log = logging.getLogger("gateway.results")

Mode = Literal["presigned", "proxy"]
_KEEP_URLS = 4096  # URLs made for answers being written: a few per request in flight
_FRESH_S = 30.0  # a URL made this recently is handed out again (its expiry barely moved)


class Delivery:
    def __init__(self, mode: Mode, ttl_s: int):
        self.mode: Mode = mode
        self.ttl_s = ttl_s
        self._urls: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def prepare(self, store: ResultStore, file_ids: Sequence[str]) -> None:
        """Presign the files of an answer about to be written (no-op when proxying)."""
        if self.mode != "presigned" or not file_ids:
            return
        now = time.monotonic()
        wanted = [f for f in file_ids if not self._fresh(f, now)]
        if not wanted:
            return
        try:
            # Never past the blob's own lifetime in its store (a cache blob's may be shorter).
            urls = await store.presign(wanted, min(self.ttl_s, store.ttl_s))
        except Exception as exc:  # the gateway's own URL still serves it
            log.warning("presigning failed, answering with proxied URLs: %s", exc)
            return
        for file_id, url in zip(wanted, urls or (), strict=False):
            self._urls[file_id] = (url, now)
            self._urls.move_to_end(file_id)
        while len(self._urls) > _KEEP_URLS:
            self._urls.popitem(last=False)

    def _fresh(self, file_id: str, now: float) -> bool:
        made = self._urls.get(file_id)
        return made is not None and now - made[1] < _FRESH_S

    def url(self, file_id: str) -> str | None:
        """The presigned URL `prepare` made; None: hand out the gateway's own URL."""
        if self.mode != "presigned":
            return None
        made = self._urls.get(file_id)
        if made is None or time.monotonic() - made[1] > _FRESH_S * 2:
            return None
        return made[0]
