"""Launch configurations of the Triton weighted sums: (elements per program, warps), measured once
per (device, input dtype, output dtype) on the GPU instead of fixed.

Every configuration gives the same bits (an element's arithmetic does not depend on which program
computes it), so the choice changes speed only. The measurement runs each of `CONFIGS` on
synthetic tensors of about `TUNE_BYTES` moved (K = 4 inputs; K is a run-time argument, not a
compile-time one, so it does not key the choice), once to compile and three times timed with
CUDA events, and keeps the lowest median (the first listed on a tie). Under the Triton
interpreter (TRITON_INTERPRET=1, tests) nothing is measured: the interpreter's fixed block.
"""

from __future__ import annotations

import statistics
import threading
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

Config = tuple[int, int]  # (BLOCK, num_warps)
Key = tuple[str, int, int]  # (device, input dtype code or -1 for a mix, output dtype code)
Measure = Callable[[Key, tuple[Config, ...]], dict[Config, float]]

CONFIGS: tuple[Config, ...] = ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8))
TUNE_BYTES = 192 << 20
TUNE_K = 4

_lock = threading.Lock()
_chosen: dict[Key, Config] = {}


def launch_config(device: torch.device, in_code: int, out_code: int, *, measure: Measure | None = None) -> Config:
    """(BLOCK, num_warps) for a weighted sum on `device` whose inputs have dtype code `in_code`
    (-1: a mix) and whose output has `out_code`: measured on first use (`measure`, default the
    CUDA-event timing below) and cached for the process; the interpreter's default when
    interpreted and no `measure` is given."""
    from soupkern.kernels.weighted_sum import GPU_WARPS, INTERPRETER_BLOCK, interpreted

    if measure is None and interpreted():
        return INTERPRETER_BLOCK, GPU_WARPS
    key = (str(device), in_code, out_code)
    with _lock:  # one measurement per key, even with several threads launching
        if key not in _chosen:
            times = (measure or _measure)(key, CONFIGS)
            _chosen[key] = min(CONFIGS, key=lambda c: times[c])
        return _chosen[key]


def chosen() -> dict[Key, Config]:
    """The configurations measured so far in this process (for benchmark reports)."""
    with _lock:
        return dict(_chosen)


def _measure(key: Key, configs: tuple[Config, ...]) -> dict[Config, float]:
    import torch

    from soupkern import dtype_codes
    from soupkern.kernels.weighted_sum import weighted_sum

    device, in_code, out_code = torch.device(key[0]), key[1], key[2]
    dtypes = {dtype_codes.F32: torch.float32, dtype_codes.F16: torch.float16, dtype_codes.BF16: torch.bfloat16}
    in_dtypes = [dtypes[in_code]] * TUNE_K if in_code >= 0 else [torch.float32, torch.bfloat16] * (TUNE_K // 2)
    per_element = sum(torch.empty((), dtype=d).element_size() for d in in_dtypes) + dtypes[out_code].itemsize
    n = max(TUNE_BYTES // per_element // 8192 * 8192, 8192)
    with torch.cuda.device(device):
        xs = [torch.ones(n, dtype=d, device=device) for d in in_dtypes]
        out = torch.empty(n, dtype=dtypes[out_code], device=device)
        weights = [1.0 / TUNE_K] * TUNE_K
        times = {}
        for block, warps in configs:
            samples = []
            for r in range(4):  # the first run compiles
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                weighted_sum(out, xs, weights, block=block, num_warps=warps)
                stop.record()
                stop.synchronize()
                if r:
                    samples.append(start.elapsed_time(stop) / 1e3)
            times[(block, warps)] = statistics.median(samples)
    return times
