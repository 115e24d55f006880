"""The weighted-sum contract (csrc/soupkern.h) on every CPU backend against the fp64 reference.

Tolerance: an output element must lie between round(exact - B) and round(exact + B) in the output
dtype, where B = (1 + r) * K * u * sum_k |w_k x_k| bounds the accumulation error (u = 2^-24 for
fp32, 2^-53 for fp64; r = roundings per term: 1 for the fma-based C++ kernel, 2 for plain
torch). Where both ends round alike this demands bit equality with round(fp64 result); the rest
are the documented double-rounding cases, whose share is also checked to be small.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from soupkern import _native
from soupkern.backends import get_backend
from soupkern.reference import accumulation_bound, decode, encode, weighted_sum_f64, within_rounding

FLOATS = ["F32", "F16", "BF16", "F64"]
ROUNDINGS = {"cpp": 1, "torch": 2}


def make_input(rng: np.random.Generator, n: int, dtype: str, specials: bool = False) -> np.ndarray:
    x = rng.standard_normal(n) * np.exp(rng.uniform(-3, 3, n))
    if specials and n >= 8:
        x[:4] = [np.nan, np.inf, -np.inf, 0.0]
    return encode(x, dtype)


def run(backend: str, out_dtype: str, raws: list[np.ndarray], dtypes: list[str], weights: list[float], n: int) -> np.ndarray:
    size = {"F64": 8, "F32": 4}.get(out_dtype, 2)
    out = np.full(n * size + 16, 0xAB, dtype=np.uint8)  # sentinel tail: nothing written past n
    get_backend(backend).weighted_sum(out[: n * size], out_dtype, raws, dtypes, weights, n)
    assert (out[n * size :] == 0xAB).all()
    return out[: n * size]


def check(backend: str, got: np.ndarray, raws, dtypes, weights, out_dtype: str) -> np.ndarray:
    values = [decode(r, d) for r, d in zip(raws, dtypes)]
    exact = weighted_sum_f64(values, weights)
    acc = "F64" if "F64" in dtypes or out_dtype == "F64" else "F32"
    bound = accumulation_bound(values, weights, acc, ROUNDINGS[backend])
    ok = within_rounding(got, exact, bound, out_dtype)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        g = decode(got, out_dtype)[i]
        pytest.fail(f"{backend}: element {i} of {ok.size} ({(~ok).sum()} bad): got {g!r}, exact {exact[i]!r}, "
                    f"bound {bound[i]!r}, inputs {[v[i] for v in values]}, weights {weights}")
    return exact


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("in_dtype", FLOATS)
def test_each_dtype_pair(backend: str, in_dtype: str, out_dtype: str) -> None:
    rng = np.random.default_rng(FLOATS.index(in_dtype) * 4 + FLOATS.index(out_dtype))
    n, k = 4099, 3
    raws = [make_input(rng, n, in_dtype, specials=(i == 1)) for i in range(k)]
    weights = [0.5, -0.25, 1.0 / 3.0]
    got = run(backend, out_dtype, raws, [in_dtype] * k, weights, n)
    exact = check(backend, got, raws, [in_dtype] * k, weights, out_dtype)
    if out_dtype in ("F16", "BF16") and "F64" != in_dtype:
        differ = (encode(exact, out_dtype) != got).reshape(-1, 2).any(axis=1) & ~np.isnan(exact)
        assert differ.mean() < 0.01, "double-rounding cases should be rare"


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("k", range(1, 10))
def test_mixed_dtypes_and_k(backend: str, k: int) -> None:
    rng = np.random.default_rng(k)
    for n in (0, 1, 15, 17, 1023, 1025, 70001):
        dtypes = [FLOATS[(i + n) % 3] for i in range(k)]  # F32/F16/BF16 mixes
        raws = [make_input(rng, n, d) for d in dtypes]
        weights = list(rng.uniform(-1, 1, k))
        for out_dtype in ("F32", "BF16", "F16"):
            got = run(backend, out_dtype, raws, dtypes, weights, n)
            check(backend, got, raws, dtypes, weights, out_dtype)


def test_exact_cases_are_bit_exact() -> None:
    """Sums that are exact in fp32 must round exactly like the fp64 result, including ties."""
    rng = np.random.default_rng(7)
    n = 50000
    a = rng.integers(-(2**10), 2**10, n).astype(np.float64)
    b = rng.integers(-(2**10), 2**10, n).astype(np.float64) * 2.0**-12  # exact in fp32, ties in bf16
    raws = [encode(a, "F32"), encode(b, "F32")]
    for out_dtype in ("F32", "F16", "BF16"):
        got = run("cpp", out_dtype, raws, ["F32", "F32"], [1.0, 1.0], n)
        np.testing.assert_array_equal(got, encode(a + b, out_dtype))


def test_rounding_nan_inf_overflow() -> None:
    vals = np.array([np.nan, -np.nan, np.inf, -np.inf, 65519.0, 65520.0, 1e6, -1e6, 3.4e38, 1e-8, -1e-45, 0.0, -0.0])
    raw = encode(vals, "F64")
    for out_dtype in ("F32", "F16", "BF16"):
        got = run("cpp", out_dtype, [raw], ["F64"], [1.0], vals.size)
        ref = encode(vals, out_dtype)
        g, r = decode(got, out_dtype), decode(ref, out_dtype)
        assert np.array_equal(np.isnan(g), np.isnan(r))
        np.testing.assert_array_equal(got.reshape(-1, 2 if out_dtype != "F32" else 4)[~np.isnan(r)],
                                      ref.reshape(-1, 2 if out_dtype != "F32" else 4)[~np.isnan(r)])
    # NaN propagates through accumulation as NaN whatever the weight
    got = run("cpp", "BF16", [encode(np.array([np.nan] * 40), "BF16"), encode(np.ones(40), "BF16")], ["BF16", "BF16"], [0.0, 1.0], 40)
    assert np.isnan(decode(got, "BF16")).all()


def test_fp64_accumulation_rounds_once_to_half() -> None:
    """F64 inputs use an fp64 accumulator; rounding to F16/BF16 must be correct from fp64
    (not via a round-to-nearest fp32 intermediate, which would round twice)."""
    rng = np.random.default_rng(3)
    base = encode(rng.standard_normal(20000), "BF16")
    # exact bf16 midpoints nudged by far less than an fp32 ulp: double rounding would fail here
    mid = decode(base, "BF16") * (1 + 2.0**-9)
    x = mid + np.sign(rng.standard_normal(20000)) * np.abs(mid) * 2.0**-40
    for out_dtype in ("BF16", "F16"):
        got = run("cpp", out_dtype, [encode(x, "F64")], ["F64"], [1.0], x.size)
        np.testing.assert_array_equal(got, encode(x, out_dtype))


@pytest.mark.parametrize("out_dtype", ["F32", "BF16", "F16"])
def test_independent_of_threads_chunks_and_alignment(out_dtype: str) -> None:
    rng = np.random.default_rng(11)
    n, k = 300_001, 5
    dtypes = ["BF16", "F32", "F16", "BF16", "BF16"]
    raws = [make_input(rng, n, d) for d in dtypes]
    weights = list(rng.uniform(-1, 1, k))
    size = 4 if out_dtype == "F32" else 2
    ref = np.empty(n * size, np.uint8)
    _native.weighted_sum(ref, out_dtype, raws, dtypes, weights, n, 1)
    for threads in (2, 3, 7):
        out = np.empty_like(ref)
        _native.weighted_sum(out, out_dtype, raws, dtypes, weights, n, threads)
        np.testing.assert_array_equal(out, ref)
    # arbitrary chunk boundaries (odd, unaligned starts) give the same bytes
    out = np.empty_like(ref)
    cuts = [0, 1, 17, 1000, 4097, 65537, 200_003, n]
    for a, b in itertools.pairwise(cuts):
        views = [r[a * (4 if d == "F32" else 2) : b * (4 if d == "F32" else 2)] for r, d in zip(raws, dtypes)]
        _native.weighted_sum(out[a * size : b * size], out_dtype, views, dtypes, weights, b - a, 2)
    np.testing.assert_array_equal(out, ref)


def test_unaligned_buffers() -> None:
    rng = np.random.default_rng(5)
    n = 10_001
    raws = [np.concatenate([np.zeros(1, np.uint8), make_input(rng, n, d)])[1:] for d in ("F32", "BF16")]
    assert raws[0].ctypes.data % 4 != 0
    out = np.empty(n * 4 + 1, np.uint8)[1:]
    _native.weighted_sum(out, "F32", raws, ["F32", "BF16"], [0.3, 0.7], n)
    check("cpp", out, raws, ["F32", "BF16"], [0.3, 0.7], "F32")


def test_argument_errors() -> None:
    a = np.zeros(40, np.uint8)
    with pytest.raises(ValueError, match="needs 80"):
        _native.weighted_sum(np.zeros(80, np.uint8), "F32", [a], ["F32"], [1.0], 20)
    with pytest.raises(ValueError, match="unsupported dtype 'I32'"):
        _native.weighted_sum(np.zeros(40, np.uint8), "F32", [a], ["I32"], [1.0], 10)
    with pytest.raises(ValueError, match="same length"):
        _native.weighted_sum(np.zeros(40, np.uint8), "F32", [a], ["F32"], [1.0, 2.0], 10)
    with pytest.raises(ValueError, match="at least one input"):
        _native.weighted_sum(np.zeros(40, np.uint8), "F32", [], [], [], 10)
    with pytest.raises((ValueError, BufferError)):
        _native.weighted_sum(np.zeros(40, np.uint8)[::2], "F32", [a], ["F32"], [1.0], 5)  # non-contiguous
    ro = np.zeros(40, np.uint8)
    ro.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):
        _native.weighted_sum(ro, "F32", [a], ["F32"], [1.0], 10)


def test_parallel_copy() -> None:
    src = np.random.default_rng(0).integers(0, 255, 5_000_003, dtype=np.uint8)
    dst = np.zeros_like(src)
    _native.copy(dst, src, src.size, 2)
    np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("isa", _native.supported_isas())
def test_every_isa_gives_the_same_bits(isa: str) -> None:
    """The AVX-512, AVX2 and portable code paths implement one contract: identical bytes,
    for every input/output dtype mix, odd lengths (vector bodies and scalar tails) and specials."""
    rng = np.random.default_rng(21)
    for out_dtype, dtypes in itertools.product(FLOATS, [["BF16", "F16", "F32"], ["F16"], ["F32", "F64"], ["BF16"] * 9]):
        for n in (0, 3, 16, 2049, 33_333):
            raws = [make_input(rng, n, d, specials=True) for d in dtypes]
            weights = list(rng.uniform(-2, 2, len(dtypes)))
            size = {"F64": 8, "F32": 4}.get(out_dtype, 2)
            want = np.empty(n * size, np.uint8)
            _native.weighted_sum(want, out_dtype, raws, dtypes, weights, n, 1, "generic")
            got = np.empty(n * size, np.uint8)
            _native.weighted_sum(got, out_dtype, raws, dtypes, weights, n, 2, isa)
            np.testing.assert_array_equal(got, want, err_msg=f"{isa} {dtypes}->{out_dtype} n={n}")
            if n:
                check("cpp", got, raws, dtypes, weights, out_dtype)


def test_unsupported_isa_is_refused() -> None:
    with pytest.raises(ValueError, match="ISA 'sse9'"):
        _native.weighted_sum(np.zeros(4, np.uint8), "F32", [np.zeros(4, np.uint8)], ["F32"], [1.0], 1, 0, "sse9")


def aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes]


@pytest.mark.parametrize("out_dtype", ["BF16", "F32", "F16"])
def test_large_outputs_use_streaming_stores_with_the_same_bits(out_dtype: str) -> None:
    """Outputs >= 32 MiB at a 64-byte aligned address take the non-temporal store path."""
    rng = np.random.default_rng(2)
    size = 4 if out_dtype == "F32" else 2
    n = (32 << 20) // size + 1001  # odd: vector body plus a scalar tail
    raws = [encode(rng.standard_normal(n), d) for d in ("BF16", "F16")]
    ref = np.empty(n * size, np.uint8)
    _native.weighted_sum(ref, out_dtype, raws, ["BF16", "F16"], [0.4, 0.6], n, 1, "generic")
    for isa in _native.supported_isas():
        got = aligned_empty(n * size)
        _native.weighted_sum(got, out_dtype, raws, ["BF16", "F16"], [0.4, 0.6], n, 2, isa)
        np.testing.assert_array_equal(got, ref, err_msg=isa)


def test_72_ingredients() -> None:
    """The paper's sweep size: K = 72 mixed-dtype inputs in one call, every ISA, vs fp64."""
    rng = np.random.default_rng(72)
    n, k = 5003, 72
    dtypes = [("BF16", "F16", "F32")[j % 3] for j in range(k)]
    raws = [make_input(rng, n, d) for d in dtypes]
    weights = [1.0 / k] * k
    for isa in _native.supported_isas():
        got = np.empty(n * 2, np.uint8)
        _native.weighted_sum(got, "BF16", raws, dtypes, weights, n, 2, isa)
        check("cpp", got, raws, dtypes, weights, "BF16")
