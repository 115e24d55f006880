"""The `soupkern` command: a thin layer over the Python API.

Exit status: 0 on success, 2 on bad input or an unwritable output (a one-line message, no
traceback), 130 when interrupted (no output is left behind).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from soupkern.errors import SoupkernError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '64MiB' -> 64 * 2**20, '1000' -> 1000."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: '{text}' (e.g. 5GB, 500MB, 64MiB)")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_weighted(items: Sequence[str]) -> tuple[list[str], list[float]]:
    paths, coeffs = [], []
    for item in items:
        path, sep, value = item.rpartition(":")
        try:
            if not sep:
                raise ValueError
            coeffs.append(float(value))
        except ValueError:
            raise SoupkernError(f"'{item}': expected PATH:COEFFICIENT, e.g. model_a.safetensors:0.3") from None
        paths.append(path)
    return paths, coeffs


def _soup_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output .safetensors file (a folder with --max-shard-size)")
    p.add_argument("--dtype", help="output dtype of float tensors: fp32, fp16, bf16, fp64 (default: the first ingredient's)")
    p.add_argument("--intersection", action="store_true", help="soup only the tensor names all ingredients share")
    p.add_argument("--max-shard-size", type=parse_size, help="write HF-style shards of at most this size (e.g. 5GB)")
    p.add_argument("--budget", type=parse_size, default=None, help="working-memory budget (default 64MiB)")
    p.add_argument("--backend", help="kernel backend (default: $SOUPKERN_BACKEND or the best available)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--fsync", action="store_true", help="fsync the output before renaming it into place")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soupkern", description="Model soups over safetensors checkpoints.")
    parser.add_argument("--version", action="version", version=f"soupkern {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("uniform", help="plain mean of the ingredients")
    p.add_argument("ingredients", nargs="+", help="safetensors files, index json files or checkpoint folders")
    _soup_options(p)

    p = sub.add_parser("weighted", help="sum of coefficient * ingredient (coefficients of any sign)")
    p.add_argument("ingredients", nargs="+", metavar="PATH:COEFF", help="e.g. a.safetensors:0.3 b.safetensors:0.7")
    _soup_options(p)

    p = sub.add_parser("inspect", help="tensors, dtypes, sizes and metadata of a checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("backends", help="which kernel backends can run here, and why (not)")

    p = sub.add_parser("demo", help="soup a small generated set of ingredients end to end and check it")
    p.add_argument("--workdir", default="demo_out", help="where ingredients and soups are written (default ./demo_out)")
    return parser


def _version() -> str:
    from soupkern import __version__

    return __version__


def _run_soup(args: argparse.Namespace, paths: list[str], coeffs: list[float] | None) -> None:
    from soupkern import uniform_soup, weighted_soup
    from soupkern.engine import DEFAULT_BUDGET_BYTES

    opts = dict(
        dtype=args.dtype,
        keys="intersection" if args.intersection else "same",
        max_shard_size=args.max_shard_size,
        budget_bytes=args.budget or DEFAULT_BUDGET_BYTES,
        backend=args.backend,
        overwrite=args.force,
        fsync=args.fsync,
        progress=not args.quiet,
    )
    if coeffs is None:
        report = uniform_soup(paths, args.output, **opts)
    else:
        report = weighted_soup(paths, coeffs, args.output, **opts)
    if not args.quiet:
        where = report.paths[0] if len(report.paths) == 1 else f"{Path(args.output)}/ ({len(report.paths)} files)"
        print(
            f"wrote {where}: {report.tensors} tensors, {report.bytes_written / 1e9:.3f} GB from "
            f"{report.bytes_read / 1e9:.3f} GB in {report.seconds:.2f} s "
            f"({report.gb_per_s:.1f} GB/s, backend {report.backend})",
            file=sys.stderr,
        )


def _inspect(path: str, as_json: bool) -> None:
    from soupkern.io import open_checkpoint

    with open_checkpoint(path) as ck:
        rows = [(name, info.dtype, list(info.shape), info.nbytes) for name, (_, info) in sorted(ck.tensors.items())]
        if as_json:
            print(json.dumps({"path": ck.path, "files": [f.path for f in ck.files], "metadata": ck.metadata,
                              "tensors": [{"name": n, "dtype": d, "shape": s, "nbytes": b} for n, d, s, b in rows]}, indent=2))
            return
        width = max((len(r[0]) for r in rows), default=4)
        for name, dtype, shape, nbytes in rows:
            print(f"{name:<{width}}  {dtype:<8} {str(shape):<22} {nbytes:>14,d}")
        numel = sum(info.numel for _, info in ck.tensors.values())
        dtypes = sorted({r[1] for r in rows})
        print(f"{len(rows)} tensors in {len(ck.files)} file(s), {numel:,d} elements, {ck.nbytes:,d} bytes, dtypes {', '.join(dtypes)}")
        for key, value in sorted(ck.metadata.items()):
            print(f"metadata {key}: {value}")


def _backends() -> None:
    from soupkern.backends import available_backends

    for status in available_backends().values():
        print(f"{status.name:<8} {'yes' if status.available else 'no ':<4} {status.reason}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "uniform":
            _run_soup(args, list(args.ingredients), None)
        elif args.command == "weighted":
            paths, coeffs = parse_weighted(args.ingredients)
            _run_soup(args, paths, coeffs)
        elif args.command == "inspect":
            _inspect(args.path, args.json)
        elif args.command == "backends":
            _backends()
        elif args.command == "demo":
            from soupkern.demo import run_demo

            return run_demo(Path(args.workdir))
    except SoupkernError as e:
        print(f"soupkern: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. permission denied on the output folder
        print(f"soupkern: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soupkern: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
