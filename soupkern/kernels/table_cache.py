"""Device copies of launch tables (soupkern/kernels/table.py's format), cached by content.

Imports torch and numpy only (the CUDA backend uses it without Triton).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

CACHE_BYTES = 8 << 20  # device tables kept, in all

_lock = threading.Lock()
_tables: OrderedDict[tuple[torch.device, int, bytes], torch.Tensor] = OrderedDict()
_cached_bytes = 0


def _copy(words: np.ndarray, device: torch.device) -> torch.Tensor:
    src = torch.from_numpy(words)
    if device.type == "cuda":  # pinned + non_blocking: a pageable copy would block the host on the stream
        return src.pin_memory().to(device, non_blocking=True)  # torch keeps the pinned block until copied
    return src.to(device)


def device_table(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """`host` (a table as int64 words) as an int64 tensor on `device`, copied on the current
    stream. Cached per (device, current stream, contents): the same contents (addresses, sizes,
    weights, divisor) give the same table, so a hit is always valid and a loop relaunching on the
    same tensors skips the host-to-device copy; a table is only reused on the stream whose
    allocator owns it. At most CACHE_BYTES are kept, least recently used dropped first; safe to
    call from several threads. While the current stream captures a CUDA graph the cache is not
    used (a cached table could be dropped while the graph still reads it): the copy is made afresh."""
    global _cached_bytes
    words = np.ascontiguousarray(host, dtype=np.int64)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return _copy(words, device)
        stream = torch.cuda.current_stream(device).cuda_stream
    else:
        stream = 0
    key = (device, stream, words.tobytes())
    with _lock:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
            return table
    table = _copy(words, device)
    if words.nbytes <= CACHE_BYTES:
        with _lock:
            if key not in _tables:
                while _tables and _cached_bytes + words.nbytes > CACHE_BYTES:
                    _cached_bytes -= _tables.popitem(last=False)[1].numel() * 8
                _tables[key] = table
                _cached_bytes += words.nbytes
    return table
