"""Synthetic ViT ingredient checkpoints (timm tensor names and shapes) for soup benchmarks.

The values are cheap but realistic in scale: one random base tensor per (kind, shape), drawn once
from a seeded `torch.Generator`; ingredient `i`'s tensor `name` is `base + 0.1 * roll(base, s)`
with a shift `s` derived from (name, i), so every ingredient and every tensor differs while the
generator only does memory-bound work. Only one ingredient is in memory at a time.

Files are cached: a `manifest.json` next to them records, per file, the parameters and the size
written; a file is regenerated only when it is missing, its size differs or its parameters differ.

    python benchmarks/vit.py --model vit_g14 --dtype bf16 -n 4 --outdir /tmp/soupkern-bench
"""
from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

GEN_VERSION = 1  # bump when the generated values change
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
ST_DTYPE: dict[str, str] = {"bf16": "BF16", "fp32": "F32", "fp16": "F16"}


@dataclass(frozen=True)
class ViTConfig:
    """A ViT in timm's layout: width D, depth, MLP width M, patch P, image size, classes C."""

    name: str
    dim: int
    depth: int
    mlp: int
    patch: int
    img: int
    classes: int = 1000

    @property
    def tokens(self) -> int:
        """Patch tokens plus the class token."""
        return (self.img // self.patch) ** 2 + 1

    @property
    def tag(self) -> str:
        """Name used for folders and result files; records overrides of depth and classes."""
        base = CONFIGS[self.name]
        tag = self.name
        if self.depth != base.depth:
            tag += f"-d{self.depth}"
        if self.classes != base.classes:
            tag += f"-c{self.classes}"
        return tag


CONFIGS: dict[str, ViTConfig] = {
    "tiny": ViTConfig("tiny", dim=64, depth=2, mlp=256, patch=8, img=32, classes=10),
    "vit_b32": ViTConfig("vit_b32", dim=768, depth=12, mlp=3072, patch=32, img=224),
    "vit_l14": ViTConfig("vit_l14", dim=1024, depth=24, mlp=4096, patch=14, img=224),
    "vit_g14": ViTConfig("vit_g14", dim=1664, depth=48, mlp=8192, patch=14, img=224),
}


def get_config(name: str, depth: int | None = None, classes: int | None = None) -> ViTConfig:
    """A named config with optional depth / class-count overrides."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(CONFIGS)}")
    cfg = CONFIGS[name]
    if depth is not None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        cfg = replace(cfg, depth=depth)
    if classes is not None:
        cfg = replace(cfg, classes=classes)
    return cfg


def vit_shapes(cfg: ViTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of `cfg`, in timm's state_dict order."""
    d, m, p = cfg.dim, cfg.mlp, cfg.patch
    out: list[tuple[str, tuple[int, ...]]] = [
        ("cls_token", (1, 1, d)),
        ("pos_embed", (1, cfg.tokens, d)),
        ("patch_embed.proj.weight", (d, 3, p, p)),
        ("patch_embed.proj.bias", (d,)),
    ]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        out += [
            (b + "norm1.weight", (d,)), (b + "norm1.bias", (d,)),
            (b + "attn.qkv.weight", (3 * d, d)), (b + "attn.qkv.bias", (3 * d,)),
            (b + "attn.proj.weight", (d, d)), (b + "attn.proj.bias", (d,)),
            (b + "norm2.weight", (d,)), (b + "norm2.bias", (d,)),
            (b + "mlp.fc1.weight", (m, d)), (b + "mlp.fc1.bias", (m,)),
            (b + "mlp.fc2.weight", (d, m)), (b + "mlp.fc2.bias", (d,)),
        ]
    out += [("norm.weight", (d,)), ("norm.bias", (d,)),
            ("head.weight", (cfg.classes, d)), ("head.bias", (cfg.classes,))]
    return out


def param_count(cfg: ViTConfig) -> int:
    """Total number of parameters."""
    return sum(_numel(s) for _, s in vit_shapes(cfg))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _kind(name: str) -> str:
    if ".norm" in name or name.startswith("norm."):
        return "norm_w" if name.endswith("weight") else "bias"
    if name.endswith("bias"):
        return "bias"
    return "weight"


class _Bases:
    """One seeded random fp32 base tensor per (kind, shape), created on first use."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def get(self, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = (kind, shape)
        if key not in self.cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(repr(key).encode()))
            z = torch.randn(_numel(shape), generator=g, dtype=torch.float32)
            if kind == "norm_w":
                z = z.mul_(0.05).add_(1.0)
            elif kind == "bias":
                z = z.mul_(0.01)
            else:  # timm-style trunc-normal-ish weights
                z = z.clamp_(-2.0, 2.0).mul_(0.02)
            self.cache[key] = z
        return self.cache[key]


def make_ingredient(cfg: ViTConfig, dtype: str, index: int, bases: _Bases) -> dict[str, torch.Tensor]:
    """All tensors of ingredient `index` (one whole model in `dtype`).

    tensor = base + scale * roll(base, shift): the roll goes into one reused fp32 scratch buffer
    and the multiply-add-cast is one fused `torch.add(..., out=)`, so the only fresh memory is
    the output itself.
    """
    tdt = DTYPES[dtype]
    shapes = vit_shapes(cfg)
    scratch = torch.empty(max(_numel(s) for _, s in shapes), dtype=torch.float32)
    scale = 0.1 * (1.0 + 0.05 * index)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        base = bases.get(_kind(name), shape)
        n = base.numel()
        s = zlib.crc32(f"{name}|{index}".encode()) % n
        rolled = scratch[:n]
        rolled[: n - s].copy_(base[s:])
        rolled[n - s:].copy_(base[:s])
        t = torch.empty(n, dtype=tdt)
        torch.add(base, rolled, alpha=scale, out=t)
        out[name] = t.reshape(shape)
    return out


def ingredient_dir(workdir: str | Path, cfg: ViTConfig, dtype: str) -> Path:
    """Folder holding the ingredients of (cfg, dtype)."""
    return Path(workdir) / f"{cfg.tag}_{dtype}"


def _load_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_manifest(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def generate_ingredients(cfg: ViTConfig, dtype: str, n: int, workdir: str | Path, *, seed: int = 0,
                         quiet: bool = False) -> list[Path]:
    """Write (or reuse) `n` ingredient files for (cfg, dtype); returns their paths.

    Memory: the per-shape bases (a few blocks' worth) plus one ingredient; `save_file` writes
    straight from the tensors. Each file is written to a temporary name and renamed.
    """
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = ingredient_dir(workdir, cfg, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    man_path = folder / "manifest.json"
    manifest = _load_manifest(man_path)
    params = {"config": asdict(cfg), "dtype": dtype, "seed": seed, "gen_version": GEN_VERSION}
    bases = _Bases(seed)
    paths: list[Path] = []
    for i in range(n):
        path = folder / f"ingredient_{i:02d}.safetensors"
        paths.append(path)
        entry = manifest.get(path.name)
        if (entry and entry.get("params") == {**params, "index": i} and path.exists()
                and path.stat().st_size == entry.get("size")):
            continue
        t0 = time.perf_counter()
        tensors = make_ingredient(cfg, dtype, i, bases)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        del tensors
        os.replace(tmp, path)
        manifest[path.name] = {"params": {**params, "index": i}, "size": path.stat().st_size}
        _save_manifest(man_path, manifest)
        if not quiet:
            size = path.stat().st_size
            dt = time.perf_counter() - t0
            print(f"  wrote {path} ({size / 1e9:.2f} GB in {dt:.1f} s, {size / 1e9 / dt:.2f} GB/s)",
                  flush=True)
    return paths


def convert_to_pt(paths: list[Path], *, quiet: bool = False, legacy: bool = False) -> list[Path]:
    """`torch.save` copies of safetensors ingredients (cached), for the torch.load baseline;
    `legacy`: in the legacy (non-zip) format, as `NAME.legacy.pt`.

    One model at a time; each tensor is cloned so the state dict has one storage per tensor,
    like `model.state_dict()`.
    """
    from safetensors.torch import load_file

    out: list[Path] = []
    for src in paths:
        dst = src.with_suffix(".legacy.pt" if legacy else ".pt")
        out.append(dst)
        stamp = dst.with_suffix(".pt.src")
        want = f"{src.stat().st_size} {src.stat().st_mtime_ns}"
        if dst.exists() and stamp.exists() and stamp.read_text() == want:
            continue
        t0 = time.perf_counter()
        sd = {k: v.clone() for k, v in load_file(str(src)).items()}
        tmp = dst.with_name(dst.name + ".tmp")
        torch.save(sd, tmp, _use_new_zipfile_serialization=not legacy)
        del sd
        os.replace(tmp, dst)
        stamp.write_text(want)
        if not quiet:
            print(f"  wrote {dst} ({dst.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s)",
                  flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b32", choices=sorted(CONFIGS))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("-n", "--num", type=int, default=4, help="number of ingredients")
    ap.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    ap.add_argument("--classes", type=int, default=None, help="override the head size (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outdir", default="/tmp/soupkern-bench")
    ap.add_argument("--count-only", action="store_true", help="print the parameter count and exit")
    args = ap.parse_args()
    cfg = get_config(args.model, args.depth, args.classes)
    n_params = param_count(cfg)
    item = DTYPES[args.dtype].itemsize
    print(f"{cfg.tag}: {n_params:,} parameters ({n_params / 1e9:.3f} B), "
          f"{n_params * item / 1e9:.2f} GB per ingredient in {args.dtype}, {len(vit_shapes(cfg))} tensors")
    if args.count_only:
        return
    t0 = time.perf_counter()
    paths = generate_ingredients(cfg, args.dtype, args.num, args.outdir, seed=args.seed)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} ingredients in {ingredient_dir(args.outdir, cfg, args.dtype)} "
          f"({total / 1e9:.2f} GB), {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
