"""The Triton kernels (soupkern/kernels/{weighted_sum,multi_weighted_sum,greedy_update}.py) and
their backend, against the fp64 reference and the C++ kernel.

Here they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py). Two facts
of the interpreter shape the tests:

1. Its `tl.fma` need not be a correctly rounded fused multiply-add: triton <= 3.7 emulates it
   as `x * y + z` in numpy (two roundings); triton 3.9 computes fp32 and fp64 fma correctly
   rounded. Which one is there is found out at run time, per dtype
   (`interpreter_fma_is_correctly_rounded`: tl.fma in a probe kernel on witnesses and random
   cases against an exact fma), and the `exact_fma` fixture swaps in a correctly rounded fma
   (fp32: in numpy, round-to-odd; fp64: tests/exact_fma.py, or the C library's fma for operands
   the kernels never pass) for just the dtypes where the interpreter's is not
   (test_interpreter_fma_detection). With a correctly rounded fma the kernels must give the C++
   kernel's bytes (fma in the same order) for every input. With the interpreter's own fma,
   whatever it is, results must stay within the contract's error bound for two roundings per
   term and match the C++ kernel bit for bit where every product is exact.
2. Its fp32 -> bf16 cast truncates. The kernels never use that cast: bf16 is rounded with
   integer operations (the C++ kernel's formula), so bf16 outputs are tested bit-exactly here
   with no ulp allowance. fp32 -> fp16 goes through numpy (correctly rounded) here and through
   cvt.rn.f16.f32 on a GPU.

The tolerance against the fp64 reference is the one of tests/test_kernel.py: an output must lie
between round(exact - B) and round(exact + B), B = (1 + r) K u Σ|w x|, r = roundings per term.

What only a GPU proves: test_gpu_kernels_match_cpp_and_torch (marked gpu; skips without one)
runs the compiled kernels against the C++ kernel and torch bit for bit, aligned and unaligned.
test_ptx_for_sm90 checks without a GPU that the kernels compile for sm_90 to fma.rn.f32,
div.rn.f32 (not the approximate div.full.f32 of Triton's `/`) and 16-byte vector accesses.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from fractions import Fraction
from typing import Sequence

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))

from soupkern import _native  # type: ignore[attr-defined]  # noqa: E402
from soupkern.backends.device import TorchDeviceKernels  # noqa: E402
from soupkern.backends.triton_backend import TritonKernels, load  # noqa: E402
from soupkern.errors import InputError  # noqa: E402
from soupkern.kernels import greedy_update as gu  # noqa: E402
from soupkern.kernels import multi_weighted_sum as mws  # noqa: E402
from soupkern.kernels import weighted_sum as ws  # noqa: E402
from soupkern.reference import accumulation_bound, decode, encode, weighted_sum_f64, within_rounding  # noqa: E402
from test_kernel import make_input  # noqa: E402
from exact_fma import check_exact_fma_f64, exact_fma_f64 as numpy_fma_f64  # noqa: E402

DTYPES = ["F32", "F16", "BF16"]
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NAME = {v: k for k, v in TORCH.items()}
SIZE = {"F32": 4, "F16": 2, "BF16": 2}


# ---------------------------------------------------------------------------------------------
# helpers


def exact_fma_f32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Correctly rounded fp32 fma(x, y, z), elementwise (broadcasting). The product of two fp32
    values is exact in fp64; the fp64 sum is made round-to-odd with the TwoSum error term; one
    more rounding to fp32 is then correct (fp64 keeps >= 2 more bits than fp32)."""
    x64, y64, z64 = (np.asarray(a, dtype=np.float64) for a in (x, y, z))
    with np.errstate(invalid="ignore", over="ignore"):
        p = x64 * y64
        s = p + z64
        bb = s - p
        err = (p - (s - bb)) + (z64 - bb)
        even = (np.asarray(s).view(np.int64) & 1) == 0
        to_odd = np.isfinite(s) & (err != 0) & even
        s = np.where(to_odd, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return np.asarray(s).astype(np.float32)


def _load_c_fma() -> object | None:
    """The C library's fma(double, double, double): correctly rounded (C99 / IEEE 754 fusedMultiplyAdd)."""
    import ctypes
    import ctypes.util

    for name in (ctypes.util.find_library("m"), ctypes.util.find_library("c"), "msvcrt"):
        try:
            fma = ctypes.CDLL(name).fma
        except (OSError, AttributeError, TypeError):
            continue
        fma.restype, fma.argtypes = ctypes.c_double, [ctypes.c_double] * 3
        return fma
    return None


_C_FMA = _load_c_fma()
_C_FMA_UFUNC = None if _C_FMA is None else np.frompyfunc(_C_FMA, 3, 1)


def exact_fma_f64(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Correctly rounded fp64 fma(x, y, z), elementwise (broadcasting): tests/exact_fma.py's numpy
    emulation where y is exactly an fp32 value (always in the kernels: fma(w, input, acc)), the
    C library's fma elsewhere (checked against exact rational arithmetic in
    test_interpreter_fma_detection)."""
    x, y, z = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (x, y, z)))
    with np.errstate(invalid="ignore", over="ignore"):
        general = ~(y.astype(np.float32).astype(np.float64) == y) & np.isfinite(y)
    out = np.asarray(numpy_fma_f64(x, y, z), dtype=np.float64)
    if general.any():
        if _C_FMA_UFUNC is None:
            pytest.skip("no C library fma to emulate a correctly rounded fp64 fma with")
        out = out.copy()
        out[general] = _C_FMA_UFUNC(x[general], y[general], z[general]).astype(np.float64)
    return out


FMA_DTYPES = (np.float32, np.float64)
EXACT_FMA = {np.float32: exact_fma_f32, np.float64: exact_fma_f64}
_UINT = {np.float32: np.uint32, np.float64: np.uint64}

# fma(x, y, z) witnesses, with the correctly rounded result:
# fp32 1. x = y = 1 + 2^-12, z = -(1 + 2^-11): the result 2^-24 is exact; a separate fp32
#    multiply rounds the product's 2^-24 away (a tie to even) and gives 0 (two roundings,
#    triton <= 3.7).
# fp32 2. the exact sum lies just above an fp32 tie, but rounded to fp64 first it lands on the
#    tie, which then rounds to even, downwards (multiply-add in fp64 rounded to fp32: double rounding).
# fp64 1. the fp64 analogue of fp32 1 (x = y = 1 + 2^-27): 2^-54, or 0 with two roundings.
# fp64 2. x = 1 + 2^-52, y = 1 - 2^-53, z = -1: 2^-53 - 2^-105 (53 significant bits), or 0
#    with two roundings (not a tie: the product rounds to 1).
_A32, _A64 = 1 + 2.0**-12, 1 + 2.0**-27
FMA_WITNESSES = {
    np.float32: [
        (_A32, _A32, -(1 + 2.0**-11), 2.0**-24),
        (float.fromhex("0x1.a1dp+0"), float.fromhex("0x1.8b2p+0"), 2.0**-73, float.fromhex("0x1.427016p+1")),
    ],
    np.float64: [
        (_A64, _A64, -(1 + 2.0**-26), 2.0**-54),
        (1 + 2.0**-52, 1 - 2.0**-53, -1.0, 2.0**-53 - 2.0**-105),
    ],
}


@triton.jit
def _fma_probe_kernel(x_ptr, y_ptr, z_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    z = tl.load(z_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, tl.fma(x, y, z), mask=mask)


def interpreter_fma(x: np.ndarray, y: np.ndarray, z: np.ndarray, dtype: type) -> np.ndarray:
    """tl.fma(x, y, z) elementwise in `dtype` (fp32 or fp64), in a kernel, with whatever fma the
    interpreter has in place."""
    x, y, z = (np.ascontiguousarray(a, dtype=dtype) for a in np.broadcast_arrays(x, y, z))
    n = x.size
    out = torch.empty(n, dtype=torch.float32 if dtype is np.float32 else torch.float64)
    _fma_probe_kernel[(triton.cdiv(n, 1024),)](*(torch.from_numpy(a.ravel()) for a in (x, y, z)), out, n, BLOCK=1024)
    return out.numpy()


def _own_create_fma() -> object:
    from triton.runtime.interpreter import InterpreterBuilder

    return InterpreterBuilder.create_fma


_OWN_CREATE_FMA = _own_create_fma()  # before any fixture can have swapped it


def fma_probe_cases(dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The witnesses of `dtype` and 4096 random cases, most of them with cancellation (z close to
    -x*y, so the low bits of the exact product decide the result), as (x, y, z) arrays."""
    rng = np.random.default_rng(2024)
    n = 4096
    x = rng.uniform(0.5, 2.0, n).astype(dtype)
    y = rng.uniform(-4.0, 4.0, n).astype(dtype)
    rel = 2.0**-20 if dtype is np.float32 else 2.0**-45
    z = (-(x.astype(np.float64) * y) * (1 + rng.uniform(-rel, rel, n))).astype(dtype)
    z[::4] = rng.uniform(-8.0, 8.0, n // 4)
    if dtype is np.float64:  # half of them in the kernels' form: fma(w, input exact in fp32, acc)
        y[::2] = y[::2].astype(np.float32)
        z[::2] = (-(x[::2] * y[::2]) * (1 + rng.uniform(-rel, rel, n // 2)))
    w = np.array(FMA_WITNESSES[dtype], dtype=np.float64).T.astype(dtype)
    return np.concatenate([w[0], x]), np.concatenate([w[1], y]), np.concatenate([w[2], z])


@functools.cache
def interpreter_fma_is_correctly_rounded(dtype: type) -> bool:
    """Whether the interpreter's own tl.fma is a correctly rounded fma in `dtype`: bit for bit
    the exact fma's results on fma_probe_cases."""
    assert _own_create_fma() is _OWN_CREATE_FMA, "call this before exact_fma swaps the fma"
    x, y, z = fma_probe_cases(dtype)
    got, want = interpreter_fma(x, y, z, dtype), EXACT_FMA[dtype](x, y, z)
    return np.array_equal(got.view(_UINT[dtype]), want.astype(dtype).view(_UINT[dtype]))


@pytest.fixture
def exact_fma(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the interpreter's tl.fma correctly rounded (fp32 and fp64) where it is not already:
    the exact fma is swapped in for just those dtypes (see the module docstring)."""
    swap = {dt for dt in FMA_DTYPES if not interpreter_fma_is_correctly_rounded(dt)}
    if not swap:
        return
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    own = _OWN_CREATE_FMA

    def create_fma(self: object, x: TensorHandle, y: TensorHandle, z: TensorHandle) -> TensorHandle:
        dt = z.data.dtype.type
        if dt not in swap:
            return own(self, x, y, z)  # type: ignore[operator]
        return TensorHandle(EXACT_FMA[dt](x.data, y.data, z.data).astype(dt), z.dtype.scalar)

    monkeypatch.setattr(InterpreterBuilder, "create_fma", create_fma)


def as_tensor(raw: np.ndarray, dtype: str, device: str = "cpu") -> torch.Tensor:
    if raw.size == 0:  # torch cannot view an empty byte tensor as another dtype
        return torch.empty(0, dtype=TORCH[dtype], device=device)
    return torch.from_numpy(raw.copy()).view(TORCH[dtype]).to(device)


def raw_of(t: torch.Tensor) -> np.ndarray:
    if t.numel() == 0:
        return np.zeros(0, np.uint8)
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().copy()


def cpp_sum(out_dtype: str, raws: Sequence[np.ndarray], dtypes: Sequence[str], weights: Sequence[float], n: int) -> np.ndarray:
    out = np.empty(n * SIZE[out_dtype], np.uint8)
    _native.weighted_sum(out, out_dtype, list(raws), list(dtypes), [float(w) for w in weights], n, 1)
    return out


def assert_same(got: np.ndarray, want: np.ndarray, dtype: str, what: str = "") -> None:
    """Same bytes, except that NaN only has to meet NaN (the contract says NaN stays NaN; the
    payload a NaN carries differs between conversion instructions)."""
    g, w = decode(got, dtype), decode(want, dtype)
    nan_g, nan_w = np.isnan(g), np.isnan(w)
    bad = (nan_g != nan_w) | (~nan_w & (got.view(f"u{SIZE[dtype]}") != want.view(f"u{SIZE[dtype]}")))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        pytest.fail(f"{what}: {bad.sum()} of {bad.size} elements differ; first at {i}: got {g[i]!r}, want {w[i]!r}")


def check_reference(got: np.ndarray, raws: Sequence[np.ndarray], dtypes: Sequence[str], weights: Sequence[float],
                    out_dtype: str, roundings_per_term: int = 1) -> None:
    values = [decode(r, d) for r, d in zip(raws, dtypes)]
    exact = weighted_sum_f64(values, weights)
    ok = within_rounding(got, exact, accumulation_bound(values, weights, "F32", roundings_per_term), out_dtype)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        pytest.fail(f"element {i}: got {decode(got, out_dtype)[i]!r}, exact {exact[i]!r} ({(~ok).sum()} bad)")


def triton_sum(out_dtype: str, raws: Sequence[np.ndarray], dtypes: Sequence[str], weights: Sequence[float], n: int,
               block: int | None = 1024) -> np.ndarray:
    """Run the single-tensor kernel on tensors made from raw bytes; checks nothing is written
    past the output's n elements."""
    buf = torch.full((n + 16,), 7.0, dtype=TORCH[out_dtype])
    ws.weighted_sum(buf[:n], [as_tensor(r, d) for r, d in zip(raws, dtypes)], weights, block=block)
    assert (buf[n:] == 7.0).all(), "wrote past the end of the output"
    return raw_of(buf[:n])


# ---------------------------------------------------------------------------------------------
# weighted_sum


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", DTYPES)
def test_each_dtype_pair(in_dtype: str, out_dtype: str, exact_fma: None) -> None:
    rng = np.random.default_rng(DTYPES.index(in_dtype) * 3 + DTYPES.index(out_dtype))
    n, k = 4099, 3  # block 1024: four full (unmasked) blocks and a masked tail
    raws = [make_input(rng, n, in_dtype, specials=(i == 1)) for i in range(k)]
    weights = [0.5, -0.25, 1.0 / 3.0]
    got = triton_sum(out_dtype, raws, [in_dtype] * k, weights, n)
    assert_same(got, cpp_sum(out_dtype, raws, [in_dtype] * k, weights, n), out_dtype, f"{in_dtype}->{out_dtype}")
    check_reference(got, raws, [in_dtype] * k, weights, out_dtype)


@pytest.mark.parametrize("k", [*range(1, 10), 72])
def test_mixed_dtypes_and_k(k: int, exact_fma: None) -> None:
    rng = np.random.default_rng(k)
    for n in (0, 1, 17, 1025, 5003):
        dtypes = [DTYPES[(i + n) % 3] for i in range(k)]
        raws = [make_input(rng, n, d) for d in dtypes]
        weights = list(rng.uniform(-1, 1, k))
        for out_dtype in DTYPES:
            got = triton_sum(out_dtype, raws, dtypes, weights, n)
            assert_same(got, cpp_sum(out_dtype, raws, dtypes, weights, n), out_dtype, f"k={k} n={n} {dtypes}->{out_dtype}")
            if n:
                check_reference(got, raws, dtypes, weights, out_dtype)


def _round_exact(q: Fraction, dtype: type) -> float:
    """The `dtype` value nearest to the rational q, ties to even (q in the normal range)."""
    if dtype is np.float64:
        return float(q)  # int / int division in Python is correctly rounded
    c = np.float32(float(q))  # within an fp32 ulp of q; pick the nearest of c and its neighbours
    cands = [np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))]
    return float(min(cands, key=lambda v: (abs(Fraction(float(v)) - q), int(np.float32(v).view(np.uint32)) & 1)))


@pytest.mark.parametrize("dtype", FMA_DTYPES, ids=["fp32", "fp64"])
def test_interpreter_fma_detection(dtype: type, exact_fma: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The witnesses and the exact fma are right (exact rational arithmetic) and the witnesses
    tell one rounding from two; under exact_fma the interpreter's tl.fma is correctly rounded;
    exact_fma swaps the fma exactly when the detection finds some dtype's not correctly rounded;
    and the interpreter's own fma gives the witnesses' results exactly when it is detected as
    correctly rounded."""
    fused = interpreter_fma_is_correctly_rounded(dtype)
    swapped = _own_create_fma() is not _OWN_CREATE_FMA
    assert swapped == (not all(interpreter_fma_is_correctly_rounded(dt) for dt in FMA_DTYPES))
    exact = EXACT_FMA[dtype]
    for x, y, z, want in FMA_WITNESSES[dtype]:
        xd, yd, zd = (dtype(v) for v in (x, y, z))
        assert float(xd) == x and float(yd) == y and float(zd) == z
        assert _round_exact(Fraction(x) * Fraction(y) + Fraction(z), dtype) == want
        assert float(exact(xd, yd, zd)) == want
        assert float(dtype(xd * yd) + zd) != want  # two roundings differ
    x, y, z = fma_probe_cases(dtype)
    want = exact(x, y, z).astype(dtype)
    for i in range(0, x.size, 16):  # the exact fma against exact rational arithmetic
        q = Fraction(float(x[i])) * Fraction(float(y[i])) + Fraction(float(z[i]))
        assert float(want[i]) == _round_exact(q, dtype), (float(x[i]), float(y[i]), float(z[i]))
    if dtype is np.float64:  # and its numpy part, for an fp32-exact middle operand, on its own cases
        check_exact_fma_f64(2000)
    uint = _UINT[dtype]
    np.testing.assert_array_equal(interpreter_fma(x, y, z, dtype).view(uint), want.view(uint))  # under exact_fma
    if dtype is np.float32:  # the kernel and the C++ kernel agree on the witnesses (same contract)
        for xw, yw, zw, _ in FMA_WITNESSES[dtype]:
            raws = [encode(np.array([zw]), "F32"), encode(np.array([yw]), "F32")]
            assert_same(triton_sum("F32", raws, ["F32"] * 2, [1.0, xw], 1),
                        cpp_sum("F32", raws, ["F32"] * 2, [1.0, xw], 1), "F32", "witness")
    monkeypatch.undo()  # the interpreter's own fma from here on
    own = interpreter_fma(x, y, z, dtype)
    assert np.array_equal(own.view(uint), want.view(uint)) == fused
    xw, yw, zw, ww = FMA_WITNESSES[dtype][0]
    if not fused:  # triton <= 3.7: x * y + z in numpy, two roundings
        assert float(own[0]) in (ww, float(dtype(dtype(xw) * dtype(yw)) + dtype(zw)))


def test_interpreter_fma_within_contract() -> None:
    """With the interpreter's own fma (two roundings or one, see the module docstring): within
    the two-roundings bound for any weights, and the C++ kernel's bytes wherever products are
    exact (bf16 inputs: 8 significant bits; dyadic weights with at most 16 significant bits)."""
    rng = np.random.default_rng(17)
    n, k = 3001, 5
    dtypes = ["F32", "BF16", "F16", "F32", "BF16"]
    raws = [make_input(rng, n, d) for d in dtypes]
    weights = list(rng.uniform(-1, 1, k))
    for out_dtype in DTYPES:
        check_reference(triton_sum(out_dtype, raws, dtypes, weights, n), raws, dtypes, weights, out_dtype, 2)
    raws = [make_input(rng, n, "BF16") for _ in range(k)]
    dyadic = [float(w) for w in rng.integers(-(2**15), 2**15, k) * 2.0**-15]
    for out_dtype in DTYPES:
        got = triton_sum(out_dtype, raws, ["BF16"] * k, dyadic, n)
        assert_same(got, cpp_sum(out_dtype, raws, ["BF16"] * k, dyadic, n), out_dtype, "exact products")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's fp16 cast
def test_rounding_ties_nan_inf_overflow() -> None:
    """a + b exact in fp32 and often a tie in bf16 / fp16: the output must round exactly like
    the exact sum (ties to even); specials and overflow as the reference. Sums are exact, so
    this holds whatever the fma emulation."""
    rng = np.random.default_rng(7)
    n = 20000
    a = rng.integers(-(2**10), 2**10, n).astype(np.float64)
    b = rng.integers(-(2**10), 2**10, n) * 2.0**-12
    raws = [encode(a, "F32"), encode(b, "F32")]
    for out_dtype in DTYPES:
        np.testing.assert_array_equal(triton_sum(out_dtype, raws, ["F32"] * 2, [1.0, 1.0], n, block=4096),
                                      encode(a + b, out_dtype))
    bf16_max = (2 - 2.0**-7) * 2.0**127
    vals = np.array([np.nan, -np.nan, np.inf, -np.inf, 65519.0, 65520.0, 1e6, -1e6, 3.4e38, bf16_max,
                     bf16_max * (1 + 2.0**-9), 1e-8, 6e-8, -1e-45, 0.0, -0.0])
    raw = encode(vals, "F32")
    for out_dtype in DTYPES:
        got = triton_sum(out_dtype, [raw], ["F32"], [1.0], vals.size)
        assert_same(got, encode(decode(raw, "F32"), out_dtype), out_dtype, "specials")
        assert_same(got, cpp_sum(out_dtype, [raw], ["F32"], [1.0], vals.size), out_dtype, "specials vs C++")


def test_unaligned_views_give_the_same_bytes(exact_fma: None) -> None:
    """Views that are not 16-byte aligned take the scalar-access form of the kernel."""
    rng = np.random.default_rng(5)
    n = 2500
    dtypes = ["F32", "BF16", "F16"]
    raws = [make_input(rng, n, d) for d in dtypes]
    weights = [0.3, 0.7, -0.1]
    for out_dtype in DTYPES:
        xs = [torch.empty(n + 1, dtype=TORCH[d])[1:] for d in dtypes]
        for x, r, d in zip(xs, raws, dtypes):
            x.copy_(as_tensor(r, d))
        out = torch.empty(n + 1, dtype=TORCH[out_dtype])[1:]
        assert not ws.all_aligned([out, *xs])
        ws.weighted_sum(out, xs, weights, block=1024)
        assert_same(raw_of(out), cpp_sum(out_dtype, raws, dtypes, weights, n), out_dtype, "unaligned")


def test_output_may_alias_an_input(exact_fma: None) -> None:
    rng = np.random.default_rng(8)
    n = 3000
    raws = [make_input(rng, n, "F32") for _ in range(3)]
    weights = [0.25, -1.5, 0.7]
    xs = [as_tensor(r, "F32") for r in raws]
    ws.weighted_sum(xs[1], xs, weights, block=1024)
    assert_same(raw_of(xs[1]), cpp_sum("F32", raws, ["F32"] * 3, weights, n), "F32", "in place")


def test_argument_errors() -> None:
    x = torch.zeros(10)
    with pytest.raises(InputError, match="at least one input"):
        ws.weighted_sum(x, [], [])
    with pytest.raises(InputError, match="1 inputs but 2 weights"):
        ws.weighted_sum(x, [x], [1.0, 2.0])
    with pytest.raises(InputError, match=r"inputs\[1\]: 11 elements, expected 10"):
        ws.weighted_sum(x, [x, torch.zeros(11)], [1.0, 1.0])
    with pytest.raises(InputError, match=r"inputs\[0\]: unsupported dtype torch.float64"):
        ws.weighted_sum(x, [x.double()], [1.0])
    with pytest.raises(InputError, match="out: unsupported dtype torch.int32"):
        ws.weighted_sum(x.int(), [x], [1.0])
    with pytest.raises(InputError, match=r"inputs\[0\]: not contiguous"):
        ws.weighted_sum(x[:5], [torch.zeros(10)[::2]], [1.0])
    with pytest.raises(InputError, match="expected a torch.Tensor"):
        ws.weighted_sum(x, [np.zeros(10, np.float32)], [1.0])  # type: ignore[list-item]
    with pytest.raises(InputError, match="power of two"):
        ws.weighted_sum(x, [x], [1.0], block=1000)
    with pytest.raises(InputError, match="runs on CPU tensors"):
        ws.weighted_sum(torch.zeros(10, device="meta"), [x], [1.0])
    with pytest.raises(InputError, match=r"inputs\[0\]: on meta"):
        ws.weighted_sum(x, [torch.zeros(10, device="meta")], [1.0])
    with pytest.raises(InputError, match=r"inputs\[1\]: 2 tensors but 1 weights"):
        mws.multi_weighted_sum([x, x], [[x], [x, x]], [1.0])
    with pytest.raises(InputError, match="2 outputs but 1 input lists"):
        mws.multi_weighted_sum([x, x], [[x]], [1.0])
    with pytest.raises(InputError, match=r"sums\[0\]: the running sum must be a float64 tensor"):
        gu.greedy_accept([x.half()], [x])
    with pytest.raises(InputError, match="n = -1"):
        gu.greedy_candidate([x], [x], [x], -1)
    with pytest.raises(InputError, match="1 sums, 2 xs, 1 outs"):
        gu.greedy_candidate([x], [x], [x, x], 0)
    with pytest.raises(InputError, match=r"outs\[0\]: 9 elements"):
        gu.greedy_candidate([torch.zeros(9)], [x.double()], [x], 0)


# ---------------------------------------------------------------------------------------------
# multi_weighted_sum


def test_multi_weighted_sum_many_small_tensors(exact_fma: None) -> None:
    """300 tensors of 0..1000 elements plus a few of several blocks, in three output dtypes and
    two input-dtype mixes (six launches), each tensor the C++ kernel's bytes."""
    rng = np.random.default_rng(300)
    k = 4
    weights = list(rng.uniform(-1, 1, k))
    sizes = [int(s) for s in rng.integers(0, 1000, 300)] + [0, 1, 4096, 5000]
    mixes = (["BF16"] * k, ["F32", "F16", "BF16", "F16"])
    cases = []
    for t, n in enumerate(sizes):
        dtypes, out_dtype = mixes[t % 2], DTYPES[t % 3]
        raws = [make_input(rng, n, d) for d in dtypes]
        cases.append((n, dtypes, raws, out_dtype))
    outs = [torch.full((n,), 7.0, dtype=TORCH[o]) for n, _, _, o in cases]
    inputs = [[as_tensor(r, d) for r, d in zip(raws, dtypes)] for _, dtypes, raws, _ in cases]
    mws.multi_weighted_sum(outs, inputs, weights, block=1024)
    for t, ((n, dtypes, raws, out_dtype), out) in enumerate(zip(cases, outs)):
        assert_same(raw_of(out), cpp_sum(out_dtype, raws, dtypes, weights, n), out_dtype, f"tensor {t} ({n} elements)")
    n, dtypes, raws, out_dtype = cases[-1]
    check_reference(raw_of(outs[-1]), raws, dtypes, weights, out_dtype)


def test_multi_matches_single_for_k72(exact_fma: None) -> None:
    rng = np.random.default_rng(72)
    k = 72
    dtypes = [DTYPES[j % 3] for j in range(k)]
    weights = [1.0 / k] * k
    sizes = [3, 2000, 17]
    inputs = [[as_tensor(make_input(rng, n, d), d) for d in dtypes] for n in sizes]
    outs = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
    mws.multi_weighted_sum(outs, inputs, weights, block=1024)
    for n, xs, out in zip(sizes, inputs, outs):
        single = ws.weighted_sum(torch.empty(n, dtype=torch.bfloat16), xs, weights)
        np.testing.assert_array_equal(raw_of(out), raw_of(single))
        check_reference(raw_of(out), [raw_of(x) for x in xs], dtypes, weights, "BF16")


# ---------------------------------------------------------------------------------------------
# greedy_candidate / greedy_accept


def ref_candidate(s: torch.Tensor, x: torch.Tensor, n: int, out_dtype: str) -> np.ndarray:
    """round((s + float64(x)) / (n + 1)) as raw bytes: one fp64 add, one fp64 division (numpy),
    one rounding by the reference's independent encoder."""
    total = s.detach().cpu().double().numpy() + x.detach().cpu().double().numpy()
    return encode(total / np.float64(n + 1), out_dtype)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_greedy_candidate_and_accept(out_dtype: str) -> None:
    """Bit-exact against torch: one IEEE add, one IEEE division, one rounding. x dtypes differ
    across tensors (three launches); odd sizes, an empty tensor, NaN / Inf in the sums."""
    rng = np.random.default_rng(DTYPES.index(out_dtype))
    sizes = [0, 1, 7, 1024, 4099, 513]
    sums = [torch.from_numpy(rng.standard_normal(n) * 4) for n in sizes]
    sums[4][:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    xs = [as_tensor(make_input(rng, n, DTYPES[t % 3]), DTYPES[t % 3]) for t, n in enumerate(sizes)]
    for n_acc in (0, 1, 6, 70):
        outs = [torch.full((n,), 7.0, dtype=TORCH[out_dtype]) for n in sizes]
        gu.greedy_candidate(outs, sums, xs, n_acc, block=1024)
        for t, (o, s, x) in enumerate(zip(outs, sums, xs)):
            assert_same(raw_of(o), ref_candidate(s, x, n_acc, out_dtype), out_dtype,
                        f"candidate tensor {t}, n={n_acc}")
    acc = [s.clone() for s in sums]
    gu.greedy_accept(acc, xs, block=1024)
    for t, (a, s, x) in enumerate(zip(acc, sums, xs)):
        np.testing.assert_array_equal(a.numpy().view(np.uint64), (s + x.double()).numpy().view(np.uint64),
                                      err_msg=f"accept tensor {t}")


def test_greedy_sequence_matches_torch_device_kernels() -> None:
    """A short greedy run (candidate, then accept or not) through TritonKernels and through the
    torch implementation of the same contracts gives the same bytes at every step."""
    rng = np.random.default_rng(9)
    sizes = [5, 3000, 1]
    ingredients = [[torch.from_numpy(rng.standard_normal(n).astype(np.float32)).bfloat16() for n in sizes]
                   for _ in range(4)]
    results = []
    for kernels in (TritonKernels(), TorchDeviceKernels()):
        sums = [x.double() for x in ingredients[0]]
        steps = []
        n = 1
        for i, xs in enumerate(ingredients[1:]):
            outs = [torch.empty(s, dtype=torch.bfloat16) for s in sizes]
            kernels.greedy_candidate(outs, sums, xs, n)
            steps.append([raw_of(o) for o in outs])
            if i != 1:  # reject the second candidate
                kernels.greedy_accept(sums, xs)
                n += 1
        steps.append([raw_of(s) for s in sums])
        results.append(steps)
    for a, b in zip(*results):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# the backend


def test_load_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, reason = load()
    assert backend is not None and backend.name == "triton" and backend.interpreted and "interpreter" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        backend, reason = load()
        assert backend is None and reason.startswith("no CUDA GPU") and "TRITON_INTERPRET=1" in reason
    monkeypatch.setitem(sys.modules, "triton", None)
    backend, reason = load()
    assert backend is None and "triton is not importable" in reason


def test_host_bytes_protocol_matches_cpp(exact_fma: None) -> None:
    """Backend.weighted_sum on raw (possibly unaligned, read-only) byte buffers, as the engine
    calls it, through the host adapter over the Triton kernels; F64 is delegated to the torch
    backend's fp64 path."""
    from soupkern.backends.device import HostAdapter

    kernels = HostAdapter(TritonKernels(), torch.device("cpu"))
    rng = np.random.default_rng(4)
    n = 3333
    for dtypes, out_dtype in [(["BF16", "F32", "F16"], "BF16"), (["F16"], "F32"), (["F32", "F64"], "F16")]:
        raws = [np.concatenate([np.zeros(1, np.uint8), make_input(rng, n, d)])[1:] for d in dtypes]
        for r in raws:
            r.flags.writeable = False
        weights = list(rng.uniform(-1, 1, len(dtypes)))
        size = {"F64": 8, **SIZE}[out_dtype]
        out = np.full(n * size + 8, 0xAB, np.uint8)
        kernels.weighted_sum(out[: n * size], out_dtype, raws, dtypes, weights, n)
        assert (out[n * size :] == 0xAB).all()
        want = np.empty(n * size, np.uint8)
        _native.weighted_sum(want, out_dtype, raws, dtypes, weights, n, 1)
        if "F64" in dtypes:  # torch's fp64 path: two roundings per term, within the contract
            values = [decode(r, d) for r, d in zip(raws, dtypes)]
            bound = accumulation_bound(values, weights, "F64", 2)
            assert within_rounding(out[: n * size], weighted_sum_f64(values, weights), bound, out_dtype).all()
        else:
            assert_same(out[: n * size], want, out_dtype, f"{dtypes}->{out_dtype}")
    kernels.weighted_sum(np.zeros(0, np.uint8), "F32", [np.zeros(0, np.uint8)], ["F32"], [1.0], 0)


def test_engine_soup_with_triton_backend(tmp_path, monkeypatch: pytest.MonkeyPatch, exact_fma: None) -> None:
    """The whole engine on the Triton backend (registered here the way soupkern.backends will)
    gives the C++ backend's tensors."""
    from safetensors.torch import save_file

    import soupkern
    import soupkern.backends as backends

    monkeypatch.setitem(backends._MODULES, "triton", "soupkern.backends.triton_backend")
    monkeypatch.setattr(backends, "PREFERENCE", (*backends.PREFERENCE, "triton"))
    monkeypatch.setattr(backends, "_cache", {})
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        sd = {"w": torch.randn(300, 257, generator=g).bfloat16(), "b": torch.randn(257, generator=g),
              "h": torch.randn(33, generator=g).half(), "empty": torch.zeros(0, 4, dtype=torch.float16)}
        paths.append(tmp_path / f"ing{i}.safetensors")
        save_file(sd, str(paths[-1]), metadata={"format": "pt"})
    a = soupkern.uniform_state_dict(paths, backend="triton")
    b = soupkern.uniform_state_dict(paths, backend="cpp")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(raw_of(a[name]), raw_of(b[name]), err_msg=name)


def test_bytes_moved() -> None:
    assert ws.bytes_moved(10, [2, 2, 4], 2) == 100
    assert mws.bytes_moved([3, 7], [2, 2], 4) == 80
    assert gu.bytes_moved(10, 2, 2) == 120 and gu.bytes_moved(10, 2, None) == 180  # fp64 sums


# ---------------------------------------------------------------------------------------------
# compiled code: offline PTX for sm_90 (no GPU needed) and the GPU itself


def _run_outside_interpreter(mode: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, mode], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_table_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device tables are cached by content (a hit is the same tensor), least recently used
    dropped beyond the byte bound."""
    from soupkern.kernels import table_cache

    monkeypatch.setattr(table_cache, "_tables", type(table_cache._tables)())
    monkeypatch.setattr(table_cache, "_cached_bytes", 0)
    monkeypatch.setattr(table_cache, "CACHE_BYTES", 32)
    cpu = torch.device("cpu")
    a, b, c = (np.arange(i, i + 2, dtype=np.int64) for i in (0, 10, 20))  # 16 bytes each
    ta = table_cache.device_table(a, cpu)
    assert ta.tolist() == [0, 1] and table_cache.device_table(a.copy(), cpu) is ta
    tb = table_cache.device_table(b, cpu)
    table_cache.device_table(a, cpu)  # a is now the most recently used
    table_cache.device_table(c, cpu)  # drops b
    assert table_cache.device_table(a, cpu) is ta and table_cache.device_table(b, cpu) is not tb
    assert table_cache._cached_bytes <= 32


def test_ptx_for_sm90() -> None:
    _run_outside_interpreter("ptx")


@pytest.mark.gpu
def test_gpu_kernels_match_cpp_and_torch() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _run_outside_interpreter("gpu")


def _ptx(fn: object, signature: dict[str, str], constexprs: dict[str, int], pointer_args: Sequence[int]) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={**signature, **{c: "constexpr" for c in constexprs}}, constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in pointer_args})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def _ptx_checks() -> None:
    """Compile each kernel for sm_90 (needs ptxas, which ships with triton; no GPU) and check
    the instructions that carry the contract and the bandwidth."""
    import triton
    import triton.language as tl

    sig = {"table": "*i64", "K": "i32"}
    for in_code, out_code in [(ws.BF16.value, ws.BF16.value), (ws.F32.value, ws.F32.value), (ws.MIXED.value, ws.F16.value)]:
        for aligned in (1, 0):
            for divide in (0, 1):
                consts = {"IN_CODE": in_code, "OUT_CODE": out_code, "DIVIDE": divide, "ALIGNED": aligned, "BLOCK": 2048}
                ptx = _ptx(ws._weighted_sum_kernel, sig, consts, [0])
                assert "fma.rn.f64" in ptx and "cvt.rn.bf16" not in ptx, consts  # bf16: integer rounding
                assert ("div.rn.f64" in ptx) == bool(divide), consts
                assert "div.full" not in ptx and "div.approx" not in ptx, consts
                assert ("ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx) == bool(aligned), consts
    ptx = _ptx(mws._multi_weighted_sum_kernel, {"table": "*i64", "T": "i32", "K": "i32"},
               {"IN_CODE": ws.BF16.value, "OUT_CODE": ws.BF16.value, "DIVIDE": 1, "ALIGNED": 1, "BLOCK": 2048}, [0])
    assert "fma.rn.f64" in ptx and "div.rn.f64" in ptx and "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    for accept in (0, 1):
        ptx = _ptx(gu._greedy_kernel, {"table": "*i64", "T": "i32"},
                   {"X_CODE": ws.BF16.value, "OUT_CODE": ws.BF16.value, "ACCEPT": accept, "ALIGNED": 1, "BLOCK": 2048}, [0])
        assert "div.full" not in ptx and "div.approx" not in ptx and ("div.rn.f64" in ptx) == (not accept)
        assert "add.rn.f64" in ptx or "add.f64" in ptx
        assert "ld.global.v4.b32" in ptx or "ld.global.v2.b64" in ptx
    print("ptx checks passed")


def _gpu_checks(device: str = "cuda", ks: Sequence[int] = (1, 2, 3, 8, 72),
                ns: Sequence[int] = (1, 17, 4099, (1 << 20) + 3), tensors: int = 584) -> None:
    """On a GPU, compiled: weighted_sum (aligned and not), multi_weighted_sum and the greedy
    kernels give the C++ kernel's / torch's bytes, including bf16 and fp16 rounding. (Also run
    small on the CPU interpreter by test_gpu_check_script, so that it is known to work.)"""
    rng = np.random.default_rng(0)
    for k in ks:
        for n in ns:
            dtypes = [DTYPES[(i + k) % 3] for i in range(k)]
            raws = [make_input(rng, n, d, specials=True) for d in dtypes]
            weights = list(rng.uniform(-1, 1, k))
            for out_dtype in DTYPES:
                want = cpp_sum(out_dtype, raws, dtypes, weights, n)
                for offset in (0, 1):  # 1: views not 16-byte aligned -> scalar accesses
                    xs = [torch.empty(n + offset, dtype=TORCH[d], device=device)[offset:] for d in dtypes]
                    for x, r, d in zip(xs, raws, dtypes):
                        x.copy_(as_tensor(r, d, device))
                    out = torch.empty(n + offset, dtype=TORCH[out_dtype], device=device)[offset:]
                    ws.weighted_sum(out, xs, weights)
                    assert_same(raw_of(out), want, out_dtype, f"k={k} n={n} offset={offset} {dtypes}->{out_dtype}")
    sizes = [int(s) for s in rng.integers(0, 5000, tensors)]
    dtypes = ["BF16"] * 4
    weights = [0.25] * 4
    per_tensor = [[make_input(rng, n, d) for d in dtypes] for n in sizes]
    outs = [torch.empty(n, dtype=torch.bfloat16, device=device) for n in sizes]
    mws.multi_weighted_sum(outs, [[as_tensor(r, d, device) for r, d in zip(rs, dtypes)] for rs in per_tensor], weights)
    for n, rs, out in zip(sizes, per_tensor, outs):
        assert_same(raw_of(out), cpp_sum("BF16", rs, dtypes, weights, n), "BF16", f"multi n={n}")
    for out_dtype in DTYPES:
        sums = [torch.randn(n, device=device, dtype=torch.float64) * 3 for n in sizes[:50]]
        xs = [torch.randn(n, device=device).to(TORCH[DTYPES[i % 3]]) for i, n in enumerate(sizes[:50])]
        outs = [torch.empty(n, dtype=TORCH[out_dtype], device=device) for n in sizes[:50]]
        gu.greedy_candidate(outs, sums, xs, 6)
        for o, s, x in zip(outs, sums, xs):
            assert_same(raw_of(o), ref_candidate(s, x, 6, out_dtype), out_dtype, "greedy candidate")
    acc = [s.clone() for s in sums]
    gu.greedy_accept(acc, xs)
    for a, s, x in zip(acc, sums, xs):
        assert torch.equal(a, s + x.double()), "greedy accept"
    print("gpu checks passed on", torch.cuda.get_device_name() if device == "cuda" else device)


def test_gpu_check_script(exact_fma: None) -> None:
    _gpu_checks("cpu", ks=(3,), ns=(2100,), tensors=12)


if __name__ == "__main__":
    if sys.argv[1] == "gpu":
        assert not ws.interpreted() and torch.cuda.is_available()
        _gpu_checks()
    else:
        _ptx_checks()


def test_each_object_implements_one_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host buffers and device tensors are two registries: `get_backend("triton")` is a host
    adapter over the very kernels `device_kernels` returns, and those take device tensors only."""
    import inspect

    import soupkern.backends as backends
    from soupkern.backends.device import HostAdapter, device_kernels

    monkeypatch.setattr(backends, "_cache", {})
    host = backends.get_backend("triton")
    kernels = device_kernels("cpu", "triton")  # the interpreter's device
    assert isinstance(host, HostAdapter) and host.kernels is kernels and host.name == "triton"
    assert list(inspect.signature(kernels.weighted_sum).parameters) == ["out", "inputs", "weights", "divisor"]
    assert backends.get_backend("triton") is host  # cached


def test_launch_config_is_measured_once_per_key_and_the_fastest_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels/tuning.py: one measurement per (device, input dtype, output dtype), the lowest
    median kept (the first listed on a tie); under the interpreter, unmeasured, the fixed block."""
    from soupkern.kernels import tuning

    monkeypatch.setattr(tuning, "_chosen", {})
    calls = []

    def fake(key, configs):  # type: ignore[no-untyped-def]
        calls.append(key)
        return {c: (1.0 if c == (4096, 8) else 2.0) if key[1] == 3 else 1.0 for c in configs}

    dev = torch.device("cuda", 0)
    assert tuning.launch_config(dev, 3, 3, measure=fake) == (4096, 8)
    assert tuning.launch_config(dev, 3, 3, measure=fake) == (4096, 8)
    assert tuning.launch_config(dev, 1, 3, measure=fake) == tuning.CONFIGS[0]  # all tied: the first
    assert calls == [("cuda:0", 3, 3), ("cuda:0", 1, 3)]
    assert tuning.chosen() == {("cuda:0", 3, 3): (4096, 8), ("cuda:0", 1, 3): tuning.CONFIGS[0]}
    assert tuning.launch_config(torch.device("cpu"), 3, 3) == (ws.INTERPRETER_BLOCK, ws.GPU_WARPS)


def test_kernels_launch_with_the_tuned_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither block nor num_warps given: the launches take the tuned configuration (here a fake
    one of 256 elements per program, so 3000 elements span many programs and a masked tail), and
    the bits are the C++ kernel's."""
    from soupkern.kernels import tuning

    asked = []

    def fake(device, in_code, out_code, *, measure=None):  # type: ignore[no-untyped-def]
        asked.append((in_code, out_code))
        return 256, 2

    monkeypatch.setattr(tuning, "launch_config", fake)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3000, generator=g).to(torch.bfloat16) for _ in range(3)]
    out = torch.empty(3000, dtype=torch.bfloat16)
    ws.weighted_sum(out, xs, [1.0, 1.0, 1.0], 3.0)
    outs = [torch.empty(3000, dtype=torch.float32), torch.empty(700, dtype=torch.float32)]
    mws.multi_weighted_sum(outs, [xs, [x[:700].float() for x in xs]], [1.0, 1.0, 1.0], 3.0)
    ref = np.empty(3000 * 2, np.uint8)
    _native.weighted_sum(ref, "BF16", [x.view(torch.uint8).numpy() for x in xs], ["BF16"] * 3, [1.0] * 3, 3000,
                         divisor=3.0)
    assert out.view(torch.uint8).numpy().tobytes() == ref.tobytes()
    assert asked == [(ws.BF16.value, ws.BF16.value), (ws.BF16.value, ws.F32.value), (ws.F32.value, ws.F32.value)]
