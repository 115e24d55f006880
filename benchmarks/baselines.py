"""The methods compared by bench_soup.py, each run in a fresh child process.

Every method turns N ingredient files into one uniform-soup output file:

- `naive_safetensors`: `safetensors.torch.load_file` each ingredient whole, accumulate in fp32,
  divide by N, cast to the first ingredient's dtype, `save_file`. Holds an fp32 copy of the model
  plus the output (about 4/itemsize + 1 model sizes) besides the mmap'd input.
- `model_soups_reference`: the uniform soup of github.com/mlfoundations/model-soups (main.py):
  `torch.load` whole state dicts, `{k: v * (1./N)}` then `{k: v * (1./N) + soup[k]}`, here
  followed by `torch.save`. Arithmetic in the ingredients' dtype (bf16 stays bf16). Reads the .pt
  copies of the ingredients. Peak 3-4 model sizes (measured ~3.6 on ViT-L).
- `io_floor`: no math; reads every input byte once (`readinto` one reused 32 MiB buffer) and
  writes one output file of the soup's size (the bytes of ingredient 0, zero-padded if needed).
  The time any file-to-file soup must at least take on this machine.
- `soupkern`: `soupkern.uniform_soup(ingredients, out, overwrite=True)`.
- `mergekit_linear` (optional, `pip install -c constraints.txt mergekit`): mergekit's
  `mergekit-pytorch CONFIG OUT_DIR` with default options, run in-process through its click command
  (the console script's code path), on a YAML config `merge_method: linear` listing the
  ingredient files with `weight: 1.0` each (mergekit normalizes by the weight sum, so this is the
  uniform mean). mergekit 0.1.5's linear merge accumulates `addcmul_` in fp32 (fp64 for fp64
  inputs), divides by the weight sum and casts to the first input's dtype; it writes a folder
  (`model.safetensors`, or `model-0000k-of-0000n.safetensors` + index past 5 GB of output) and
  holds each output shard in RAM until it is written.

Child protocol (used by bench_soup.py): `python baselines.py SPEC.json` where SPEC holds
{method, inputs, out, kwargs, fsync, result}. The child measures, around the soup call only:
wall time (`soup_s`) and CPU time of all its threads (`soup_cpu_s`), then optionally `os.fsync` of the output (`fsync_s`); separately the time
to import the method's modules (`import_s`: torch and safetensors for every method but io_floor,
so that a lazy import inside a soup call is not timed as soup work), the RSS after imports, and the peak anonymous RSS
(RssAnon sampled every 5 ms by a thread) and VmHWM. `ru_maxrss` comes from `os.wait4` in a small
launcher process (see `launcher`), which the parent starts before it imports torch.
"""
from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # first thing: child start, before any heavy import

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

BLOCK = 32 * 1024 * 1024
METHODS = ("io_floor", "soupkern", "naive_safetensors", "model_soups_reference")
SLOW_METHODS = ("naive_safetensors", "model_soups_reference")
# optional peers: run only when asked for (their packages may be missing); see OPTIONAL_MODULES
OPTIONAL_METHODS = ("mergekit_linear",)
OPTIONAL_MODULES = {"mergekit_linear": "mergekit"}
DIR_OUTPUT_METHODS = ("mergekit_linear",)  # write a folder of safetensors shards, not one file


def naive_safetensors(inputs: list[str], out: str) -> dict[str, Any]:
    """load_file each ingredient, fp32 accumulation, divide, cast to the first dtype, save_file."""
    from safetensors.torch import load_file, save_file
    import torch

    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for j, path in enumerate(inputs):
        sd = load_file(path)
        if j == 0:
            dtypes = {k: v.dtype for k, v in sd.items()}
            acc = {k: v.to(torch.float32, copy=True) for k, v in sd.items()}
        else:
            for k, v in sd.items():
                acc[k].add_(v)  # fp32 += (bf16 or fp32), computed in fp32
        del sd
    n = len(inputs)
    result = {k: a.div_(n).to(dtypes[k]) for k, a in acc.items()}
    save_file(result, out, metadata={"format": "pt"})
    return {}


def model_soups_reference(inputs: list[str], out: str) -> dict[str, Any]:
    """model-soups main.py's uniform soup over torch.save'd state dicts, then torch.save."""
    import torch

    num_models = len(inputs)
    uniform_soup: dict[str, torch.Tensor] = {}
    for j, model_path in enumerate(inputs):
        state_dict = torch.load(model_path, map_location="cpu")
        if j == 0:
            uniform_soup = {k: v * (1.0 / num_models) for k, v in state_dict.items()}
        else:
            uniform_soup = {k: v * (1.0 / num_models) + uniform_soup[k] for k, v in state_dict.items()}
    torch.save(uniform_soup, out)
    return {}


def mergekit_linear(inputs: list[str], out: str) -> dict[str, Any]:
    """`mergekit-pytorch CONFIG OUT` (default options), linear merge with weight 1.0 per input."""
    from mergekit.scripts.merge_raw_pytorch import main as mergekit_pytorch

    config = Path(out).with_name(Path(out).name + ".mergekit.yml")
    config.write_text("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {json.dumps(p)}\n    parameters:\n      weight: 1.0\n" for p in inputs))
    try:
        mergekit_pytorch.main(args=[str(config), out], standalone_mode=False)
    finally:
        config.unlink(missing_ok=True)
    files = sorted(p.name for p in Path(out).iterdir())
    return {"output_files": files, "mergekit_version": _dist_version("mergekit")}


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def io_floor(inputs: list[str], out: str, out_bytes: int | None = None) -> dict[str, Any]:
    """Read all input bytes once, write `out_bytes` (default: size of input 0) bytes; no math."""
    buf = bytearray(min(BLOCK, max(os.path.getsize(p) for p in inputs)))
    view = memoryview(buf)
    if out_bytes is None:
        out_bytes = os.path.getsize(inputs[0])
    written = 0
    with open(out, "wb", buffering=0) as fo:
        for i, path in enumerate(inputs):
            with open(path, "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    if i == 0 and written < out_bytes:
                        m = min(n, out_bytes - written)
                        written += fo.write(view[:m])
        while written < out_bytes:
            written += fo.write(bytes(min(len(buf), out_bytes - written)))
    return {"bytes_written": written}


def soupkern_uniform(inputs: list[str], out: str, **kwargs: Any) -> dict[str, Any]:
    """soupkern.uniform_soup(inputs, out, overwrite=True, **kwargs); kwargs: dtype,
    budget_bytes, backend."""
    import soupkern

    kw = {"overwrite": True, **kwargs}
    report = soupkern.uniform_soup(inputs, out, **kw)
    info: dict[str, Any] = {"kwargs": kw, "report": repr(report)[:2000]}
    for attr in ("backend", "seconds", "bytes_read", "bytes_written"):
        if hasattr(report, attr):
            val = getattr(report, attr)
            info[attr] = val if isinstance(val, (int, float, str, type(None))) else repr(val)
    return info


def _import_soupkern() -> None:
    # soupkern's file-to-file path imports neither torch nor safetensors, so neither is loaded
    # here: its peak RSS is what a user of the soupkern command pays
    try:
        import soupkern  # noqa: F401
    except ImportError:  # not installed: use the checkout (in-place build)
        sys.path.append(str(Path(__file__).resolve().parent.parent))
        import soupkern  # noqa: F401
    try:
        import soupkern._native  # noqa: F401
    except ImportError:
        pass  # the package may choose another backend; uniform_soup reports it


def _import_torch_safetensors() -> None:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401


def _import_mergekit() -> None:
    _import_torch_safetensors()
    import mergekit.scripts.merge_raw_pytorch  # noqa: F401  (pulls in transformers, pydantic...)


# method -> (imports to time separately, soup function)
REGISTRY: dict[str, tuple[Callable[[], None], Callable[..., dict[str, Any]]]] = {
    "io_floor": (lambda: None, io_floor),
    "soupkern": (_import_soupkern, soupkern_uniform),
    "naive_safetensors": (_import_torch_safetensors, naive_safetensors),
    "model_soups_reference": (_import_torch_safetensors, model_soups_reference),
    "mergekit_linear": (_import_mergekit, mergekit_linear),
}


def method_unavailable(method: str) -> str | None:
    """Why `method` cannot run in this environment (its optional package is missing), or None."""
    import importlib.util

    mod = OPTIONAL_MODULES.get(method)
    if mod is None or importlib.util.find_spec(mod) is not None:
        return None
    return f"{mod} is not installed (pip install -c constraints.txt {mod})"


def output_bytes(path: str | Path) -> int:
    """Size of an output file, or the total size of the files in an output folder."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def remove_output(path: str | Path) -> None:
    """Delete an output file or folder if it exists."""
    import shutil

    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _AnonSampler(threading.Thread):
    """Samples RssAnon (KiB) every `period` s; `peak` holds the maximum seen."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.period, self.peak, self._stop_evt = period, _status_kib("RssAnon"), threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(self.period):
            self.peak = max(self.peak, _status_kib("RssAnon"))

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))
        return self.peak


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one method as described by `spec` (see module docstring) and return the measurements."""
    do_imports, fn = REGISTRY[spec["method"]]
    t0 = time.perf_counter()
    do_imports()
    t1 = time.perf_counter()
    rss_after_import = _status_kib("VmRSS")
    sampler = _AnonSampler()
    sampler.start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t2 = time.perf_counter()
    info = fn(spec["inputs"], spec["out"], **spec.get("kwargs", {}))
    t3 = time.perf_counter()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    peak_anon = sampler.stop()
    fsync_s = None
    if spec.get("fsync"):
        t4 = time.perf_counter()
        fd = os.open(spec["out"], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_s = time.perf_counter() - t4
    return {
        "method": spec["method"],
        "startup_s": t0 - T_PROCESS,
        "import_s": t1 - t0,
        "soup_s": t3 - t2,
        # CPU seconds of all threads during the soup call (user + system)
        "soup_cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        "fsync_s": fsync_s,
        "rss_after_import_kib": rss_after_import,
        "peak_rss_anon_kib": peak_anon,
        "vmhwm_kib": _status_kib("VmHWM"),
        "info": info,
    }


def launcher() -> int:
    """Spawn children on request and report their rusage (`python baselines.py --launcher`).

    Reads one JSON request a line on stdin ({"argv": [...], "log": path}), runs it, answers one
    JSON line {"returncode", "ru_maxrss_kib", "process_s", ...}. Why: the kernel carries a
    process's RSS high-water mark across fork+exec, so a child forked by a parent holding torch
    would report at least the parent's RSS as its ru_maxrss. Started before the parent imports
    anything heavy, this launcher stays small (~10 MB), and so does the bias.
    """
    import subprocess

    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        with open(req["log"], "wb") as log:
            proc = subprocess.Popen(req["argv"], stdout=log, stderr=log)
            _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        print(json.dumps({"returncode": proc.returncode, "process_s": time.perf_counter() - t0,
                          "ru_maxrss_kib": ru.ru_maxrss, "ru_utime_s": ru.ru_utime,
                          "ru_stime_s": ru.ru_stime, "ru_majflt": ru.ru_majflt,
                          "launcher_vmhwm_kib": _status_kib("VmHWM")}), flush=True)
    return 0


class Launcher:
    """Parent-side handle on a `launcher()` process; create it before importing torch."""

    def __init__(self) -> None:
        import subprocess

        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--launcher"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], log: str) -> dict[str, Any]:
        """Run `argv` (stdout+stderr to `log`) to completion; its exit code and rusage."""
        if self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError("launcher pipes are closed")
        self.proc.stdin.write(json.dumps({"argv": argv, "log": log}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the launcher process died")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str]) -> int:
    if argv == ["--launcher"]:
        return launcher()
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    if spec["method"] not in REGISTRY:
        print(f"unknown method {spec['method']!r}; choose from {list(REGISTRY)}", file=sys.stderr)
        return 2
    result = run_child(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
