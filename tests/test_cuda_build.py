"""The CUDA build step (setup.py) and the extension it makes, on any machine.

Where nvcc exists the extension must have been built, import without a GPU and report "no GPU"
instead of failing; the decisions of the build step (SOUPKERN_BUILD_CUDA, CUDA_HOME, the nvcc
on PATH, SOUPKERN_CUDA_ARCHS) are checked by calling its helper functions directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import soupkern.backends.cuda as cuda_backend

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc")


@pytest.fixture(scope="module")
def setup_py() -> ModuleType:
    """setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("soupkern_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA extension is not built here")
def test_extension_built_and_imports_without_gpu() -> None:
    from soupkern import _cuda  # type: ignore[attr-defined]

    assert _cuda.runtime_version() >= 12000
    count, code, message = _cuda.device_status()
    if not torch.cuda.is_available():
        assert _cuda.device_count() == 0
        assert count == 0 and code in (35, 100), (code, message)
        kernels, reason = cuda_backend.load()
        assert kernels is None and reason.startswith("no CUDA GPU")
    assert _cuda.archs  # the architectures it was built for
    info = json.loads(cuda_backend.BUILD_INFO.read_text())
    assert info["built"] is True


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA extension is not built here")
def test_extension_does_not_link_libcuda() -> None:
    """Linked against the static runtime only: no libcuda / libcudart at load time."""
    from soupkern import _cuda  # type: ignore[attr-defined]

    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    needed = subprocess.run([readelf, "-d", _cuda.__file__], capture_output=True, text=True, check=True).stdout
    assert "libcuda" not in needed and "libcudart" not in needed


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA extension is not built here")
def test_table_packing_and_argument_errors() -> None:
    import numpy as np

    from soupkern import _cuda  # type: ignore[attr-defined]

    # two tensors, K = 2: one aligned bf16 (8-wide access), one with an fp32 input at an odd address
    assert _cuda.access_widths([16, 32], [_cuda.BF16, _cuda.F32], [0, 16, 48, 4], [_cuda.BF16] * 2 + [_cuda.F32] * 2, 2) == [8, 1]
    assert _cuda.access_widths([16], [_cuda.F32], [32, 64], [_cuda.BF16, _cuda.F32], 2) == [4]
    tile = _cuda.TILE
    nbytes = _cuda.table_bytes([tile + 1, 0], 2)
    buf = np.zeros(nbytes, np.uint8)
    tiles = _cuda.pack_table(buf.ctypes.data, nbytes, 1, [16, 32], [_cuda.BF16, _cuda.F32], [0, 16, 48, 4],
                             [_cuda.BF16] * 2 + [_cuda.F32] * 2, [tile + 1, 0], [0.5, 1 / 3], 3.0)
    assert tiles == 2 and nbytes == 8 * (6 + 2 + 2 + 2) + 8 + 8
    words = buf.view(np.int64)
    assert list(words[:6]) == [0, 16, 16, 48, 4, 32]  # rows: input addresses, then the output's
    assert list(words[6:8]) == [tile + 1, 0]  # element counts
    assert buf[64:80].view(np.int32).tolist() == [0, 0, 0, 1]  # block map: (tensor, chunk); the empty tensor has none
    assert buf[80:96].view(np.float64).tolist() == [0.5, 1 / 3]  # fp64 weights, as given
    assert buf[96:104].tolist() == [_cuda.BF16] * 3 + [_cuda.F32] * 3 + [0, 0]  # dtype rows, padded to 8 bytes
    assert buf[104:112].view(np.float64).tolist() == [3.0]  # the divisor
    with pytest.raises(ValueError, match="access width"):  # an fp32 tensor cannot take 8-wide accesses
        _cuda.pack_table(buf.ctypes.data, nbytes, 8, [16, 32], [_cuda.BF16, _cuda.F32], [0, 16, 48, 64],
                         [_cuda.BF16] * 2 + [_cuda.F32] * 2, [1, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match="needs"):
        _cuda.pack_table(buf.ctypes.data, nbytes - 8, 1, [16, 32], [3, 1], [0, 16, 48, 4], [3, 3, 1, 1], [1, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="dtype"):
        _cuda.pack_table(buf.ctypes.data, nbytes, 1, [16, 32], [0, 1], [0, 16, 48, 4], [3, 3, 1, 1], [1, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="k <= 2048"):
        _cuda.table_bytes([1], 5000)
    with pytest.raises(ValueError, match="divisor"):
        _cuda.pack_table(buf.ctypes.data, nbytes, 1, [16, 32], [3, 1], [0, 16, 48, 4], [3, 3, 1, 1], [1, 1], [1.0, 1.0], 0.0)
    with pytest.raises(ValueError, match="greedy"):
        _cuda.launch(_cuda.OP_GREEDY_ACCEPT, 1, 0, 1, 3, 1, 0, 0)
    with pytest.raises(ValueError, match="input_dtype must be F32, F16, BF16 or -1"):  # refused before any CUDA call
        _cuda.launch(_cuda.OP_WEIGHTED_SUM, 4, 64, 1, 2, 1, 0, 0, _cuda.F64)
    # greedy tables: input 0 is the fp64 running sum (so at most 4-wide), accept writes it back
    assert _cuda.access_widths([16], [_cuda.F64], [16, 32], [_cuda.F64, _cuda.BF16], 2) == [4]
    greedy = dict(outs=[16], ins=[16, 32], numels=[5], weights=[1.0, 1.0])
    assert _cuda.pack_table(buf.ctypes.data, nbytes, 4, out_dtypes=[_cuda.F64], in_dtypes=[_cuda.F64, _cuda.BF16],
                            op=_cuda.OP_GREEDY_ACCEPT, **greedy) == 1
    assert _cuda.pack_table(buf.ctypes.data, nbytes, 4, out_dtypes=[_cuda.BF16], in_dtypes=[_cuda.F64, _cuda.F16],
                            op=_cuda.OP_GREEDY_CANDIDATE, **greedy) == 1
    with pytest.raises(ValueError, match="running sum"):  # an fp32 running sum is the old contract
        _cuda.pack_table(buf.ctypes.data, nbytes, 4, out_dtypes=[_cuda.F32], in_dtypes=[_cuda.F32, _cuda.F32],
                         op=_cuda.OP_GREEDY_ACCEPT, **greedy)
    with pytest.raises(ValueError, match="F64"):  # accept writes the fp64 running sum
        _cuda.pack_table(buf.ctypes.data, nbytes, 4, out_dtypes=[_cuda.BF16], in_dtypes=[_cuda.F64, _cuda.BF16],
                         op=_cuda.OP_GREEDY_ACCEPT, **greedy)
    with pytest.raises(ValueError, match="dtype"):  # the weighted sum takes no fp64
        _cuda.pack_table(buf.ctypes.data, nbytes, 4, out_dtypes=[_cuda.F32], in_dtypes=[_cuda.F64, _cuda.F32], **greedy)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA extension is not built here")
def test_dtype_codes_shared() -> None:
    """The CUDA extension, the Triton kernels and the host engine use csrc/soupkern.h's DType codes."""
    from soupkern import _cuda, dtype_codes  # type: ignore[attr-defined]
    from soupkern.engine import DTYPE_CODES

    assert {name: getattr(_cuda, name) for name in dtype_codes.DTYPE_CODES} == dtype_codes.DTYPE_CODES == DTYPE_CODES


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA extension is not built here")
def test_cuda_and_triton_tables_agree() -> None:
    """csrc/cuda/table.cpp's pack_table and soupkern/kernels/table.py's build_table write the same
    bytes (one table format): mixed dtypes, a multi-tile tensor, an empty one, a divisor; and a
    greedy table (K = 2, rows sum, x, out)."""
    import numpy as np

    from soupkern import _cuda  # type: ignore[attr-defined]
    from soupkern.kernels.table import build_table

    tile = _cuda.TILE
    cases = [  # (op, outs, out dtypes, input rows, input dtype rows, numels, weights, divisor)
        (_cuda.OP_WEIGHTED_SUM, [4096, 8192, 12288], [_cuda.BF16, _cuda.F32, _cuda.F16],
         [[16, 32, 48], [64, 80, 96], [112, 128, 144]],
         [[_cuda.BF16, _cuda.F16, _cuda.F32], [_cuda.F32] * 3, [_cuda.F16, _cuda.BF16, _cuda.F16]],
         [2 * tile + 5, 0, tile], [0.25, 1 / 3, -2.0], 3.0),
        (_cuda.OP_GREEDY_CANDIDATE, [4096], [_cuda.BF16], [[16, 32]], [[_cuda.F64, _cuda.BF16]], [tile + 1], [1.0, 1.0], 5.0),
    ]
    for op, outs, out_dtypes, ins, in_dtypes, numels, weights, divisor in cases:
        k = len(weights)
        nbytes = _cuda.table_bytes(numels, k)
        buf = np.zeros(nbytes, np.uint8)
        tiles = _cuda.pack_table(buf.ctypes.data, nbytes, 4, outs, out_dtypes, [a for r in ins for a in r],
                                 [c for r in in_dtypes for c in r], numels, weights, divisor, op)
        words, blocks = build_table([[*r, o] for r, o in zip(ins, outs)], [[*r, o] for r, o in zip(in_dtypes, out_dtypes)],
                                    numels, weights, divisor, tile)
        assert blocks == tiles
        assert words.tobytes() == buf.tobytes()


def test_build_switch(setup_py: ModuleType) -> None:
    off = setup_py.plan_cuda({"SOUPKERN_BUILD_CUDA": "0", "PATH": os.environ.get("PATH", "")})
    assert not off.build and off.reason == "SOUPKERN_BUILD_CUDA=0 at build time"
    missing = setup_py.plan_cuda({"PATH": "/nonexistent"})
    assert not missing.build and missing.reason == "nvcc not found at build time"
    with pytest.raises(setup_py.CudaBuildError, match="SOUPKERN_BUILD_CUDA=1 but nvcc not found"):
        setup_py.plan_cuda({"SOUPKERN_BUILD_CUDA": "1", "PATH": "/nonexistent"})
    with pytest.raises(setup_py.CudaBuildError, match="must be 0 or 1"):
        setup_py.plan_cuda({"SOUPKERN_BUILD_CUDA": "maybe"})
    with pytest.raises(setup_py.CudaBuildError, match="has no bin/nvcc"):
        setup_py.plan_cuda({"SOUPKERN_BUILD_CUDA": "1", "CUDA_HOME": "/nonexistent"})


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_cuda_home_from_the_nvcc_on_path(setup_py: ModuleType) -> None:
    plan = setup_py.plan_cuda({"PATH": os.environ["PATH"]})
    assert plan.build and plan.nvcc == NVCC
    assert (Path(plan.lib_dir) / "libcudart_static.a").is_file()
    assert Path(plan.home, "bin", "nvcc").exists()  # a wrapper script's nvcc resolves to the real toolkit
    assert plan.gencode == setup_py.gencode_flags(setup_py.DEFAULT_CUDA_ARCHS)
    custom = setup_py.plan_cuda({"PATH": os.environ["PATH"], "SOUPKERN_CUDA_ARCHS": "90"})
    assert custom.archs == "90"


def test_arch_flags(setup_py: ModuleType) -> None:
    g = setup_py.gencode_flags
    assert g("80;90") == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                          "-gencode=arch=compute_90,code=compute_90"]
    # numeric order, not string order: 100 is above 90; dotted and sm_ forms; duplicates merged
    assert g("100, 9.0 sm_80;80") == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                                      "-gencode=arch=compute_100,code=sm_100",
                                      "-gencode=arch=compute_100,code=compute_100"]
    # explicit +PTX replaces the default; arch-specific 90a never provides the default PTX
    assert g("80+PTX;90") == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                              "-gencode=arch=compute_80,code=compute_80"]
    assert g("80;90a")[-1] == "-gencode=arch=compute_80,code=compute_80"
    assert setup_py.parse_archs("8.6") == [(86, "", False)]
    for bad in ("", "sm_", "ampere", "8", "80;;x"):
        with pytest.raises(setup_py.CudaBuildError):
            g(bad)


def test_not_built_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the extension, `soupkern backends` says why, from the build record."""
    def no_extension() -> None:
        raise ImportError("No module named 'soupkern._cuda'")

    record = tmp_path / "_cuda_build.json"
    record.write_text(json.dumps({"built": False, "reason": "nvcc not found at build time"}))
    monkeypatch.setattr(cuda_backend, "_extension", no_extension)
    monkeypatch.setattr(cuda_backend, "BUILD_INFO", record)
    assert cuda_backend.load() == (None, "not built (nvcc not found at build time)")
    monkeypatch.setattr(cuda_backend, "BUILD_INFO", tmp_path / "missing.json")
    kernels, reason = cuda_backend.load()
    assert kernels is None and reason.startswith("not built: soupkern._cuda cannot be imported")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA extension is not built here")
def test_same_dtype_launches_are_specialized() -> None:
    """A weighted-sum launch whose inputs share one dtype names it (the kernel specialized for it
    reads no per-input dtype); a mix, or a greedy op, launches the general kernel."""
    from soupkern import _cuda  # type: ignore[attr-defined]
    from soupkern.backends.cuda import shared_input_dtype

    assert shared_input_dtype(True, [_cuda.BF16] * 6) == _cuda.BF16
    assert shared_input_dtype(True, [_cuda.F32, _cuda.F32]) == _cuda.F32
    assert shared_input_dtype(True, [_cuda.BF16, _cuda.F16]) == -1
    assert shared_input_dtype(False, [_cuda.F64, _cuda.F64]) == -1
