"""The exact-arithmetic contract (csrc/soupkern.h): uniform = fp64 sum in input order, one IEEE
division by K, one rounding; weighted = fp64 fma chain, one rounding.

Checked against an independent reference: `reference.round_exact_weighted_sum` rounds the EXACT
rational result once (error-free transformations, fractions.Fraction where an fp64 evaluation
cannot decide). Uniform soups must be bit-identical across backends, ISAs, thread counts and
chunkings and equal round(exact mean) in >= 99.999% of elements for F32/F16/BF16 inputs at
K = 2..9 and 72; weighted soups with coefficients of one sign likewise; the numpy/torch
references may differ from the fused kernels only where the fp64 accumulators (one fma vs a
multiply and an add) land on different sides of an output rounding boundary, counted here.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import soupkern
from soupkern import _native
from soupkern.backends import get_backend
from soupkern.reference import contract_weighted_sum, decode, round_exact_weighted_sum

NP = {"F32": np.float32, "F16": np.float16}
BITS = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16, "F64": np.uint64}
KS = [2, 3, 4, 5, 6, 7, 8, 9, 72]


def inputs(dtype: str, k: int, n: int, seed: int) -> list[np.ndarray]:
    """Raw bytes of K ingredients that look like fine-tunes of one model: a shared base plus small
    per-ingredient deltas, magnitudes spread over a few binades (and some exact zeros)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n) * np.exp2(rng.integers(-6, 3, n))
    raws = []
    for _ in range(k):
        x = base + 0.05 * rng.standard_normal(n) * np.abs(base)
        x[rng.random(n) < 0.001] = 0.0
        if dtype == "BF16":
            raws.append((x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
        else:
            raws.append(x.astype(NP[dtype]).view(np.uint8))
    return raws


def kernel(raws, dtype, out_dtype, weights, divisor, n, isa="", threads=0) -> np.ndarray:
    size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}[out_dtype]
    out = np.empty(n * size, np.uint8)
    _native.weighted_sum(out, out_dtype, raws, [dtype] * len(raws), list(weights), n, threads, isa=isa,
                         divisor=float(divisor))
    return out


def share_equal(a: np.ndarray, b: np.ndarray, dtype: str) -> tuple[float, int]:
    """Share of elements with equal bits; +0 and -0 count as equal (the exact value has no sign)."""
    ab, bb = a.view(BITS[dtype]), b.view(BITS[dtype])
    zero = (decode(a, dtype) == 0) & (decode(b, dtype) == 0)
    diff = int(((ab != bb) & ~zero).sum())
    return 1.0 - diff / ab.size, diff


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("k", KS)
def test_uniform_is_correctly_rounded_and_identical_everywhere(dtype, k):
    n = 60_013 if k <= 9 else 12_011
    raws = inputs(dtype, k, n, seed=k)
    exact, decided_by_fractions = round_exact_weighted_sum(raws, [dtype] * k, [1.0] * k, dtype, k)
    ref = contract_weighted_sum(raws, [dtype] * k, [1.0] * k, dtype, k)
    got = {}
    for isa in _native.supported_isas():
        for threads in (1, 2):
            got[f"cpp-{isa}-{threads}"] = kernel(raws, dtype, dtype, [1.0] * k, k, n, isa, threads)
    out = np.empty_like(ref)
    get_backend("torch").weighted_sum(out, dtype, raws, [dtype] * k, [1.0] * k, n, k)
    got["torch"] = out
    for name, g in got.items():
        assert np.array_equal(g, ref), f"{name} differs from the contract evaluated in numpy"
    share, diff = share_equal(ref, exact, dtype)
    assert share >= 0.99999, (share, diff, decided_by_fractions)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("k", [2, 3, 5, 9, 72])
def test_weighted_one_sign_is_correctly_rounded(dtype, k):
    n = 40_009 if k <= 9 else 8_009
    raws = inputs(dtype, k, n, seed=100 + k)
    weights = list(np.random.default_rng(k).dirichlet(np.ones(k)))
    exact, _ = round_exact_weighted_sum(raws, [dtype] * k, weights, dtype)
    fused = kernel(raws, dtype, dtype, weights, 1.0, n)
    share, diff = share_equal(fused, exact, dtype)
    assert share >= 0.99999, (share, diff)
    # the references round product and sum separately: they may differ from the fused kernel
    # only where the fp64 accumulators straddle an output rounding boundary, i.e. by one output
    # ulp, and rarely; count those elements
    for name, other in (("numpy", contract_weighted_sum(raws, [dtype] * k, weights, dtype)),
                        ("torch", _torch_backend(raws, dtype, weights, n))):
        a, b = fused.view(BITS[dtype]).astype(np.int64), other.view(BITS[dtype]).astype(np.int64)
        straddles = int((a != b).sum())
        assert straddles <= n * 1e-5 + 1, (name, straddles)
        assert np.all(np.abs(a - b) <= 1), name  # same sign here, so adjacent bit patterns


def _torch_backend(raws, dtype, weights, n):
    out = np.empty_like(raws[0][: n * {"F32": 4, "F16": 2, "BF16": 2}[dtype]])
    get_backend("torch").weighted_sum(out, dtype, raws, [dtype] * len(raws), weights, n)
    return out


@pytest.mark.parametrize("in_dtype,out_dtype", [("F32", "BF16"), ("F32", "F16"), ("BF16", "F32"), ("F16", "F64"),
                                                ("F32", "F64")])
def test_uniform_cross_dtype_rounds_once(in_dtype, out_dtype):
    k, n = 5, 30_011
    raws = inputs(in_dtype, k, n, seed=7)
    exact, _ = round_exact_weighted_sum(raws, [in_dtype] * k, [1.0] * k, out_dtype, k)
    got = kernel(raws, in_dtype, out_dtype, [1.0] * k, k, n)
    assert np.array_equal(got, contract_weighted_sum(raws, [in_dtype] * k, [1.0] * k, out_dtype, k))
    share, diff = share_equal(got, exact, out_dtype)
    assert share >= (0.99999 if out_dtype != "F64" else 0.999), (share, diff)


def test_round_to_odd_narrowing_never_makes_nan():
    """fp64 values far below the smallest fp32 subnormal (F64 inputs, bf16 output) round to
    signed zero, not NaN (a former bug of the fp64 -> fp32 round-to-odd step)."""
    x = np.array([1e-300, -1e-300, 3e-46, -3e-46, 1e300, -1e300, np.inf, -np.inf], np.float64)
    raws = [x.view(np.uint8)]
    for out_dtype in ("BF16", "F16"):
        got = decode(kernel(raws, "F64", out_dtype, [1.0], 1.0, x.size), out_dtype)
        assert not np.isnan(got).any(), (out_dtype, got)
        assert np.array_equal(np.signbit(got), np.signbit(x))
        assert np.array_equal(got, decode(contract_weighted_sum(raws, ["F64"], [1.0], out_dtype), out_dtype))


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_uniform_soup_file_is_round_exact_mean(tmp_path, dtype):
    """End to end through the public API: any budget (chunking) gives the same file, and it is the
    correctly rounded exact mean in >= 99.999% of elements."""
    k, n = 7, 200_003
    raws = inputs(dtype, k, n, seed=3)
    paths = []
    for i, r in enumerate(raws):
        arr = r.view(np.float32) if dtype == "F32" else (r.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        p = tmp_path / f"{i}.safetensors"
        if dtype == "F32":
            save_file({"w": arr}, os.fspath(p))
        else:
            from safetensors.torch import save_file as save_torch

            save_torch({"w": torch.from_numpy(arr.copy()).to(torch.bfloat16)}, os.fspath(p))
        paths.append(p)
    files = []
    for budget in (1 << 20, 3 << 20, 64 << 20):
        out = tmp_path / f"soup{budget}.safetensors"
        soupkern.uniform_soup(paths, out, budget_bytes=budget)
        files.append(out)
    data = [f.read_bytes() for f in files]
    assert data[0] == data[1] == data[2]
    from safetensors.torch import load_file as load_torch

    got = load_torch(os.fspath(files[0]))["w"].view(torch.int16 if dtype == "BF16" else torch.int32).numpy()
    exact, _ = round_exact_weighted_sum(raws, [dtype] * k, [1.0] * k, dtype, k)
    share, diff = share_equal(got.view(np.uint8), exact, dtype)
    assert share >= 0.99999, (share, diff)
    sd = soupkern.uniform_state_dict(paths)
    assert torch.equal(sd["w"], load_torch(os.fspath(files[0]))["w"])


@pytest.mark.parametrize("k", [2, 3, 7, 17, 72])
def test_uniform_division_and_specials_match_ieee_division(k):
    """The kernel divides by K with Markstein's correction of a product (uniform weights, no F64
    input): every quotient must be the IEEE division's, zeros keep their sign, infinities stay
    infinite, NaN stays NaN. Checked on 2^18 + 5 sums with ties, exact quotients and specials, on
    both the register-blocked (K <= 16) and the block (K > 16) forms."""
    n = (1 << 18) + 5
    rng = np.random.default_rng(k)
    raws = inputs("F32", k, n, seed=k)
    first = raws[0].view(np.float32).copy()
    first[:8] = [np.inf, -np.inf, np.nan, 0.0, -0.0, 3.0 * k, 1e-45, -1e38]
    first[8:2000] = np.round(rng.standard_normal(1992) * 64) / 8  # exact and tie quotients
    raws[0] = first.view(np.uint8)
    for r in raws[1:]:
        r.view(np.float32)[:5] = [0.0, 0.0, 0.0, -0.0, -0.0]
    for out_dtype in ("F32", "BF16", "F64"):
        got = kernel(raws, "F32", out_dtype, [1.0] * k, k, n)
        want = contract_weighted_sum(raws, ["F32"] * k, [1.0] * k, out_dtype, k)  # numpy's IEEE division
        g, w = decode(got, out_dtype), decode(want, out_dtype)
        assert np.array_equal(np.isnan(g), np.isnan(w))
        ok = ~np.isnan(w)
        assert np.array_equal(got.view(BITS[out_dtype])[ok], want.view(BITS[out_dtype])[ok]), out_dtype
