"""Hugging Face model folders in, a model folder out: soupkern side by side with mergekit.

Ingredients: K (`-n`, default 3) Llama models built from a `LlamaConfig` (hidden 512, MLP 1376,
8 layers, 8 heads, 4 KV heads, vocab 8000, untied embeddings: 31.4M parameters), bf16, written by
`save_pretrained(folder, max_shard_size="50MB")` (two shards + index, config.json,
generation_config.json) with a word-level `PreTrainedTokenizerFast` (no downloads, as in
tests/test_hf.py). One seeded random base; ingredient i = base + 0.05·rms(tensor)·N(0, 1) noise
of its own seed (fine-tunes of one base), computed in fp32 and cast to bf16 once. Cached under
`--cache` (default /tmp/soupkern-bench/hf) with a manifest; matching folders are reused.

Methods, each run as a fresh process started by `baselines.Launcher` (so its ru_maxrss is its
own), uniform soup of the K folders into an output folder:

- `soupkern`: `python -m soupkern uniform F1 ... FK -o OUT/ --force -q` (a trailing `/` makes the
  output a model folder: config, tokenizer and other non-weight files come from the first
  ingredient).
- `mergekit`: `mergekit-yaml CONFIG OUT` (default options: CPU, tokenizer copied from the first
  local folder) from a separate virtual environment (`--mergekit`, default
  /tmp/mk-venv/bin/mergekit-yaml), config `merge_method: linear`, `dtype: bfloat16`, every folder
  with `weight: 1.0` (mergekit divides by the weight sum: the uniform mean). Without that
  executable the method is recorded as "not installed", never dropped silently.

Every child runs with HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 (nothing may come from the
hub). One untimed warm-up round (page cache warm), then `--repeats` rounds, methods interleaved;
the output is deleted before every run. Time = wall time of the whole process (interpreter start
and imports included: what a user of the command waits for), median; CPU = user + system;
peak RSS = max ru_maxrss over the timed runs. After each timed run the same program runs with
`--help` (`python -m soupkern uniform --help`, `mergekit-yaml --help`): its start-up and up-front
imports, the part of the time that does not grow with the model.

Checks, on the last run's output of each method: the files in the folder; whether
`AutoModelForCausalLM.from_pretrained(OUT, output_loading_info=True)` loads with no missing,
unexpected or mismatched keys and `AutoTokenizer.from_pretrained(OUT)` loads (and maps "t5" to 5);
every tensor of the output against the exact reference, the fp64 mean of the K ingredients'
tensors rounded once to bf16 (round to nearest even, no double rounding through fp32:
soupcheck.round_f64, independent of soupkern): share of elements bit-equal to it and max ulp
distance, plus max err÷bound (soupcheck.error_ratio; ≤ 1 is what an fp32-accumulated mean allows).

    python benchmarks/bench_hf_folders.py                     # results/hf_folders_llama_bf16_n3.{md,json}
    python benchmarks/bench_hf_folders.py --smoke             # tiny model, 1 repeat, ~20 s, results under the cache
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import Launcher  # noqa: E402  (started before torch is imported: see baselines.launcher)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
DEFAULT_MERGEKIT = "/tmp/mk-venv/bin/mergekit-yaml"

# model shape: (full, smoke)
SHAPES = {
    "llama": dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=False),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 tie_word_embeddings=False),
}
NOISE = 0.05  # ingredient = base + NOISE * rms(tensor) * N(0, 1)
BASE_SEED = 0


def _tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wl = models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(wl), unk_token="t0")


def build_ingredients(cache: Path, shape: str, k: int, shard: str) -> list[Path]:
    """K save_pretrained folders (bf16, sharded, with a tokenizer), cached by manifest."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_kw = SHAPES[shape]
    root = cache / f"{shape}_bf16"
    base_sd: dict[str, torch.Tensor] | None = None
    paths = []
    for i in range(k):
        folder = root / f"ing{i}"
        manifest = {"config": cfg_kw, "dtype": "bf16", "max_shard_size": shard, "base_seed": BASE_SEED,
                    "noise": NOISE, "noise_seed": 1000 + i}
        mpath = root / f"ing{i}.manifest.json"  # beside the folder: soupkern copies a folder's extra files
        if mpath.exists() and folder.is_dir() and json.loads(mpath.read_text()) == manifest:
            paths.append(folder)
            continue
        if base_sd is None:
            torch.manual_seed(BASE_SEED)
            base_sd = {n: t.detach().clone() for n, t in LlamaForCausalLM(LlamaConfig(**cfg_kw)).state_dict().items()}
        mpath.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        m = LlamaForCausalLM(LlamaConfig(**cfg_kw))
        g = torch.Generator().manual_seed(1000 + i)
        sd = {}
        for n, t in base_sd.items():
            rms = float(t.float().pow(2).mean().sqrt())
            sd[n] = t + NOISE * rms * torch.randn(t.shape, generator=g, dtype=t.dtype)
        m.load_state_dict(sd)
        m = m.to(torch.bfloat16)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        m.save_pretrained(tmp, max_shard_size=shard)
        _tokenizer(cfg_kw["vocab_size"]).save_pretrained(tmp)
        os.replace(tmp, folder)
        mpath.write_text(json.dumps(manifest))
        paths.append(folder)
    return paths


def mergekit_info(exe: str) -> dict[str, Any]:
    """Whether `exe` exists, and the versions of mergekit, torch, transformers in its environment."""
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        return {"installed": False, "reason": f"mergekit is not installed ({exe} not found; "
                                              "see benchmarks/README.md for the separate venv)"}
    py = Path(exe).with_name("python")
    code = ("import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d in "
            "('mergekit', 'torch', 'transformers', 'safetensors')}))")
    try:
        r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120)
        versions = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        versions = {"error": str(e)}
    return {"installed": True, "exe": exe, "versions": versions}


def mergekit_config(paths: list[Path]) -> str:
    return ("merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
        f"  - model: {json.dumps(str(p))}\n    parameters:\n      weight: 1.0\n" for p in paths))


def folder_files(out: Path) -> list[dict[str, Any]]:
    return [{"name": str(f.relative_to(out)), "bytes": f.stat().st_size}
            for f in sorted(out.rglob("*")) if f.is_file()]


def check_folder(out: Path, ingredients: list[Path], vocab: int) -> dict[str, Any]:
    """Loadability and tensor-by-tensor comparison with round(fp64 mean) (see module docstring)."""
    import torch
    from soupcheck import _open_safetensors_output, error_ratio, round_f64, ulp_distance

    res: dict[str, Any] = {"files": folder_files(out)}
    try:  # config.json against the first ingredient's: keys whose values differ
        got_cfg, ing_cfg = (json.loads((d / "config.json").read_text()) for d in (out, ingredients[0]))
        res["config_json_diff"] = {k: [ing_cfg.get(k), got_cfg.get(k)] for k in sorted(set(got_cfg) | set(ing_cfg))
                                   if got_cfg.get(k) != ing_cfg.get(k)}
    except (OSError, ValueError) as e:
        res["config_json_diff"] = {"error": str(e)}
    try:
        from transformers import AutoModelForCausalLM

        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        keys = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        res["model_load"] = {"ok": not any(keys.values()), **keys, "class": type(model).__name__,
                             "dtype": str(model.dtype)}
        with torch.no_grad():
            logits = model(torch.tensor([[1, 5, 7, 3]])).logits
        res["model_load"]["forward_finite"] = bool(torch.isfinite(logits).all())
        del model
    except Exception as e:  # noqa: BLE001 - a result, not a harness failure
        res["model_load"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
        t5 = tok.convert_tokens_to_ids("t5")
        res["tokenizer_load"] = {"ok": t5 == 5 and len(tok) == vocab, "class": type(tok).__name__,
                                 "len": len(tok), "t5": t5}
    except Exception as e:  # noqa: BLE001
        res["tokenizer_load"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}

    try:
        get, names, handles = _open_safetensors_output(out)
    except Exception as e:  # noqa: BLE001
        res["tensors"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}
        return res
    ins = [_open_safetensors_output(p) for p in ingredients]
    want = ins[0][1]
    problems = []
    if names != want:
        problems.append(f"names differ: missing {sorted(want - names)[:5]}, extra {sorted(names - want)[:5]}")
    n_eq = n_total = max_ulp = 0
    max_ratio = 0.0
    for name in sorted(want & names):
        got = get(name)
        acc = abs_terms = None
        for g, _, _ in ins:
            x = g(name).to(torch.float64)
            acc = x.clone() if acc is None else acc.add_(x)
            abs_terms = x.abs() if abs_terms is None else abs_terms.add_(x.abs())
        assert acc is not None and abs_terms is not None
        mean = acc.div_(len(ins))
        dtype = ins[0][0](name).dtype
        if got.dtype != dtype or got.shape != mean.shape:
            problems.append(f"{name}: got {got.dtype}{tuple(got.shape)}, want {dtype}{tuple(mean.shape)}")
            continue
        d = ulp_distance(got, round_f64(mean, dtype))
        n_eq += int((d == 0).sum())
        n_total += d.numel()
        max_ulp = max(max_ulp, int(d.max()))
        max_ratio = max(max_ratio, float(error_ratio(got, mean, abs_terms.div_(len(ins)), len(ins) + 1).max()))
    del handles, ins
    res["tensors"] = {"ok": not problems and n_total > 0, "tensors": len(names), "elements": n_total,
                      "bit_equal": n_eq, "bit_equal_share": n_eq / max(n_total, 1), "max_ulp": max_ulp,
                      "max_err_over_bound": max_ratio, "problems": problems}
    return res


def _share(x: float) -> str:
    if x == 1.0:
        return "100%"
    return f"{100 * x:.3f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=3, help="number of ingredient folders (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up (default 3)")
    ap.add_argument("--cache", default="/tmp/soupkern-bench/hf", help="ingredients and outputs")
    ap.add_argument("--mergekit", default=DEFAULT_MERGEKIT, help="mergekit-yaml executable (its own venv)")
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml options, one string")
    ap.add_argument("--methods", default="soupkern,mergekit", help="comma list of soupkern, mergekit")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 repeat, results under CACHE/results")
    ap.add_argument("--out", default=None, help="results path prefix (without .md/.json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    shape, shard = ("tiny", "100KB") if args.smoke else ("llama", "50MB")

    os.environ.update(OFFLINE_ENV)  # before the launcher starts: every child inherits it
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    launcher = Launcher()
    work = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
    try:
        from common import RESULTS_DIR, fmt, md_table, provenance, provenance_md

        paths = build_ingredients(cache, shape, args.n, shard)
        in_bytes = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))
        mk = mergekit_info(args.mergekit)
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        commands: dict[str, list[str]] = {}
        skipped: dict[str, str] = {}
        outs = {m: work / f"out_{m}" for m in wanted}
        for m in wanted:
            if m == "soupkern":
                commands[m] = [sys.executable, "-m", "soupkern", "uniform", *map(str, paths),
                               "-o", f"{outs[m]}/", "--force", "-q"]
            elif m == "mergekit":
                if not mk["installed"]:
                    skipped[m] = mk["reason"]
                    continue
                cfg = work / "mergekit.yml"
                cfg.write_text(mergekit_config(paths))
                commands[m] = [args.mergekit, str(cfg), str(outs[m]), *shlex.split(args.mergekit_args)]
            else:
                raise SystemExit(f"unknown method {m!r}; choose from soupkern, mergekit")
        # the same program with --help: interpreter start + the imports the command does up front
        startup_cmds = {m: (c[:4] if m == "soupkern" else c[:1]) + ["--help"] for m, c in commands.items()}
        startup: dict[str, list[dict[str, Any]]] = {m: [] for m in commands}

        load_start = os.getloadavg()
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in commands}
        failed: dict[str, str] = {}
        for r in range(args.repeats + 1):  # round 0: warm-up, untimed
            for m, cmd in commands.items():
                if m in failed:
                    continue
                shutil.rmtree(outs[m], ignore_errors=True)
                log = work / f"log_{m}.txt"
                res = launcher.run(cmd, str(log))
                if res["returncode"] != 0:
                    failed[m] = f"exit status {res['returncode']}:\n" + log.read_text(errors="replace")[-3000:]
                    print(f"{m} failed: {failed[m]}", file=sys.stderr)
                    continue
                if r:
                    samples[m].append(res)
                    h = launcher.run(startup_cmds[m], str(work / "log_help.txt"))
                    if h["returncode"] == 0:
                        startup[m].append(h)
                print(f"round {r}{' (warm-up)' if not r else ''} {m}: {res['process_s']:.2f} s, "
                      f"maxrss {res['ru_maxrss_kib'] / 1024:.0f} MiB", file=sys.stderr)

        load_end = os.getloadavg()
        summary: dict[str, Any] = {}
        for m in commands:
            if m in failed:
                summary[m] = {"failed": failed[m]}
                continue
            s = samples[m]
            summary[m] = {
                "runs": len(s),
                "median_s": statistics.median(x["process_s"] for x in s),
                "median_cpu_s": statistics.median(x["ru_utime_s"] + x["ru_stime_s"] for x in s),
                "peak_rss_mib": max(x["ru_maxrss_kib"] for x in s) / 1024,
                "median_startup_s": statistics.median(x["process_s"] for x in startup[m]) if startup[m] else None,
                "startup_peak_rss_mib": max(x["ru_maxrss_kib"] for x in startup[m]) / 1024 if startup[m] else None,
                "check": check_folder(outs[m], paths, SHAPES[shape]["vocab_size"]),
            }

        label = {"soupkern": "soupkern `uniform`", "mergekit": "mergekit `mergekit-yaml` linear"}
        rows = []
        for m in wanted:
            if m in skipped:
                rows.append((label[m], skipped[m], *["n/a"] * 8))
                continue
            s = summary[m]
            if "failed" in s:
                rows.append((label[m], "run failed (see json)", *["n/a"] * 8))
                continue
            c = s["check"]
            ml, tl, t = c["model_load"], c["tokenizer_load"], c["tensors"]
            files = ", ".join(f"`{f['name']}`" for f in c["files"])
            load = "yes" if ml["ok"] else ("no: " + (ml.get("error") or "missing/unexpected keys"))
            tok = "yes" if tl["ok"] else "no"
            if "bit_equal_share" in t:
                share, ulp = _share(t["bit_equal_share"]), str(t["max_ulp"])
            else:
                share, ulp = "n/a", "n/a"
            rows.append((label[m], files, load, tok, share, ulp, fmt(s["median_s"], 2),
                         fmt(s["median_cpu_s"], 2), f"{fmt(s['median_startup_s'], 2)} / {fmt(s['startup_peak_rss_mib'], 0)}",
                         f"{s['peak_rss_mib']:.0f}"))
        table = md_table(["method", "files in output", "from_pretrained loads?", "tokenizer loads?",
                          "bit-equal to round(fp64 mean)", "max ulp", "median s", "CPU s", "`--help` s / MiB", "peak RSS MiB"], rows)

        results_dir = (cache / "results") if args.smoke else RESULTS_DIR
        results_dir.mkdir(parents=True, exist_ok=True)
        name = args.out or str(results_dir / f"hf_folders_{shape}_bf16_n{args.n}")
        prov = provenance()
        prov["mergekit"] = mk
        n_params = summary.get("soupkern", {}).get("check", {}).get("tensors", {}).get("elements")
        cmdline = "python benchmarks/bench_hf_folders.py" + (" --smoke" if args.smoke else "") + \
            (f" -n {args.n}" if args.n != 3 else "") + \
            (f" --repeats {args.repeats}" if args.repeats != 3 and not args.smoke else "")
        shown = {m: " ".join(shlex.quote(a.replace(str(work), "WORK").replace(str(cache), "CACHE").replace(sys.executable, "python"))
                             for a in c) for m, c in commands.items()}
        md = (f"# Uniform soup of {args.n} Hugging Face Llama folders (bf16, {in_bytes / 1e6:.0f} MB of safetensors"
              + (f", {n_params / 1e6:.1f}M parameters each" if n_params else "") + "): soupkern and mergekit\n\n"
              f"`{cmdline}`: each ingredient a `save_pretrained` folder ({shard} shards + index, config, "
              "generation config, tokenizer); each method a fresh process, page cache warm (one untimed warm-up "
              f"round), median of {args.repeats} interleaved runs; time = process wall time including interpreter "
              "start and imports; CPU = user + system; `--help` s / MiB = median wall time and peak RSS of the same program with `--help` "
              "(`python -m soupkern uniform --help`, `mergekit-yaml --help`), run after each timed run: its start-up "
              "and up-front imports; peak RSS = max ru_maxrss. Every child ran with "
              f"HF_HUB_OFFLINE=1. Load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load_start)} "
              f"at the start, {'/'.join(f'{x:.2f}' for x in load_end)} at the end. Reference = the fp64 mean of the ingredients' tensors rounded once to bf16 "
              "(nearest even), compared on every element of every tensor.\n\n"
              + table + "\n\nCommands (WORK = the run's folder under CACHE = "
              f"`{cache}`):\n\n" + "".join(f"- {m}: `{c}`\n" for m, c in shown.items())
              + ("\nmergekit config:\n\n```yaml\n" + mergekit_config(paths).replace(str(cache), "CACHE") + "```\n"
                 if "mergekit" in commands else "")
              + "\n" + provenance_md(prov)
              + (f"\n- mergekit: {mk['versions']} (separate venv)" if mk["installed"] else f"\n- mergekit: {mk['reason']}")
              + "\n")
        Path(name + ".md").write_text(md)
        Path(name + ".json").write_text(json.dumps({
            "provenance": prov, "shape": shape, "config": SHAPES[shape], "noise": NOISE, "max_shard_size": shard,
            "n": args.n, "repeats": args.repeats, "input_bytes": in_bytes, "env": OFFLINE_ENV,
            "loadavg_start": load_start, "loadavg_end": load_end,
            "commands": shown, "startup_commands": {m: " ".join(c).replace(sys.executable, "python")
                                                    for m, c in startup_cmds.items()},
            "startup_s": startup, "skipped": skipped, "summary": summary, "samples": samples}, indent=1))
        print(md)
        bad = "soupkern" in summary and ("failed" in summary["soupkern"]
                                         or not summary["soupkern"]["check"]["tensors"].get("ok"))
        return 1 if bad or failed else 0
    finally:
        launcher.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
