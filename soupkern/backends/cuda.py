"""The CUDA backend: soupkern._cuda's kernels on torch CUDA tensors (contracts in device.py).

Every call validates its operands (InputError naming the operand), groups the tensors by the
widest access their addresses and dtypes allow (16-byte vectors when aligned), packs one launch
table per group (soupkern/kernels/table.py's format; fp64 weights), takes its device copy on the
current stream from soupkern/kernels/table_cache.py (copied once per content and stream, afresh
under CUDA-graph capture) and launches on that stream: one launch per group, normally one for
the whole call. The
arithmetic is the exact-arithmetic contract of csrc/soupkern.h in fp64 (csrc/cuda/convert.h).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from soupkern.backends.device import _check_n
from soupkern.errors import InputError
from soupkern.options import check_divisor

if TYPE_CHECKING:
    import torch

BUILD_INFO = Path(__file__).resolve().parent.parent / "_cuda_build.json"
_NO_DRIVER, _NO_DEVICE = 35, 100  # cudaErrorInsufficientDriver, cudaErrorNoDevice


def build_note() -> str | None:
    """Why the CUDA extension was not built, as recorded by setup.py (None if no record)."""
    try:
        info = json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return None
    return None if info.get("built") else str(info.get("reason"))


def _extension() -> Any:
    """The compiled module soupkern._cuda (ImportError when it was not built)."""
    return importlib.import_module("soupkern._cuda")


def _lowest_arch(archs: str) -> int:
    numbers = [int("".join(c for c in a if c.isdigit()) or 0) for a in archs.replace(",", ";").split(";") if a.strip()]
    return min(numbers) if numbers else 0


class CudaKernels:
    """DeviceKernels on CUDA tensors through soupkern._cuda (bit-identical to the C++ kernel)."""

    name = "cuda"

    def __init__(self) -> None:
        import torch

        _cuda = _extension()
        self._torch = torch
        self._ext = _cuda
        self._codes = {torch.float32: _cuda.F32, torch.float16: _cuda.F16, torch.bfloat16: _cuda.BF16,
                       torch.float64: _cuda.F64}

    # ---- validation ---------------------------------------------------------------------

    def _operand(self, t: object, what: str, device: torch.device | None = None, numel: int | None = None,
                 f64: bool = False) -> torch.Tensor:
        """A checked tensor operand: float32/float16/bfloat16, or float64 only where `f64` (and
        then only float64: the greedy ops' running sums)."""
        torch = self._torch
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
        if f64 and t.dtype != torch.float64:
            raise InputError(f"{what}: the running sum must be float64, got {t.dtype}")
        if not f64 and (t.dtype not in self._codes or t.dtype == torch.float64):
            raise InputError(f"{what}: unsupported dtype {t.dtype} (the CUDA kernels take float32, float16, bfloat16)")
        if t.device.type != "cuda":
            raise InputError(f"{what}: on {t.device}; the CUDA kernels need CUDA tensors")
        if device is not None and t.device != device:
            raise InputError(f"{what}: on {t.device}, the output is on {device}")
        if not t.is_contiguous():
            raise InputError(f"{what}: not contiguous (the kernels read and write flat memory; pass .contiguous())")
        if t.data_ptr() % t.element_size():
            raise InputError(f"{what}: address {t.data_ptr():#x} is not a multiple of its {t.element_size()}-byte element size")
        if numel is not None and t.numel() != numel:
            raise InputError(f"{what}: {t.numel()} elements, expected {numel}")
        return t

    def _rows(self, outs: Sequence[torch.Tensor], rows: Sequence[Sequence[torch.Tensor]], k: int,
              names: tuple[str, str], out_f64: bool = False, first_f64: bool = False) -> None:
        """Checks outs[t] and rows[t][j] (k each): same device, same element counts; float64
        exactly for the outputs where out_f64 and for rows[t][0] where first_f64."""
        if len(outs) != len(rows):
            raise InputError(f"{len(outs)} {names[0]} but {len(rows)} {names[1]}")
        if not outs:
            return
        device = self._operand(outs[0], f"{names[0]}[0]", f64=out_f64).device
        for t, (out, xs) in enumerate(zip(outs, rows)):
            self._operand(out, f"{names[0]}[{t}]", device, f64=out_f64)
            if len(xs) != k:
                raise InputError(f"{names[1]}[{t}]: {len(xs)} tensors, expected {k}")
            for j, x in enumerate(xs):
                self._operand(x, f"{names[1]}[{t}][{j}]", device, out.numel(), f64=first_f64 and j == 0)


    # ---- the contracts ------------------------------------------------------------------

    def weighted_sum(self, out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float],
                     divisor: float = 1.0) -> None:
        """out = round((sum_k weights[k] * inputs[k]) / divisor) (contract in device.py), one launch."""
        if len(inputs) < 1:
            raise InputError("weighted_sum needs at least one input")
        if len(weights) != len(inputs):
            raise InputError(f"{len(inputs)} inputs but {len(weights)} weights")
        if len(weights) > self._ext.MAX_INPUTS:
            raise InputError(f"{len(weights)} inputs; the CUDA kernels take at most {self._ext.MAX_INPUTS}")
        d = check_divisor(divisor)
        self._rows([out], [inputs], len(weights), ("out", "inputs"))
        self._run(self._ext.OP_WEIGHTED_SUM, [out], [inputs], weights, d)

    def multi_weighted_sum(self, outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                           weights: Sequence[float], divisor: float = 1.0) -> None:
        """outs[t] = round((sum_k weights[k] * inputs[t][k]) / divisor) for every t, one launch
        per access width."""
        if len(weights) < 1:
            raise InputError("multi_weighted_sum needs at least one weight")
        if len(weights) > self._ext.MAX_INPUTS:
            raise InputError(f"{len(weights)} inputs; the CUDA kernels take at most {self._ext.MAX_INPUTS}")
        d = check_divisor(divisor)
        self._rows(outs, inputs, len(weights), ("outs", "inputs"))
        self._run(self._ext.OP_WEIGHTED_SUM, outs, inputs, weights, d)

    def greedy_candidate(self, outs: Sequence[torch.Tensor], sums: Sequence[torch.Tensor],
                         xs: Sequence[torch.Tensor], n: int) -> None:
        """outs[t] = round((sums[t] + float64(xs[t])) / (n + 1)): fp64 sums, fp64 add, one IEEE
        fp64 division, one rounding to outs[t]'s dtype."""
        _check_n(n)
        self._greedy_checks(sums, xs)
        rows = [[s, x] for s, x in zip(sums, xs)]
        self._rows(outs, rows, 2, ("outs", "sums/xs"), first_f64=True)
        self._run(self._ext.OP_GREEDY_CANDIDATE, outs, rows, [1.0, 1.0], float(n + 1))

    def greedy_accept(self, sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> None:
        """sums[t] += float64(xs[t]) in fp64, in place."""
        self._greedy_checks(sums, xs)
        rows = [[s, x] for s, x in zip(sums, xs)]
        self._rows(sums, rows, 2, ("sums", "sums/xs"), out_f64=True, first_f64=True)
        self._run(self._ext.OP_GREEDY_ACCEPT, sums, rows, [1.0, 1.0], 1.0)

    def _greedy_checks(self, sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> None:
        if len(sums) != len(xs):
            raise InputError(f"{len(sums)} running sums but {len(xs)} candidate tensors")
        for t, s in enumerate(sums):
            if isinstance(s, self._torch.Tensor) and s.dtype != self._torch.float64:
                raise InputError(f"sums[{t}]: the running sum must be float64, got {s.dtype}")

    # ---- launch -------------------------------------------------------------------------

    def _run(self, op: int, outs: Sequence[torch.Tensor], rows: Sequence[Sequence[torch.Tensor]],
             weights: Sequence[float], divisor: float) -> None:
        from soupkern.kernels.table_cache import device_table

        torch, ext = self._torch, self._ext
        live = [t for t, out in enumerate(outs) if out.numel() > 0]
        if not live:
            return
        k = len(weights)
        device = outs[0].device
        out_ptrs = [outs[t].data_ptr() for t in live]
        out_codes = [self._codes[outs[t].dtype] for t in live]
        in_ptrs = [x.data_ptr() for t in live for x in rows[t]]
        in_codes = [self._codes[x.dtype] for t in live for x in rows[t]]
        numels = [outs[t].numel() for t in live]
        widths = ext.access_widths(out_ptrs, out_codes, in_ptrs, in_codes, k)
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            for width in sorted(set(widths), reverse=True):
                members = [i for i, w in enumerate(widths) if w == width]
                member_numels = [numels[i] for i in members]
                nbytes = ext.table_bytes(member_numels, k)
                host = np.empty(nbytes // 8, np.int64)  # the table's sections are 8-byte aligned
                member_codes = [in_codes[i * k + j] for i in members for j in range(k)]
                tiles = ext.pack_table(
                    host.ctypes.data, nbytes, width, [out_ptrs[i] for i in members], [out_codes[i] for i in members],
                    [in_ptrs[i * k + j] for i in members for j in range(k)], member_codes,
                    member_numels, [float(w) for w in weights], divisor, op)
                table = device_table(host, device)
                ext.launch(op, width, table.data_ptr(), len(members), k, tiles, device.index, stream,
                           input_dtype=shared_input_dtype(op == ext.OP_WEIGHTED_SUM, member_codes))


def shared_input_dtype(weighted_sum: bool, codes: Sequence[int]) -> int:
    """The dtype code every input of a weighted-sum launch has (its kernel is specialized for
    it), or -1: a mix, or a greedy op (their inputs are an fp64 sum and a candidate)."""
    return codes[0] if weighted_sum and codes and all(c == codes[0] for c in codes) else -1


def load() -> tuple[CudaKernels | None, str]:
    """The CUDA kernels if this machine can run them, and why (not). Never raises."""
    try:
        _cuda = _extension()
    except ImportError as e:
        note = build_note()
        if note is not None:
            return None, f"not built ({note})"
        return None, f"not built: soupkern._cuda cannot be imported ({e}); reinstall with nvcc on PATH"
    try:
        count, code, message = _cuda.device_status()
        if count == 0:
            if code == _NO_DRIVER:
                return None, f"no CUDA GPU (no usable CUDA driver: {message})"
            if code in (0, _NO_DEVICE):
                return None, "no CUDA GPU"
            return None, f"no CUDA GPU (cudaGetDeviceCount: {message})"
        try:
            import torch
        except ImportError as e:
            return None, f"torch is not installed ({e})"
        if torch.version.cuda is None:
            return None, f"torch {torch.__version__} has no CUDA"
        if not torch.cuda.is_available():
            return None, f"torch {torch.__version__} sees no CUDA GPU"
        major, minor = torch.cuda.get_device_capability(0)
        if major * 10 + minor < _lowest_arch(_cuda.archs):
            return None, (f"GPU compute capability {major}.{minor} is below the built architectures "
                          f"({_cuda.archs}); rebuild with SOUPKERN_CUDA_ARCHS")
        kernels = CudaKernels()
        return kernels, f"CUDA kernels for {_cuda.archs}, {count} GPU(s), {torch.cuda.get_device_name(0)}"
    except Exception as e:  # noqa: BLE001 - a probe reports, it does not fail
        return None, f"{type(e).__name__}: {e}"
