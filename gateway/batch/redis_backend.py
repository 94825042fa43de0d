"""Batches shared by every replica through Redis: records in hashes, each batch's lines in a
Stream with one consumer group that every replica reads (a line goes to one worker), and
the lines a dead worker had taken reclaimed with XAUTOCLAIM once they sit idle. A worker
that is alive touches its lines (XCLAIM to itself) so that none is reclaimed from under it.

Keys of one batch share a hash tag (`{b:<id>}`), so its scripts run on one slot."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.batch.model import ACTIVE, BatchState, Entry, FileMeta

# status, then the allowed ones; the patch as JSON. Counters stay in their own fields.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
local allowed = false
for i = 3, #ARGV do if ARGV[i] == status then allowed = true end end
if not allowed then return false end
local doc = cjson.decode(redis.call('HGET', KEYS[1], 'doc'))
for k, v in pairs(cjson.decode(ARGV[2])) do doc[k] = v end
doc['status'] = ARGV[1]
redis.call('HSET', KEYS[1], 'doc', cjson.encode(doc), 'status', ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""

# line, ok ("1"/"0"), spend in micro-USD: counted the first time only.
_DONE = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[2] == '1' and 'completed' or 'failed', 1)
redis.call('HINCRBY', KEYS[1], 'spend_micro', ARGV[3])
return 1
"""

# holder, limit, ttl in ms: slots of one name, each lapsing unless renewed (a dead holder's).
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and
   redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return 1
"""

_RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
end
return 1
"""

_HOLDERS = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

_GROUP = "workers"


def _state(pairs: Any) -> BatchState | None:
    if not pairs:
        return None
    if isinstance(pairs, list):  # a script's HGETALL: a flat list
        pairs = dict(zip(pairs[::2], pairs[1::2], strict=True))
    doc = orjson.loads(pairs["doc"])
    if not isinstance(doc.get("errors"), list):
        doc["errors"] = []  # cjson writes an empty list as {}
    if not isinstance(doc.get("metadata"), dict) or not doc["metadata"]:
        doc["metadata"] = doc.get("metadata") or None
    state = BatchState.loads(doc)
    state.status = pairs["status"]
    for name in ("completed", "failed", "spend_micro"):
        setattr(state, name, int(pairs.get(name, 0) or 0))
    return state


class RedisBatchRecords:
    durable = True

    def __init__(self, client: aioredis.Redis, prefix: str):
        self._r = client
        self._p = f"{prefix}:batch"
        self._transition = client.register_script(_TRANSITION)
        self._done = client.register_script(_DONE)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._holders = client.register_script(_HOLDERS)

    def _batch(self, batch_id: str, *parts: str) -> str:
        return ":".join((self._p, f"{{b:{batch_id}}}", *parts))

    async def start(self) -> None:
        return None

    async def put_file(self, meta: FileMeta) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.set(f"{self._p}:file:{meta.id}", orjson.dumps(meta.dumps()))
        pipe.zadd(f"{self._p}:files:{meta.account}", {meta.id: meta.created_at})
        await pipe.execute()

    async def get_file(self, file_id: str) -> FileMeta | None:
        raw = await self._r.get(f"{self._p}:file:{file_id}")
        return FileMeta.loads(orjson.loads(raw)) if raw else None

    async def list_files(self, account: str) -> list[FileMeta]:
        ids = await self._r.zrevrange(f"{self._p}:files:{account}", 0, -1)
        if not ids:
            return []
        raws = await self._r.mget([f"{self._p}:file:{i}" for i in ids])
        return [FileMeta.loads(orjson.loads(r)) for r in raws if r]

    async def delete_file(self, file_id: str) -> bool:
        meta = await self.get_file(file_id)
        if meta is None:
            return False
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(f"{self._p}:file:{file_id}")
        pipe.zrem(f"{self._p}:files:{meta.account}", file_id)
        await pipe.execute()
        return True

    async def create(self, state: BatchState) -> None:
        doc = state.dumps()
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(
            self._batch(state.id),
            mapping={
                "doc": orjson.dumps(doc),
                "status": state.status,
                "completed": 0,
                "failed": 0,
                "spend_micro": 0,
            },
        )
        pipe.zadd(f"{self._p}:batches:{state.account}", {state.id: state.created_at})
        pipe.sadd(f"{self._p}:active", state.id)
        await pipe.execute()

    async def get(self, batch_id: str) -> BatchState | None:
        return _state(await self._r.hgetall(self._batch(batch_id)))

    async def list(self, account: str) -> list[BatchState]:
        ids = await self._r.zrevrange(f"{self._p}:batches:{account}", 0, -1)
        states = [await self.get(i) for i in ids]
        return [s for s in states if s is not None]

    async def active(self) -> list[str]:
        return sorted(await self._r.smembers(f"{self._p}:active"))

    async def transition(
        self, batch_id: str, allowed: Sequence[str], status: str, **changes: Any
    ) -> BatchState | None:
        got = await self._transition(
            keys=[self._batch(batch_id)],
            args=[status, orjson.dumps(changes), *allowed],
        )
        state = _state(got) if got else None
        if state is not None and status not in ACTIVE:
            await self._r.srem(f"{self._p}:active", batch_id)
        return state

    async def mark_done(self, batch_id: str, line: int, ok: bool, spend_micro: int) -> bool:
        counted = await self._done(
            keys=[self._batch(batch_id), self._batch(batch_id, "done")],
            args=[line, "1" if ok else "0", spend_micro],
        )
        return bool(counted)

    async def outcomes(self, batch_id: str) -> dict[int, bool]:
        raw = await self._r.hgetall(self._batch(batch_id, "done"))
        return {int(k): v == "1" for k, v in raw.items()}

    async def acquire(self, name: str, holder: str, limit: int, ttl_s: float) -> bool:
        got = await self._acquire(
            keys=[f"{self._p}:lease:{name}"], args=[holder, limit, int(ttl_s * 1000)]
        )
        return bool(got)

    async def renew(self, name: str, holder: str, ttl_s: float) -> None:
        await self._renew(keys=[f"{self._p}:lease:{name}"], args=[holder, int(ttl_s * 1000)])

    async def release(self, name: str, holder: str) -> None:
        await self._r.zrem(f"{self._p}:lease:{name}", holder)

    async def holders(self, name: str) -> int:
        return int(await self._holders(keys=[f"{self._p}:lease:{name}"], args=[]))


def _entry(entry_id: str, fields: dict[str, str]) -> Entry:
    return Entry(entry_id, int(fields["line"]), int(fields["offset"]), int(fields["length"]))


class RedisLineQueue:
    def __init__(self, client: aioredis.Redis, prefix: str):
        self._r = client
        self._p = f"{prefix}:batch"

    def _key(self, batch_id: str) -> str:
        return f"{self._p}:{{b:{batch_id}}}:queue"

    async def enqueue(self, batch_id: str, entries: Sequence[Entry]) -> None:
        key = self._key(batch_id)
        with contextlib.suppress(ResponseError):  # BUSYGROUP: made by an earlier call
            await self._r.xgroup_create(key, _GROUP, id="0", mkstream=True)
        for start in range(0, len(entries), 500):
            pipe = self._r.pipeline(transaction=False)
            for e in entries[start : start + 500]:
                pipe.xadd(key, {"line": e.line, "offset": e.offset, "length": e.length})
            await pipe.execute()

    async def take(self, batch_id: str, consumer: str) -> Entry | None:
        try:
            got = await self._r.xreadgroup(_GROUP, consumer, {self._key(batch_id): ">"}, count=1)
        except ResponseError:  # NOGROUP: nothing was ever queued, or the batch was dropped
            return None
        for _stream, messages in got or []:
            for entry_id, fields in messages:
                return _entry(entry_id, fields)
        return None

    async def reclaim(self, batch_id: str, consumer: str, idle_s: float) -> list[Entry]:
        try:
            got = await self._r.xautoclaim(
                self._key(batch_id), _GROUP, consumer, int(idle_s * 1000), "0-0", count=20
            )
        except ResponseError:
            return []
        return [_entry(i, f) for i, f in got[1] if f]

    async def touch(self, batch_id: str, consumer: str, ids: Sequence[str]) -> None:
        if ids:
            with contextlib.suppress(ResponseError):
                await self._r.xclaim(
                    self._key(batch_id), _GROUP, consumer, 0, list(ids), justid=True
                )

    async def ack(self, batch_id: str, entry_id: str) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(self._key(batch_id), _GROUP, entry_id)
        pipe.xdel(self._key(batch_id), entry_id)
        await pipe.execute()

    async def drop(self, batch_id: str) -> None:
        await self._r.delete(self._key(batch_id))
