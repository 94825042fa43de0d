"""The benchmark's baseline: a bare reverse proxy, uvicorn + one pooled httpx client, that
passes every request through to one upstream and the answer back, with no parsing, routing
or image work. It keeps the Host header (as nginx's `proxy_set_header Host $host` does), so
the fal emulator's queue and file URLs point back through the proxy.

    python -m bench.proxy --upstream http://127.0.0.1:8091 --port 8092
"""

from __future__ import annotations

import argparse

import httpx
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

# Hop-by-hop headers, and the length, which the new message sets itself.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"}


def create_proxy(upstream: str) -> ASGIApp:
    client = httpx.AsyncClient(
        base_url=upstream, timeout=60, limits=httpx.Limits(max_connections=None)
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()  # startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # shutdown
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        request = Request(scope, receive)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        answer = await client.request(
            request.method,
            target,
            headers=[(k, v) for k, v in request.headers.raw if k.decode() not in _HOP],
            content=await request.body(),
        )
        # The body is already decoded by httpx, so its encoding header goes too.
        passed = {
            k: v for k, v in answer.headers.items() if k not in _HOP and k != "content-encoding"
        }
        await Response(answer.content, answer.status_code, passed)(scope, receive, send)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8092)
    args = parser.parse_args()
    uvicorn.run(
        create_proxy(args.upstream),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=75,  # as the gateway and the emulators: no keep-alive races
    )


if __name__ == "__main__":
    main()
