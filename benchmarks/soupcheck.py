"""Correctness of a soup output: compare with round-to-nearest-even(fp64 mean of the ingredients).

Independent of soupkern: reads the ingredient files with safetensors and does the math in fp64.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from vit import ViTConfig, vit_shapes

SMALL_NUMEL = 1 << 20


def round_f64(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp64 `x` to `dtype` with one round-to-nearest-even (no double rounding).

    fp64 -> fp32 rounds to odd (truncate, then set the last bit if inexact), so the following
    RNE fp32 -> bf16/fp16 equals a direct RNE from fp64.
    """
    if dtype == torch.float64:
        return x.clone()
    f = x.to(torch.float32)
    if dtype == torch.float32:
        return f
    back = f.to(torch.float64)
    bits = f.view(torch.int32)
    bits = torch.where(back.abs() > x.abs(), bits - 1, bits)  # truncate toward zero
    bits = torch.where(back != x, bits | 1, bits)  # round to odd
    return bits.view(torch.float32).to(dtype)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place (same float dtype; +0 and -0 are equal)."""
    itype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    mask = (1 << (8 * a.element_size() - 1)) - 1

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(itype).to(torch.int64)
        mag = bits & mask
        return torch.where(bits < 0, -mag, mag)

    return (ordered(a) - ordered(b)).abs()


_PRECISION = {torch.bfloat16: (8, -126), torch.float16: (11, -14), torch.float32: (24, -126),
              torch.float64: (53, -1022)}  # (significand bits incl. the implicit one, min exponent)


def ulp_of(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype`'s numbers at |v| (fp64 tensor in, fp64 out; subnormal spacing near 0)."""
    p, emin = _PRECISION[dtype]
    _, e = torch.frexp(v)  # v = m * 2**e with 0.5 <= |m| < 1
    return torch.ldexp(torch.ones_like(v), torch.clamp(e.to(torch.int64), min=emin + 1) - p)


def error_ratio(got: torch.Tensor, exact: torch.Tensor, abs_terms: torch.Tensor, k: int) -> torch.Tensor:
    """|got - exact| / bound, elementwise (<= 1 is correct for an fp32-accumulated weighted sum).

    bound = 1 ulp of the output dtype at |exact| (rounding, ties broken differently) +
    k * 2**-24 * sum_j |w_j x_j| (k fp32 roundings while accumulating; relative to the terms, not
    to the result, so cancellation near zero is not misreported as thousands of ulp).
    `exact` and `abs_terms` are fp64.
    """
    acc_eps = 2.0**-53 if got.dtype == torch.float64 else 2.0**-24
    bound = ulp_of(exact, got.dtype) + k * acc_eps * abs_terms
    return (got.to(torch.float64) - exact).abs() / bound


def sample_keys(cfg: ViTConfig) -> list[str]:
    """Tensors checked for correctness: every small one, the big ones of the first and last
    block, and the head (a bounded fraction of the model whatever its depth)."""
    last = f"blocks.{cfg.depth - 1}."
    return [k for k, s in vit_shapes(cfg)
            if torch.Size(s).numel() <= SMALL_NUMEL or k.startswith(("blocks.0.", last, "head."))]


def _open_safetensors_output(out: Path) -> tuple[Callable[[str], torch.Tensor], set[str], list[Any]]:
    """(get tensor, tensor names, open handles) for a safetensors file, or a folder holding one
    `*.safetensors` file or shards listed by a `*.safetensors.index.json` weight map."""
    from safetensors import safe_open

    if not out.is_dir():
        h = safe_open(str(out), framework="pt")
        return h.get_tensor, set(h.keys()), [h]
    index = sorted(out.glob("*.safetensors.index.json"))
    if index:
        weight_map: dict[str, str] = json.loads(index[0].read_text())["weight_map"]
        handles = {f: safe_open(str(out / f), framework="pt") for f in sorted(set(weight_map.values()))}
        return (lambda k: handles[weight_map[k]].get_tensor(k)), set(weight_map), list(handles.values())
    files = sorted(out.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{out}: expected one .safetensors file or an index, found {[f.name for f in files]}")
    return _open_safetensors_output(files[0])


def check_output(out: Path, fmt_: str, inputs: list[Path], cfg: ViTConfig, dtype: torch.dtype
                 ) -> dict[str, Any]:
    """Compare the uniform soup `out` (a file; for safetensors also a folder of shards) with the fp64 mean of `inputs` on `sample_keys(cfg)`.

    Reports the max abs error vs the fp64 mean, the max ulp distance from round(fp64 mean) and
    the fraction of elements not bit-identical to it, and the max of `error_ratio` (ok <= 1).
    """
    from safetensors import safe_open

    expected = dict(vit_shapes(cfg))
    problems: list[str] = []
    if fmt_ == "pt":
        sd = torch.load(out, map_location="cpu", mmap=True, weights_only=True)
        get, keys = sd.__getitem__, set(sd)
        handle: list[Any] = []
    else:
        get, keys, handle = _open_safetensors_output(out)
    if keys != set(expected):
        problems.append(f"keys differ: missing {sorted(set(expected) - keys)[:5]}, "
                        f"extra {sorted(keys - set(expected))[:5]}")
    ins = [safe_open(str(p), framework="pt") for p in inputs]
    n = len(ins)
    max_abs, max_ratio, max_ulp, n_diff, n_total = 0.0, 0.0, 0, 0, 0
    for k in sample_keys(cfg):
        if k not in keys:
            continue
        got = get(k)
        if tuple(got.shape) != expected[k] or got.dtype != dtype:
            problems.append(f"{k}: got {got.dtype}{tuple(got.shape)}, want {dtype}{expected[k]}")
            continue
        acc = torch.zeros(expected[k], dtype=torch.float64)
        abs_terms = torch.zeros(expected[k], dtype=torch.float64)
        for h in ins:
            x = h.get_tensor(k).to(torch.float64)
            acc += x
            abs_terms += x.abs_()
        mean, abs_terms = acc.div_(n), abs_terms.div_(n)
        max_abs = max(max_abs, (got.to(torch.float64) - mean).abs().max().item())
        max_ratio = max(max_ratio, error_ratio(got, mean, abs_terms, n + 1).max().item())
        d = ulp_distance(got, round_f64(mean, dtype))
        max_ulp = max(max_ulp, int(d.max().item()))
        n_diff += int((d != 0).sum().item())
        n_total += d.numel()
    del handle, ins
    return {"max_abs_err": max_abs, "max_ulp": max_ulp, "frac_not_bit_identical": n_diff / max(n_total, 1),
            "max_err_over_bound": max_ratio, "elements_checked": n_total,
            "ok": not problems and n_total > 0 and max_ratio <= 1.0, "problems": problems}
