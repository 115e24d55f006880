"""Shared helpers for the soupkern benchmarks: provenance, soupkern import, tables, memory facts.

Nothing here measures anything; it describes the machine and software a measurement ran on
(hostname-free) and formats results.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

GIB = 1024**3
MIB = 1024**2


class SoupkernUnavailable(RuntimeError):
    """Raised when `soupkern` (or its native extension) cannot be imported."""


def import_soupkern(native: bool = False) -> ModuleType:
    """Import `soupkern` (or `soupkern._native` when `native`), falling back to the checkout.

    An installed package wins; if none is importable, the repository root is appended to
    `sys.path` (an in-place build of the checkout). Raises `SoupkernUnavailable` with the reason.
    """
    name = "soupkern._native" if native else "soupkern"
    try:
        return importlib.import_module(name)
    except ImportError:
        if str(REPO_ROOT) not in sys.path:
            sys.path.append(str(REPO_ROOT))
            sys.modules.pop("soupkern", None)
            try:
                return importlib.import_module(name)
            except ImportError as second:
                first = second
        raise SoupkernUnavailable(
            f"cannot import {name} ({first}); build it with `pip install -e .` in {REPO_ROOT}"
        ) from first


def meminfo_kib() -> dict[str, int]:
    """/proc/meminfo as {field: KiB}."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0])
    return out


def machine() -> dict[str, Any]:
    """Hostname-free machine description: CPU model and SIMD flags, cores, RAM, kernel."""
    cpu, flags = "unknown", set[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    return {
        "cpu": cpu,
        "simd": [f for f in wanted if f in flags],
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(meminfo_kib().get("MemTotal", 0) / 1024**2, 1),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
    }


def _version(mod: str) -> str | None:
    try:
        return str(importlib.import_module(mod).__version__)
    except Exception:  # noqa: BLE001 - provenance must never fail a run
        return None


def git_commit() -> dict[str, Any]:
    """Commit of the checkout (None before the first commit) and whether the tree is dirty."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                               text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def soupkern_info() -> dict[str, Any]:
    """soupkern version and backends, or the import error."""
    try:
        sk = import_soupkern()
    except SoupkernUnavailable as e:
        return {"available": False, "error": str(e)}
    info: dict[str, Any] = {"available": True, "version": getattr(sk, "__version__", None),
                            "path": str(Path(sk.__file__ or "").parent)}
    ab = getattr(sk, "available_backends", None)
    if callable(ab):
        try:
            info["backends"] = repr(ab())
        except Exception as e:  # noqa: BLE001
            info["backends"] = f"error: {e}"
    info["SOUPKERN_BACKEND"] = os.environ.get("SOUPKERN_BACKEND")
    return info


def provenance() -> dict[str, Any]:
    """Everything a result needs to be interpreted later (no hostname)."""
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "safetensors": _version("safetensors"),
        "soupkern": soupkern_info(),
        "git": git_commit(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "SOUPKERN_BACKEND") if k in os.environ},
    }


def provenance_md(p: dict[str, Any]) -> str:
    """Provenance as a markdown bullet list."""
    m, sk, g = p["machine"], p["soupkern"], p["git"]
    sk_s = (f"{sk.get('version')} (backends: {sk.get('backends', '?')})" if sk.get("available")
            else f"unavailable: {sk.get('error')}")
    lines = [
        f"- date (UTC): {p['date_utc']}",
        f"- machine: {m['cpu']}, SIMD {'/'.join(m['simd']) or 'none'}, "
        f"{m['usable_cores']} usable cores ({m['logical_cores']} logical), {m['ram_gib']} GiB RAM, {m['os']}",
        f"- python {p['python']}, torch {p['torch']}, numpy {p['numpy']}, safetensors {p['safetensors']}",
        f"- soupkern: {sk_s}",
        f"- git: {g['commit'] or 'no commit'}{' (dirty tree)' if g['dirty'] else ''}",
    ]
    if p.get("env"):
        lines.append(f"- env: {p['env']}")
    return "\n".join(lines)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(x: float | None, nd: int = 3) -> str:
    """Format a float for a table; None as n/a."""
    return "n/a" if x is None else f"{x:.{nd}f}"


def write_results(name: str, intro: str, header: Sequence[str], rows: Iterable[Sequence[Any]],
                  payload: dict[str, Any]) -> str:
    """`name`.md (intro, the table, the provenance) and `name`.json (provenance + payload); the
    markdown is printed and returned."""
    import json

    prov = provenance()
    md = intro + md_table(header, rows) + "\n\n" + provenance_md(prov) + "\n"
    Path(name + ".md").write_text(md)
    Path(name + ".json").write_text(json.dumps({"provenance": prov, **payload}, indent=1))
    print(md)
    return md
