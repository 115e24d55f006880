"""PyTorch-pickle and DCP ingredients: soupkern against what a user does without it.

The ingredients are the synthetic ViT checkpoints of vit.py (timm names and shapes), converted
once to `torch.save` zip files (`.pt`, vit.convert_to_pt) and to DCP folders (`torch.distributed.checkpoint.save`,
no process group); both are cached beside the safetensors files. Each method runs as a fresh
process (started by baselines.Launcher, so its peak RSS is its own) and writes one uniform-soup
safetensors file; median of --repeats, methods interleaved, page cache warm (one untimed run of
each first):

- `soupkern .pt`: `python -m soupkern uniform A.pt B.pt ... -o OUT --force -q` (weights-only
  unpickling, tensors served from soupkern's mapping of each file; the exact contract).
- `torch.load + average`: `torch.load(p, map_location="cpu", weights_only=True)` of every
  ingredient, fp32 accumulation (`acc[k] += v.float()`), `/ N`, cast back, `save_file`.
- `soupkern legacy .pt`, `torch.load legacy + average`: the same on copies saved in the legacy
  (non-zip) format (`_use_new_zipfile_serialization=False`), which torch.load cannot map.
- `soupkern DCP`: the same soupkern command on the DCP folders.
- `dcp_to_torch_save + average`: `torch.distributed.checkpoint.format_utils.dcp_to_torch_save`
  of each folder to a temporary `.pt` (PyTorch's documented route), then as `torch.load + average`.

Columns: process wall time (imports included), ru_maxrss of the process; "vs" = the baseline's
median time over soupkern's on the same inputs.

    python benchmarks/bench_sources.py --model vit_b32 --dtype fp32 -n 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import Launcher  # noqa: E402  (started before torch is imported: see baselines.launcher)

AVERAGE = """
def average(paths, out, load):
    import torch
    from safetensors.torch import save_file
    acc, dtypes = {}, {}
    for j, p in enumerate(paths):
        sd = load(j, p)
        for k, v in sd.items():
            if j == 0:
                dtypes[k] = v.dtype
                acc[k] = v.float()
            else:
                acc[k] += v.float()
        del sd
    save_file({k: (a / len(paths)).to(dtypes[k]).contiguous() for k, a in acc.items()}, out)
"""

TORCH_AVERAGE = AVERAGE + """
import sys, torch
average(sys.argv[2:], sys.argv[1], lambda j, p: torch.load(p, map_location="cpu", weights_only=True))
"""

DCP_AVERAGE = AVERAGE + """
import os, sys, tempfile, warnings
warnings.simplefilter("ignore")
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

def load(j, d):
    pt = os.path.join(tmp, f"{j}.pt")
    dcp_to_torch_save(d, pt)
    sd = torch.load(pt, map_location="cpu", weights_only=True)
    os.unlink(pt)
    return sd

with tempfile.TemporaryDirectory(dir=os.path.dirname(sys.argv[1])) as tmp:
    average(sys.argv[2:], sys.argv[1], load)
"""


def dcp_copies(paths: list[str]) -> list[str]:
    """Cached DCP copies (torch.distributed.checkpoint.save, no process group) of the ingredients."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    out = []
    for p in paths:
        d = p.replace(".safetensors", ".dcp")
        if not os.path.exists(os.path.join(d, ".metadata")):
            sd = load_file(p)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(sd, checkpoint_id=d + ".tmp")
            os.replace(d + ".tmp", d)
            del sd
        out.append(d)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b32")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default="/tmp/soupkern-bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    launcher = Launcher()
    try:
        from common import RESULTS_DIR, fmt, md_table, provenance, provenance_md
        from vit import convert_to_pt, generate_ingredients, get_config

        files = generate_ingredients(get_config(args.model), args.dtype, args.n, args.cache)
        paths = [os.fspath(p) for p in files]
        pts = [os.fspath(p) for p in convert_to_pt(files)]
        legacy = [os.fspath(p) for p in convert_to_pt(files, legacy=True)]
        dcps = dcp_copies(paths)
        work = tempfile.mkdtemp(dir=args.cache)
        out = os.path.join(work, "soup.safetensors")
        py = sys.executable
        methods = {
            "soupkern .pt": [py, "-m", "soupkern", "uniform", *pts, "-o", out, "--force", "-q"],
            "torch.load + average": [py, "-c", TORCH_AVERAGE, out, *pts],
            "soupkern legacy .pt": [py, "-m", "soupkern", "uniform", *legacy, "-o", out, "--force", "-q"],
            "torch.load legacy + average": [py, "-c", TORCH_AVERAGE, out, *legacy],
            "soupkern DCP": [py, "-m", "soupkern", "uniform", *dcps, "-o", out, "--force", "-q"],
            "dcp_to_torch_save + average": [py, "-c", DCP_AVERAGE, out, *dcps],
        }
        samples: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(args.repeats + 1):
            for name, argv_ in methods.items():
                res = launcher.run(argv_, os.path.join(work, "log.txt"))
                if res["returncode"] != 0:
                    raise SystemExit(f"{name} failed:\n" + Path(work, "log.txt").read_text()[-3000:])
                if r:
                    samples[name].append(res)
                os.unlink(out)
        med = {m: statistics.median(s["process_s"] for s in v) for m, v in samples.items()}
        rss = {m: max(s["ru_maxrss_kib"] for s in v) / 2**20 for m, v in samples.items()}
        pairs = {"torch.load + average": "soupkern .pt", "torch.load legacy + average": "soupkern legacy .pt",
                 "dcp_to_torch_save + average": "soupkern DCP"}
        rows = []
        for m in methods:
            vs = f"{med[m] / med[pairs[m]]:.2f}x slower" if m in pairs else ""
            rows.append((m, fmt(med[m], 2), fmt(rss[m], 2), vs))
        gb = sum(os.path.getsize(p) for p in paths) / 1e9
        name = args.out or str(RESULTS_DIR / f"sources_{args.model}_{args.dtype}_n{args.n}")
        prov = provenance()
        md = (f"# Uniform soup of {args.n} x {args.model} {args.dtype} ({gb:.2f} GB) from .pt files and DCP folders\n\n"
              f"`python benchmarks/bench_sources.py --model {args.model} --dtype {args.dtype} -n {args.n} "
              f"--repeats {args.repeats}`: whole processes, page cache warm, median of {args.repeats}; "
              "peak RSS = max ru_maxrss.\n\n"
              + md_table(["method", "median s", "peak RSS GiB", "vs soupkern"], rows)
              + "\n\n" + provenance_md(prov) + "\n")
        Path(name + ".md").write_text(md)
        Path(name + ".json").write_text(json.dumps({"provenance": prov, "samples": samples, "median_s": med,
                                                    "peak_rss_gib": rss}, indent=1))
        print(md)
    finally:
        launcher.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
