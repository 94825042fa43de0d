"""Every route's handler and dependencies are coroutines. FastAPI runs a plain `def`
dependency on anyio's thread pool: a thread hop (and a wait for one of its 40 tokens, shared
with the spooled multipart writes) per request for what is an attribute read, which under a
thousand uploads in flight is most of the pool's traffic."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from gateway.app import ROUTE_MODULES


def _calls(dependant: Dependant) -> Iterator[Dependant]:
    for sub in dependant.dependencies:
        yield sub
        yield from _calls(sub)


def test_no_route_runs_on_the_thread_pool() -> None:
    sync: list[str] = []
    routes = 0
    for module in ROUTE_MODULES:
        for route in module.router.routes:
            if not isinstance(route, APIRoute):
                continue
            routes += 1
            if not inspect.iscoroutinefunction(route.endpoint):
                sync.append(f"{route.path}: the handler")
            for sub in _calls(route.dependant):
                if sub.call is not None and not inspect.iscoroutinefunction(sub.call):
                    sync.append(f"{route.path}: {sub.call.__module__}.{sub.call.__qualname__}")
    assert routes > 20  # the walk saw the app's routes
    assert not sync, sorted(set(sync))
