"""Launch configurations of the Triton kernels, measured once per process on the GPU instead of
fixed: the weighted sums' (elements per program, warps) per (device, input dtype, output dtype),
and soup-linear's blocks, warps and pipeline stages per (device, dtypes, shapes; batch sizes in
power-of-two buckets). Timed on the GPU alone: the launches are queued behind a GPU busy-wait.

A weighted-sum configuration changes speed only: an element's arithmetic does not depend on which
program computes it, so every candidate gives the same bits. Soup-linear's candidates may differ
in the fp32 summation order of the matmul, as any two matmul tilings do (its contract allows it). The weighted-sum measurement runs each of
`CONFIGS` on synthetic tensors of about `TUNE_BYTES` moved (K = 4 inputs; K is a run-time
argument, not a compile-time one, so it does not key the choice); soup-linear times its own call
(it allocates its output, so repeating it changes nothing). Each candidate runs once to compile
and three times timed with CUDA events; the lowest median is kept (the first listed on a tie).
Under the Triton interpreter (TRITON_INTERPRET=1, tests) nothing is measured: fixed defaults.
"""

from __future__ import annotations

import math
import statistics
import threading
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence, TypeVar

if TYPE_CHECKING:
    import torch

Config = tuple[int, int]  # (BLOCK, num_warps)
Key = tuple[str, int, int]  # (device, input dtype code or -1 for a mix, output dtype code)
Measure = Callable[[Key, tuple[Config, ...]], dict[Config, float]]
C = TypeVar("C", bound=Hashable)

CONFIGS: tuple[Config, ...] = ((2048, 4), (1024, 4), (2048, 8), (4096, 8), (8192, 8))  # the default first
TUNE_BYTES = 192 << 20
TUNE_K = 4

_lock = threading.RLock()
_chosen: dict[Hashable, Any] = {}


def tuned(key: Hashable, configs: Sequence[C], measure: Callable[[Sequence[C]], dict[C, float]]) -> C:
    """The configuration of `configs` with the lowest `measure` time (seconds per candidate),
    measured on the first call for `key` and cached for the process (one measurement per key,
    even with several threads). While a CUDA graph is being captured nothing can be measured:
    the first configuration, not cached."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return configs[0]
    with _lock:
        if key not in _chosen:
            times = measure(configs)
            _chosen[key] = min(configs, key=lambda c: times[c])
        return _chosen[key]  # type: ignore[no-any-return]


def launch_config(device: torch.device, in_code: int, out_code: int, *, measure: Measure | None = None) -> Config:
    """(BLOCK, num_warps) for a weighted sum on `device` whose inputs have dtype code `in_code`
    (-1: a mix) and whose output has `out_code`: measured on first use (`measure`, default the
    CUDA-event timing below) and cached for the process; the interpreter's default when
    interpreted and no `measure` is given."""
    from soupkern.kernels.weighted_sum import GPU_WARPS, INTERPRETER_BLOCK, interpreted

    if measure is None and interpreted():
        return INTERPRETER_BLOCK, GPU_WARPS
    key = (str(device), in_code, out_code)
    return tuned(key, CONFIGS, lambda configs: (measure or _measure)(key, tuple(configs)))


def chosen() -> dict[Hashable, Any]:
    """The configurations measured so far in this process (for benchmark reports)."""
    with _lock:
        return dict(_chosen)


CALLS_PER_SAMPLE = 5
SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU busy-wait queued first, so the timed launches are all queued before they run


def time_calls(device: torch.device, run: Callable[[C], object], configs: Sequence[C]) -> dict[C, float]:
    """Median GPU seconds of `run(config)` on `device` per config: once untimed (compiles), then
    three samples of CALLS_PER_SAMPLE calls between CUDA events, each sample queued behind a GPU
    busy-wait so that host launch overhead is not timed. A config that fails (e.g. out of
    resources or memory) gets an infinite time."""
    import torch

    sleep = getattr(torch.cuda, "_sleep", None)
    times = {}
    with torch.cuda.device(device):
        for config in configs:
            try:
                run(config)
                samples = []
                for _ in range(3):
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    if sleep is not None:
                        sleep(SLEEP_CYCLES)
                    start.record()
                    for _ in range(CALLS_PER_SAMPLE):
                        run(config)
                    stop.record()
                    stop.synchronize()
                    samples.append(start.elapsed_time(stop) / 1e3 / CALLS_PER_SAMPLE)
                times[config] = statistics.median(samples)
            except Exception:  # noqa: BLE001 - a candidate that cannot run is not chosen
                times[config] = math.inf
    return times


def _measure(key: Key, configs: tuple[Config, ...]) -> dict[Config, float]:
    import torch

    from soupkern import dtype_codes
    from soupkern.kernels.weighted_sum import weighted_sum

    device, in_code, out_code = torch.device(key[0]), key[1], key[2]
    dtypes = {dtype_codes.F32: torch.float32, dtype_codes.F16: torch.float16, dtype_codes.BF16: torch.bfloat16}
    in_dtypes = [dtypes[in_code]] * TUNE_K if in_code >= 0 else [torch.float32, torch.bfloat16] * (TUNE_K // 2)
    per_element = sum(torch.empty((), dtype=d).element_size() for d in in_dtypes) + dtypes[out_code].itemsize
    n = max(TUNE_BYTES // per_element // 8192 * 8192, 8192)
    try:
        xs = [torch.ones(n, dtype=d, device=device) for d in in_dtypes]
        out = torch.empty(n, dtype=dtypes[out_code], device=device)
    except torch.cuda.OutOfMemoryError:  # no room to measure: the default
        return {c: 0.0 for c in configs}
    weights = [1.0 / TUNE_K] * TUNE_K
    return time_calls(device, lambda c: weighted_sum(out, xs, weights, block=c[0], num_warps=c[1]), configs)
