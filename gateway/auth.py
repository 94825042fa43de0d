"""Client keys: `Authorization: Bearer <key>` on the OpenAI routes, as the SDKs send it.

Keys are held only as SHA-256 digests and every stored digest is compared, in constant
time, so neither the keys nor which one nearly matched can be learnt from the process or
from response timing. Result files are not covered: their signed URL is the credential
(browsers and `<img>` tags fetch them without headers)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import Unauthorized, error_response

# Result images: their signed URL is the credential. Uploaded and batch files need the key.
_OPEN_PREFIXES = ("/v1/files/img_",)


def key_id(key: str) -> str:
    """A name for a key that is safe to log: a prefix of its digest."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


class ClientKeys:
    """Keys from GATEWAY_API_KEYS (named by `key_id`) and named keys from the config, which
    holds only their SHA-256 (`clients.keys.<name>.sha256`)."""

    def __init__(self, keys: Iterable[str], named: Mapping[str, str] | None = None):
        self._digests = [(key_id(k), hashlib.sha256(k.encode()).digest()) for k in keys]
        self._digests += [
            (name, bytes.fromhex(hexdigest)) for name, hexdigest in (named or {}).items()
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: str | None) -> str:
        """The key id of a valid `Bearer` header; Unauthorized otherwise."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized(
                "No API key provided: send 'Authorization: Bearer <key>' "
                "(the OpenAI SDKs do this with api_key=...)."
            )
        digest = hashlib.sha256(presented.strip().encode()).digest()
        found = ""
        for name, stored in self._digests:  # no early exit: the time does not say which key
            if hmac.compare_digest(digest, stored):
                found = name
        if not found:
            raise Unauthorized("Incorrect API key provided.")
        return found


class ClientKeyMiddleware:
    """Refuses /v1 requests without a valid client key, when keys are configured."""

    def __init__(self, app: ASGIApp, keys: ClientKeys):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not self.keys.enabled
            or not path.startswith("/v1/")
            or path.startswith(_OPEN_PREFIXES)
        ):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        try:
            scope.setdefault("state", {})["key_id"] = self.keys.identify(header.decode("latin-1"))
        except Unauthorized as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)
