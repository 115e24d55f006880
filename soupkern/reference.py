"""The definition of "correct": fp64 numpy computations that tests and benchmarks compare with.

Independent of the kernels: decoding is plain numpy bit manipulation, rounding to F16 uses numpy's
float64 -> float16 conversion (correctly rounded), rounding to BF16 picks the nearest of the
neighbouring bf16 values by exact float64 distances (ties to even).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw little-endian bytes (uint8) of a float dtype -> float64 values (exact)."""
    raw = np.ascontiguousarray(raw)
    if dtype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.view(np.dtype(NUMPY_DTYPES[dtype]).newbyteorder("<")).astype(np.float64)


def _round_bf16_bits(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    with np.errstate(over="ignore"):
        f = x.astype(np.float32)  # within an fp32 ulp of x: x lies between bf16 neighbours of it
    t = (f.view(np.uint32) >> 16).astype(np.int64)  # f truncated to bf16 bits (toward zero)
    cands = np.stack([t - 1, t, t + 1])  # sign-magnitude bits: -1 / +1 step the magnitude
    mag = cands & 0x7FFF
    ok = ((cands >> 15) == (t >> 15)[None]) & (mag < 0x7F80)  # same sign, finite
    with np.errstate(invalid="ignore"):
        vals = ((cands & 0xFFFF).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    # neighbours within a factor of 2 of x: the float64 differences are exact (Sterbenz)
    dist = np.where(ok, np.abs(np.where(ok, vals, 0.0) - x[None]), np.inf)
    nearest = dist == dist.min(axis=0)[None]
    score = np.where(nearest, cands & 1, 2)  # among the nearest, the even one
    out = cands[np.argmin(score, axis=0), np.arange(x.size)]
    limit = (2.0 - 2.0**-8) * 2.0**127  # max bf16 + half an ulp: from here on, Inf
    inf_bits = np.where(x > 0, 0x7F80, 0xFF80)
    out = np.where(np.abs(x) >= limit, inf_bits, out)
    out = np.where(np.isnan(x), 0x7FC0, out)
    return out.astype(np.uint16)


def encode(x64: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values -> raw bytes (uint8) of `dtype`, correctly rounded to nearest even."""
    x64 = np.asarray(x64, dtype=np.float64).ravel()
    if dtype == "BF16":
        return _round_bf16_bits(x64).view(np.uint8)
    with np.errstate(over="ignore"):
        return x64.astype(np.dtype(NUMPY_DTYPES[dtype]).newbyteorder("<")).view(np.uint8)


def weighted_sum_f64(values: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_k w_k * x_k in float64, k in order, starting from w_0 * x_0 as the kernels do (so the
    sign of a zero sum is theirs: -0 + -0 = -0)."""
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf is NaN, as in the kernel
        acc = np.float64(weights[0]) * np.asarray(values[0], dtype=np.float64)
        for x, w in zip(values[1:], weights[1:]):
            acc = acc + np.float64(w) * np.asarray(x, dtype=np.float64)
    return acc


def reference_weighted_sum(raws: Sequence[np.ndarray], dtypes: Sequence[str], weights: Sequence[float], out_dtype: str) -> np.ndarray:
    """round_{out_dtype}(sum_k w_k * x_k computed in fp64), as raw bytes."""
    return encode(weighted_sum_f64([decode(r, d) for r, d in zip(raws, dtypes)], weights), out_dtype)


def accumulation_bound(values: Sequence[np.ndarray], weights: Sequence[float], acc_dtype: str = "F32",
                       roundings_per_term: int = 1) -> np.ndarray:
    """Error bound of the contract's accumulation against the exact sum.

    Each weight is rounded once to the accumulator (relative error u) and each term adds at most
    `roundings_per_term` roundings of a partial sum bounded by sum_k |w_k x_k|, so
    |acc - exact| <= ((1 + roundings_per_term) * K) * u * sum_k |w_k x_k|, plus K smallest
    subnormals for underflow. u = 2^-24 (fp32) or 2^-53 (fp64). The C++ kernel uses one
    rounding per term (fma); plain torch uses two (multiply, then add).
    """
    u, tiny = (2.0**-24, 2.0**-149) if acc_dtype == "F32" else (2.0**-53, 2.0**-1074)
    k = len(values)
    mag = np.zeros_like(np.asarray(values[0], dtype=np.float64))
    for x, w in zip(values, weights):
        mag = mag + np.abs(np.float64(w) * np.asarray(x, dtype=np.float64))
    return (1 + roundings_per_term) * k * u * mag + k * tiny


def within_rounding(got: np.ndarray, exact: np.ndarray, bound: np.ndarray, dtype: str) -> np.ndarray:
    """Per element: does `got` (raw bytes of `dtype`) lie between round(exact - bound) and
    round(exact + bound)? Rounding is monotonic, so this is exactly the set of results an
    accumulation within `bound` of the exact value can give after rounding once to `dtype`.
    Where both ends round alike, this demands got == round(exact). NaN must match NaN.
    """
    exact = np.asarray(exact, dtype=np.float64).ravel()
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), exact.shape).ravel()
    g = decode(got, dtype)
    with np.errstate(invalid="ignore"):
        lo = decode(encode(exact - bound, dtype), dtype)
        hi = decode(encode(exact + bound, dtype), dtype)
        ok = (g >= lo) & (g <= hi)
    nan = np.isnan(exact)
    return np.where(nan, np.isnan(g), ok | (np.isinf(exact) & (g == exact)))


def contract_weighted_sum(raws: Sequence[np.ndarray], dtypes: Sequence[str], weights: Sequence[float],
                          out_dtype: str, divisor: float = 1.0) -> np.ndarray:
    """The exact-arithmetic contract (csrc/soupkern.h) in numpy, as raw bytes: fp64 accumulation
    in input order, one division by `divisor` when it is not 1, one rounding to `out_dtype`.
    Multiply and add round separately here (numpy has no fma), so for weights other than 1 the
    fp64 accumulator may differ from a fused kernel's in its last bit; for weights of 1 (the
    uniform soup) it is the contract exactly."""
    acc = weighted_sum_f64([decode(r, d) for r, d in zip(raws, dtypes)], weights)
    if divisor != 1.0:
        acc = acc / np.float64(divisor)
    return encode(acc, out_dtype)


def _neighbour_bits(bits: int, step: int, dtype: str) -> int:
    """The next representable value's bits in magnitude order (step +-1), crossing zero."""
    width = {"F16": 16, "BF16": 16, "F32": 32, "F64": 64}[dtype]
    sign = 1 << (width - 1)
    value = -(bits & (sign - 1)) if bits & sign else bits & (sign - 1)  # signed magnitude -> integer line
    value += step
    return (sign | -value) if value < 0 else value


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s = fl(a + b) and the exact error e: a + b = s + e (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _two_prod(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p = fl(a * b) and the exact error e: a * b = p + e (Dekker, Veltkamp splitting)."""
    p = a * b
    ca, cb = 134217729.0 * a, 134217729.0 * b  # 2^27 + 1
    ah, bh = ca - (ca - a), cb - (cb - b)
    al, bl = a - ah, b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def round_exact_weighted_sum(raws: Sequence[np.ndarray], dtypes: Sequence[str], weights: Sequence[float],
                             out_dtype: str, divisor: float = 1.0) -> tuple[np.ndarray, int]:
    """round_{out_dtype}((sum_k w_k x_k) / divisor) with the sum and the quotient EXACT (rational),
    rounded once to nearest even, as raw bytes; and how many elements needed exact rational
    arithmetic. Elements whose fp64 evaluation lies far enough from an output rounding boundary
    (by a rigorous bound on the fp64 error) take the rounding of the fp64 value; the rest are
    computed with fractions.Fraction. Independent of the kernels; slow only where it must be."""
    from fractions import Fraction

    values = [decode(r, d) for r, d in zip(raws, dtypes)]
    k = len(values)
    d = np.float64(divisor)
    with np.errstate(over="ignore", invalid="ignore"):
        # error-free transformations: the exact sum is s + err up to ~4K^2 u^2 sum|w x|
        s, err = _two_prod(np.float64(weights[0]), values[0])
        mag = np.abs(s)
        for x, w in zip(values[1:], weights[1:]):
            p, pe = _two_prod(np.float64(w), x)
            s, e = _two_sum(s, p)
            err = err + (e + pe)
            mag = mag + np.abs(p)
        q0 = s / d
        p, pe = _two_prod(q0, d)
        rest = ((s - p) - pe) + err
        acc = q0 + rest / d
        u = 2.0**-53
        bound = 4 * u * np.abs(acc) + 16 * k * k * u * u * mag / d + (k + 2) * 2.0**-1074
        # exact when no error term arose (q0 * d == s exactly): ties then round to even in encode
        bound = np.where((err == 0) & (rest == 0) & (mag < 2.0**1000), 0.0, bound)
        lo, hi = encode(acc - bound, out_dtype), encode(acc + bound, out_dtype)
    size = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[out_dtype]
    out = encode(acc, out_dtype).copy()
    lo_i = lo.view(f"<u{size}")
    hi_i = hi.view(f"<u{size}")
    finite = np.isfinite(acc)
    todo = np.nonzero((lo_i != hi_i) & finite)[0]
    out_i = out.view(f"<u{size}")
    for i in todo:
        q = sum(Fraction(float(w)) * Fraction(float(x[i])) for x, w in zip(values, weights)) / Fraction(divisor)
        guess = int(encode(np.array([float(q)]), out_dtype).view(f"<u{size}")[0])
        best, best_d = None, None
        for cand in (_neighbour_bits(guess, -1, out_dtype), guess, _neighbour_bits(guess, 1, out_dtype)):
            v = decode(np.array([cand], dtype=f"<u{size}").view(np.uint8), out_dtype)[0]
            if not np.isfinite(v):
                continue
            d = abs(Fraction(float(v)) - q)
            if best is None or d < best_d or (d == best_d and cand % 2 == 0):
                best, best_d = cand, d
        if best is not None and not np.isinf(decode(np.array([guess], dtype=f"<u{size}").view(np.uint8), out_dtype)[0]):
            out_i[i] = best
    return out, len(todo)
