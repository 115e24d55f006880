"""A correctly rounded fp64 fused multiply-add in numpy, for running the Triton kernels in the
interpreter (whose `tl.fma` may compute `x * y + z` with two roundings).

fma(w, x, acc) with x exactly representable in fp32 (the kernels' inputs are fp32/fp16/bf16
decoded to fp64) and any fp64 w, acc: split w = w_hi + w_lo with w_hi = fp32(w); then w_hi·x (24
x 24 bits) and w_lo·x (29 x 24 bits) are both exact in fp64, and the exact result is the sum of
three fp64 numbers, rounded once with Boldo and Melquiond's algorithm: (uh, ul) = TwoSum(p1, p2),
(th, tl) = TwoSum(acc, uh), v = round_to_odd(tl + ul), result = RN(th + v) ("Emulation of FMA and
correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008).
`check_exact_fma_f64` verifies it against fractions.Fraction on random and adversarial cases.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _add_round_to_odd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    s, e = _two_sum(a, b)
    even = (np.asarray(s).view(np.int64) & 1) == 0
    fix = np.isfinite(s) & (e != 0) & even
    return np.where(fix, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)


def exact_fma_f64(w: np.ndarray, x: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Correctly rounded fp64 fma(w, x, acc), elementwise; x must be exactly representable in fp32."""
    w, x, acc = (np.asarray(a, dtype=np.float64) for a in (w, x, acc))
    with np.errstate(invalid="ignore", over="ignore"):
        w_hi = w.astype(np.float32).astype(np.float64)
        w_lo = w - w_hi
        p1, p2 = w_hi * x, w_lo * x  # both exact
        uh, ul = _two_sum(p1, p2)
        th, tl = _two_sum(acc, uh)
        out = th + _add_round_to_odd(tl, ul)
        naive = w * x + acc  # non-finite operands: IEEE semantics of the plain expression
    return np.where(np.isfinite(w) & np.isfinite(x) & np.isfinite(acc), out, naive)


def check_exact_fma_f64(n: int = 20000, seed: int = 0) -> int:
    """Compare exact_fma_f64 with exact rational arithmetic; returns the number of cases checked."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1, 1, n) * np.exp2(rng.integers(-30, 30, n))
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32).astype(np.float64)
    acc = rng.standard_normal(n) * np.exp2(rng.integers(-40, 40, n))
    acc[::3] = -(w[::3] * x[::3]) * (1 + rng.uniform(-2.0**-40, 2.0**-40, acc[::3].size))  # cancellation
    acc[1::7] = -(w[1::7] * x[1::7])  # near-exact cancellation
    got = exact_fma_f64(w, x, acc)
    for i in range(n):
        exact = Fraction(float(w[i])) * Fraction(float(x[i])) + Fraction(float(acc[i]))
        want = _round_fraction(exact)
        if got[i] != want or np.signbit(got[i]) != np.signbit(want) and want != 0:
            raise AssertionError(f"fma({w[i]!r}, {x[i]!r}, {acc[i]!r}) = {got[i]!r}, exact rounding {want!r}")
    return n


def _round_fraction(q: Fraction) -> float:
    """q rounded to the nearest fp64, ties to even (Python's float(Fraction) does exactly this)."""
    return float(q)
