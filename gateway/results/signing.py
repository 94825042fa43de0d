"""The gateway's own result URLs: `/v1/files/{id}/content?expires&signature`, an HMAC over
the id and the expiry with GATEWAY_SIGNING_KEY (which replicas share), so any replica
verifies what any other signed."""

from __future__ import annotations

import hashlib
import hmac
import time


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
