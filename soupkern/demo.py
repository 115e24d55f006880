"""`soupkern demo`: soup a small generated set of ingredients end to end and check the result.

Four "fine-tuned" ingredients of a small ViT-shaped model (bf16 weights, fp32 norms, int64
position ids) are derived from one shared "pretrained" tensor set, written as safetensors,
souped uniformly and with weights through the public API, and every output tensor is compared
with an independent fp64 numpy computation rounded once to the output dtype.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from soupkern.reference import accumulation_bound, decode, encode, weighted_sum_f64, within_rounding
from soupkern.torch_dtypes import TORCH_DTYPES

INV_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def _tiny_vit(rng: np.random.Generator, width: int = 192, depth: int = 4, mlp: int = 768) -> dict[str, tuple[str, np.ndarray]]:
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {
        "cls_token": ("F32", (1, 1, width)),
        "pos_embed": ("F32", (1, 50, width)),
        "patch_embed.proj.weight": ("BF16", (width, 3, 32, 32)),
        "patch_embed.proj.bias": ("F32", (width,)),
        "norm.weight": ("F32", (width,)),
        "norm.bias": ("F32", (width,)),
        "head.weight": ("BF16", (10, width)),
        "head.bias": ("F32", (10,)),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": ("F32", (width,)), b + "norm1.bias": ("F32", (width,)),
            b + "attn.qkv.weight": ("BF16", (3 * width, width)), b + "attn.qkv.bias": ("F32", (3 * width,)),
            b + "attn.proj.weight": ("BF16", (width, width)), b + "attn.proj.bias": ("F32", (width,)),
            b + "norm2.weight": ("F32", (width,)), b + "norm2.bias": ("F32", (width,)),
            b + "mlp.fc1.weight": ("BF16", (mlp, width)), b + "mlp.fc1.bias": ("F32", (mlp,)),
            b + "mlp.fc2.weight": ("BF16", (width, mlp)), b + "mlp.fc2.bias": ("F32", (width,)),
        }
    return {name: (dt, rng.standard_normal(shape) * 0.02) for name, (dt, shape) in shapes.items()}


def _write(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    out = {}
    for name, (dt, values) in tensors.items():
        raw = encode(values, dt) if dt in ("F32", "BF16") else np.ascontiguousarray(values).view(np.uint8)
        out[name] = torch.from_numpy(raw.copy()).view(TORCH_DTYPES[dt]).reshape(values.shape)
    save_file(out, str(path), metadata={"format": "pt"})


def run_demo(workdir: Path, n_ingredients: int = 4, seed: int = 0) -> int:
    """Generate, soup, verify; prints a report and returns a process exit status."""
    import soupkern

    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = _tiny_vit(rng)
    paths = []
    for k in range(n_ingredients):
        ing: dict[str, tuple[str, np.ndarray]] = {
            n: (dt, v + rng.standard_normal(v.shape) * 0.002) for n, (dt, v) in base.items()
        }
        ing["pos_ids"] = ("I64", np.arange(50, dtype=np.int64))
        p = workdir / f"ingredient_{k}.safetensors"
        _write(p, ing)
        paths.append(p)
    print(f"wrote {n_ingredients} ingredients ({sum(p.stat().st_size for p in paths) / 1e6:.1f} MB) to {workdir}/")

    coeffs = [float(c) for c in np.linspace(1.0, 2.0, n_ingredients) / np.linspace(1.0, 2.0, n_ingredients).sum()]
    ingredients = [load_file(str(p)) for p in paths]
    ok = True
    for recipe, weights in (("uniform", [1.0 / n_ingredients] * n_ingredients), ("weighted", coeffs)):
        out = workdir / f"soup_{recipe}.safetensors"
        if recipe == "uniform":
            report = soupkern.uniform_soup(paths, out, overwrite=True)
        else:
            report = soupkern.weighted_soup(paths, weights, out, overwrite=True)
        soup = load_file(str(out))
        # independent check against fp64 numpy from the ingredients' bytes: every element must
        # lie between the roundings of [exact - bound, exact + bound] (bound: the contract's fp32
        # accumulation error); the count of elements that differ from round(exact) is reported.
        differing = total = 0
        for name, tensor in soup.items():
            got = _bytes(tensor)
            if name == "pos_ids":
                ok &= bool(np.array_equal(got, _bytes(ingredients[0][name])))
                continue
            dtype = INV_DTYPES[tensor.dtype]
            values = [decode(_bytes(ing[name]), dtype) for ing in ingredients]
            exact = weighted_sum_f64(values, weights)
            bound = accumulation_bound(values, weights)
            ok &= bool(within_rounding(got, exact, bound, dtype).all())
            size = 2 if dtype == "BF16" else 4
            differing += int((encode(exact, dtype) != got).reshape(-1, size).any(axis=1).sum())
            total += exact.size
        print(f"{recipe:>8} soup: {report.tensors} tensors, {report.bytes_written / 1e6:.1f} MB in "
              f"{report.seconds * 1e3:.0f} ms (backend {report.backend}); elements differing from "
              f"round(fp64 result) within the fp32 accumulation bound: {differing} of {total}")
    print("demo OK: every element is within the fp32 accumulation bound of the fp64 reference" if ok else "demo FAILED: an element is outside the bound")
    return 0 if ok else 1


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out")))
