"""Where batch files live: uploaded JSONL inputs, the output and error files a batch writes,
and each line's answer until the batch is finalized. Beside the results, in the same backend
(a local directory, or the bucket under `batch/`), so every replica reads every replica's.

Files are streamed in and out in bounded chunks: a 200 MB input is never held whole, and a
worker reads one line of it by its byte range."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gateway.errors import ResultsUnavailable
from gateway.results.base import StoreHealth, unavailable

CHUNK = 1 << 20
T = TypeVar("T")


class BatchBlobs(Protocol):
    async def write(self, name: str, chunks: AsyncIterator[bytes]) -> int:
        """Store the chunks under `name` (replacing it whole, never half); the bytes written."""
        ...

    async def read_range(self, name: str, start: int, length: int) -> bytes: ...

    def stream(self, name: str) -> AsyncIterator[bytes]:
        """The blob in chunks; FileNotFoundError when there is none."""
        ...

    async def delete(self, name: str) -> None: ...

    async def delete_prefix(self, prefix: str) -> None: ...


async def one(data: bytes) -> AsyncIterator[bytes]:
    yield data


class LocalBatchBlobs:
    def __init__(self, root: str | Path):
        self._root = Path(root)

    def _path(self, name: str) -> Path:
        path = (self._root / name).resolve()
        if self._root.resolve() not in path.parents:
            raise ValueError(f"blob name outside the store: {name!r}")
        return path

    async def write(self, name: str, chunks: AsyncIterator[bytes]) -> int:
        path = self._path(name)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        handle = await asyncio.to_thread(open, temp, "wb")
        size = 0
        try:
            async for chunk in chunks:
                await asyncio.to_thread(handle.write, chunk)
                size += len(chunk)
            await asyncio.to_thread(handle.close)
            await asyncio.to_thread(os.replace, temp, path)
        except BaseException:
            handle.close()
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return size

    async def read_range(self, name: str, start: int, length: int) -> bytes:
        def read() -> bytes:
            with open(self._path(name), "rb") as handle:
                handle.seek(start)
                return handle.read(length)

        return await asyncio.to_thread(read)

    async def stream(self, name: str) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(open, self._path(name), "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, CHUNK):
                yield chunk
        finally:
            handle.close()

    async def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, self._path(name))

    async def delete_prefix(self, prefix: str) -> None:
        import shutil

        await asyncio.to_thread(shutil.rmtree, self._path(prefix), True)


class S3BatchBlobs:
    """Blobs under `base` in the results bucket; multipart uploads for large ones."""

    def __init__(self, client: Any, base: str, timeout_s: float, health: StoreHealth):
        self._client = client
        self._base = base.strip("/") + "/"
        self._timeout_s = timeout_s
        self._health = health

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        from obstore.exceptions import BaseError

        try:
            async with asyncio.timeout(self._timeout_s):
                result = await make()
        except FileNotFoundError:
            raise
        except (BaseError, OSError, TimeoutError) as exc:
            self._health.failed(exc)
            raise unavailable(exc) from exc
        self._health.succeeded()
        return result

    async def write(self, name: str, chunks: AsyncIterator[bytes]) -> int:
        import obstore

        size = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in chunks:
                size += len(chunk)
                yield chunk

        try:
            # Not bounded by the call timeout: a large upload streams as fast as its client.
            await obstore.put_async(self._client, self._base + name, counted(), chunk_size=8 << 20)
        except (OSError, TimeoutError) as exc:
            raise unavailable(exc) from exc
        except Exception as exc:
            if isinstance(exc, ResultsUnavailable) or not _store_error(exc):
                raise
            self._health.failed(exc)
            raise unavailable(exc) from exc
        return size

    async def read_range(self, name: str, start: int, length: int) -> bytes:
        import obstore

        got = await self._call(
            lambda: obstore.get_range_async(
                self._client, self._base + name, start=start, length=length
            )
        )
        return bytes(got)

    async def stream(self, name: str) -> AsyncIterator[bytes]:
        import obstore

        got = await self._call(lambda: obstore.get_async(self._client, self._base + name))
        stream = got.stream(min_chunk_size=CHUNK)
        while True:
            try:
                async with asyncio.timeout(self._timeout_s):
                    chunk = await stream.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                if not _store_error(exc):
                    raise
                raise unavailable(exc) from exc
            yield bytes(chunk)

    async def delete(self, name: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            await self._call(lambda: obstore.delete_async(self._client, self._base + name))

    async def delete_prefix(self, prefix: str) -> None:
        import obstore

        keys: list[str] = []
        async for page in obstore.list(self._client, self._base + prefix, chunk_size=1000):
            keys += [str(item["path"]) for item in page]
        for start in range(0, len(keys), 1000):
            await self._call(
                lambda part=keys[start : start + 1000]: obstore.delete_async(self._client, part)
            )


def _store_error(exc: BaseException) -> bool:
    from obstore.exceptions import BaseError

    return isinstance(exc, (BaseError, OSError, TimeoutError))
