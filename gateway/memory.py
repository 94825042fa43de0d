"""The process's allocator policy for image-sized buffers.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
which multi-megabyte image buffers come from per-thread heap arenas that fragment and are
seldom given back: over a 10-minute soak the gateway's RSS grew 18 %. Pinning the threshold
at 1 MiB keeps every image buffer in its own mapping, returned to the system when freed:
RSS stayed flat (-7 %) and 30 % lower, for about 10 % of throughput (bench/overhead.py
--soak). On other C libraries this does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("gateway")

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 1 << 20


def return_large_buffers(threshold: int = THRESHOLD) -> bool:
    """Whether the policy is in force (False off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if not applied:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused: RSS may creep under load")
    return applied
