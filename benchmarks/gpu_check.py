"""One-command GPU check: install, build the CUDA extension, GPU tests, every GPU benchmark, one tarball.

    make gpu-check                          # = python3 benchmarks/gpu_check.py
    python3 benchmarks/gpu_check.py --list  # the stages and their commands, nothing run

Made for a lent H100/H200 machine with no network (its own python3, torch and triton; never the
pinned `make install`), within 5 minutes from a fresh copy of the tree, and for any machine without
a GPU, where it runs end to end and records the GPU stages as "skipped: no GPU". Stages, in order,
each a child process with its own time limit inside one overall budget (--budget-s):

  env                environment: nvidia-smi, nvcc, python/torch/triton/numpy versions, whether torch
                     can run a CUDA kernel (decides "GPU" for the rest), compute capability
  install            pip install --no-build-isolation --no-deps --no-index -e . with
                     SOUPKERN_BUILD_CUDA=1 when nvcc is found (else 0) and SOUPKERN_CUDA_ARCHS from
                     the detected compute capability (default 90); if that fails with CUDA, once more
                     without it (install_no_cuda) so that the Triton stages still run
  backends           python -m soupkern backends (with a GPU: cuda and triton must say yes)
  gpu_tests    [GPU] pytest -m gpu tests (TRITON_INTERPRET=0; pytest-xdist workers when installed)
  bench_gpu    [GPU] benchmarks/bench_gpu.py on ViT-L/14 (kernels K=2,4,8 bf16/fp32 + end to end)
  bench_soup_linear [GPU] benchmarks/bench_soup_linear.py --device cuda (default shapes, 5 repeats)
  bench_greedy [GPU] benchmarks/bench_greedy.py --device cuda (default sizes, 3 repeats)
  pack               everything below into one tarball

A stage that fails or runs out of time is recorded and the next one runs. After every stage the
summary (gpu_check.md + gpu_check.json: status, seconds, command, output tail of each stage;
device, driver, CUDA, python/torch/triton versions), the stage log (gpu_check.log) and the tarball
gpu_check.tar.gz (summary, each stage's full log, the build record soupkern/_cuda_build.json, the
pytest junit xml, and the results benchmarks/results/*_cuda.{md,json} and gpu_*.{md,json}) are
rewritten, so a run killed part way still leaves what it had. They go to $OUT when set (plus the
summary md/json and log as separate files: 4 files, no folders), else to --work-dir
(gpu_check_out/, git-ignored), which also holds the logs.

Exit status: 0 when no stage failed (GPU stages skipped for want of a GPU, or by --skip, do not
count), 1 when one failed, timed out or was left out for want of time (--budget-s), 130 when
interrupted; always after packing. Only the standard library is
imported here, so the check runs before anything is installed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PY = sys.executable or "python3"

TARBALL = "gpu_check.tar.gz"
SUMMARY = "gpu_check"  # .md / .json
STAGE_LOG = "gpu_check.log"
MAX_TARBALL = 15 << 20  # the device tool brings back files of at most 16 MiB
LOG_IN_TAR = 2 << 20  # each stage log's last bytes that go into the tarball
RESULT_PATTERNS = ("*_cuda.md", "*_cuda.json", "gpu_*.md", "gpu_*.json")
PACK_RESERVE_S = 10.0  # budget kept back for the final pack
MIN_STAGE_S = 5.0  # a stage that would get less than this is skipped for want of time
OUT_OF_TIME = "out of time budget"  # such a skip makes the check incomplete: exit status 1
TAIL_LINES = 25

# Sizes for the time box: on an H200 the whole check takes about 4-5 minutes (benchmarks/README.md).
VIT_MODEL = "vit_l14"  # 304M parameters: 0.6 GB per bf16 input, 4 inputs for the end-to-end rows
BENCH_GPU_ARGS = ["--model", VIT_MODEL, "--ks", "2,4,8", "--dtypes", "bf16,fp32", "--repeats", "5", "--e2e-repeats", "2"]
BENCH_SOUP_LINEAR_ARGS = ["--device", "cuda", "--repeats", "5"]
BENCH_GREEDY_ARGS = ["--device", "cuda", "--repeats", "3"]

# name: (time limit in seconds, GPU stage, one-line description)
STAGES: dict[str, tuple[float, bool, str]] = {
    "env": (90, False, "environment report: nvidia-smi, nvcc, python/torch/triton, a CUDA kernel through torch"),
    "install": (200, False, "pip install --no-build-isolation --no-deps --no-index -e . (builds soupkern._native, "
                            "soupkern._cuda with nvcc)"),
    "install_no_cuda": (120, False, "only when install failed with CUDA: the same with SOUPKERN_BUILD_CUDA=0"),
    "backends": (60, False, "python -m soupkern backends"),
    "gpu_tests": (120, True, "pytest -m gpu tests"),
    "bench_gpu": (100, True, f"benchmarks/bench_gpu.py {' '.join(BENCH_GPU_ARGS)}"),
    "bench_soup_linear": (75, True, f"benchmarks/bench_soup_linear.py {' '.join(BENCH_SOUP_LINEAR_ARGS)}"),
    "bench_greedy": (75, True, f"benchmarks/bench_greedy.py {' '.join(BENCH_GREEDY_ARGS)}"),
}

ENV_SNIPPET = r"""
import importlib, json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
for mod in ("numpy", "triton", "pybind11", "setuptools", "pip", "xdist", "safetensors"):
    try:
        info[mod] = str(getattr(importlib.import_module(mod), "__version__", "?"))
    except Exception as e:
        info[mod] = None
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = bool(torch.cuda.is_available())
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuda available:", info["cuda_available"], flush=True)
    if info["cuda_available"]:
        info["device_count"] = torch.cuda.device_count()
        devs = []
        for i in range(info["device_count"]):
            p = torch.cuda.get_device_properties(i)
            devs.append({"name": p.name, "capability": "%d.%d" % (p.major, p.minor),
                         "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count})
        info["devices"] = devs
        info["kernel_ok"] = float((torch.ones(1 << 20, device="cuda") * 2).sum().item()) == float(1 << 21)
        torch.cuda.synchronize()
        print("devices:", devs, "kernel ok:", info["kernel_ok"], flush=True)
except Exception as e:
    info["torch_error"] = "%s: %s" % (type(e).__name__, e)
    print("torch error:", info["torch_error"], flush=True)
print("GPU_CHECK_ENV=" + json.dumps(info), flush=True)
"""


class Interrupted(BaseException):
    """SIGINT/SIGTERM while a stage ran (a BaseException: no `except Exception` may swallow it)."""


@dataclass
class Result:
    name: str
    status: str = "pending"  # ok | failed | timeout | skipped | interrupted
    reason: str = ""
    seconds: float = 0.0
    command: str = ""
    returncode: int | None = None
    log: str = ""
    tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.status}: {self.reason}" if self.reason else self.status

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason, "label": self.label,
                "seconds": round(self.seconds, 2), "command": self.command, "returncode": self.returncode,
                "log": self.log, "tail": self.tail, **self.extra}


def tail_of(path: Path, lines: int = TAIL_LINES, max_bytes: int = 64 << 10) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.rstrip("\n").splitlines()[-lines:])


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End a stage's process group (it was started in a session of its own), TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:  # the leader is gone; KILL whatever of its group is left
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        except subprocess.TimeoutExpired:
            continue


def fmt_cmd(cmd: list[str], env_over: dict[str, str] | None = None) -> str:
    pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env_over or {}).items())
    shown = ["<probe script, see gpu_check.py>" if "\n" in c else shlex.quote(c) for c in cmd]
    return (pre + " " if pre else "") + " ".join(shown)


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.monotonic()
        self.started_wall = time.time()
        self.started_utc = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.work = Path(args.work_dir).resolve()
        self.logs = self.work / "logs"
        self.out = Path(args.out).resolve() if args.out else None
        self.results_dir = Path(args.results_dir).resolve()
        self.bench_workdir = Path(args.bench_workdir)
        self.results: list[Result] = []
        self.env: dict[str, Any] = {}
        self.gpu = False
        self.gpu_reason = "not checked (the env stage did not run)"
        self.deadline = time.monotonic()
        self.current: subprocess.Popen[bytes] | None = None
        self.prep: subprocess.Popen[bytes] | None = None
        self.timeouts = {name: spec[0] for name, spec in STAGES.items()}
        for item in args.stage_timeout:
            name, _, sec = item.partition("=")
            if name not in self.timeouts or not sec:
                raise SystemExit(f"--stage-timeout {item!r}: expected NAME=SECONDS with NAME in {', '.join(self.timeouts)}")
            self.timeouts[name] = float(sec)
        self.skip = {s for s in (args.skip or "").split(",") if s}
        unknown = self.skip - set(STAGES)
        if unknown:
            raise SystemExit(f"--skip: unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(STAGES)}")
        if self.logs.exists():
            shutil.rmtree(self.logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        for stale in (self.work / "junit_gpu.xml", self.work / "_cuda_build.json"):
            stale.unlink(missing_ok=True)
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
        (self.work / STAGE_LOG).write_text("")

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def say(self, msg: str) -> None:
        line = f"[gpu-check {self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        with open(self.work / STAGE_LOG, "a") as f:
            f.write(line + "\n")

    def child_env(self, **over: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", TRITON_INTERPRET="0", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
                   MPLBACKEND="Agg")
        env.update(over)
        return env

    def run_cmd(self, res: Result, cmd: list[str], timeout: float, env_over: dict[str, str] | None = None,
                append: bool = False) -> int | None:
        """Run `cmd` in the repo root, output to the stage log; the exit code, or None on timeout."""
        log = self.logs / f"{len(self.results):02d}_{res.name}.log"
        res.log = str(log.relative_to(self.work))
        shown = fmt_cmd(cmd, env_over)
        res.command = (res.command + "; " if res.command and append else "") + shown
        with open(log, "ab") as f:
            f.write(f"$ {shown}\n".encode())
            f.flush()
            try:
                proc = subprocess.Popen(cmd, cwd=REPO, env=self.child_env(**(env_over or {})), stdout=f,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                f.write(f"cannot start: {e}\n".encode())
                return 127
            self.current = proc
            try:
                rc = proc.wait(timeout=max(0.01, timeout))
            except subprocess.TimeoutExpired:
                kill_group(proc)
                f.write(f"\n[gpu-check] killed after {timeout:.0f} s (time limit)\n".encode())
                return None
            except Interrupted:
                kill_group(proc)
                f.write(b"\n[gpu-check] interrupted\n")
                raise
            finally:
                self.current = None
            kill_group(proc)  # anything it left running in its group
        return rc

    def stage_timeout(self, name: str) -> float:
        """What a stage starting now may take: its own limit, within the budget less the pack's reserve."""
        return min(self.timeouts[name], self.left() - PACK_RESERVE_S)

    def limit(self) -> float:
        """Seconds left to the running stage (its deadline was set when it started)."""
        return self.deadline - time.monotonic()

    # ------------------------------------------------------------------ stages
    def stage(self, name: str, fn: Callable[[Result], None]) -> Result:
        res = Result(name)
        spec = STAGES[name]
        if name in self.skip:
            res.status, res.reason = "skipped", "--skip"
        elif spec[1] and not self.gpu:
            res.status, res.reason = "skipped", "no GPU"
            res.extra["why"] = self.gpu_reason
        elif self.left() - PACK_RESERVE_S < MIN_STAGE_S:
            res.status, res.reason = "skipped", OUT_OF_TIME
        if res.status != "skipped":
            self.deadline = time.monotonic() + self.stage_timeout(name)
            self.say(f"{name}: start (limit {self.stage_timeout(name):.0f} s)")
            t = time.monotonic()
            try:
                fn(res)
            except Interrupted:
                res.status, res.reason = "interrupted", "SIGINT/SIGTERM"
                raise
            except Exception as e:  # noqa: BLE001 - a broken stage must not stop the others
                res.status, res.reason = "failed", f"{type(e).__name__}: {e}"
            finally:
                res.seconds = time.monotonic() - t
                if res.log:
                    res.tail = tail_of(self.work / res.log)
                self.results.append(res)
                self.finish_stage(res)
            return res
        self.results.append(res)
        self.finish_stage(res)
        return res

    def finish_stage(self, res: Result) -> None:
        self.say(f"{res.name}: {res.label} ({res.seconds:.1f} s)")
        if res.status in ("failed", "timeout") and res.tail:
            print("\n".join("    | " + line for line in res.tail.splitlines()[-15:]), flush=True)
        self.flush()

    def judge(self, res: Result, rc: int | None, timeout: float) -> None:
        res.returncode = rc
        if rc is None:
            res.status, res.reason = "timeout", f"killed after {timeout:.0f} s"
        elif rc != 0:
            res.status, res.reason = "failed", f"exit {rc}"
        else:
            res.status = "ok"

    def do_env(self, res: Result) -> None:
        log = self.logs / f"{len(self.results):02d}_env.log"
        res.log = str(log.relative_to(self.work))
        env: dict[str, Any] = {"date_utc": self.started_utc, "os": f"{platform.system()} {platform.release()} "
                               f"{platform.machine()}", "cpus": os.cpu_count(), "driver_python": sys.version.split()[0]}
        env["cpu"] = _cpu_model()
        env["ram_gib"] = _ram_gib()
        env["disk_free_gib"] = {str(p): round(shutil.disk_usage(p).free / 2**30, 1)
                                for p in {REPO, Path("/tmp")} if p.exists()}
        env["git_commit"] = _git_commit()
        smi = shutil.which("nvidia-smi")
        env["nvidia_smi"] = smi
        gpus_listed: list[dict[str, str]] = []
        if smi:
            self.run_cmd(res, [smi], 30, append=True)
            text = log.read_text(errors="replace")
            m = re.search(r"CUDA Version:\s*([\d.]+)", text)
            env["driver_cuda"] = m.group(1) if m else None
            for fields in ("index,name,driver_version,memory.total,compute_cap", "index,name,driver_version,memory.total"):
                q = _quiet([smi, f"--query-gpu={fields}", "--format=csv,noheader"])
                if q is not None and q.returncode == 0:
                    keys = fields.split(",")
                    gpus_listed = [dict(zip(keys, (v.strip() for v in line.split(","))))
                                   for line in q.stdout.strip().splitlines() if line.strip()]
                    break
            env["gpus"] = gpus_listed
            env["driver"] = gpus_listed[0].get("driver_version") if gpus_listed else None
        nvcc = _find_nvcc()
        env["nvcc"] = nvcc
        q = _quiet([nvcc, "--version"]) if nvcc else None
        if q is not None:
            env["nvcc_version"] = (q.stdout.strip().splitlines() or [""])[-1]
        with open(log, "a") as f:
            f.write(f"nvcc: {nvcc} {env.get('nvcc_version', '')}\n")
        timeout = self.limit()
        rc = self.run_cmd(res, [PY, "-c", ENV_SNIPPET], timeout, append=True)
        m = re.search(r"^GPU_CHECK_ENV=(.*)$", log.read_text(errors="replace"), re.MULTILINE)
        py = json.loads(m.group(1)) if m else {}
        env.update(py)
        self.env = env
        if self.args.no_gpu:
            self.gpu, self.gpu_reason = False, "--no-gpu"
        elif rc is None:
            self.gpu, self.gpu_reason = False, "the torch probe timed out"
        elif py.get("torch_error") or not py:
            self.gpu, self.gpu_reason = False, f"torch unusable: {py.get('torch_error', f'probe exit {rc}')}"
        elif not py.get("cuda_available"):
            self.gpu, self.gpu_reason = False, "torch.cuda.is_available() is False"
        elif not py.get("kernel_ok"):
            self.gpu, self.gpu_reason = False, "a CUDA kernel through torch gave a wrong result"
        else:
            self.gpu, self.gpu_reason = True, "torch runs CUDA kernels"
        env["gpu"] = self.gpu
        env["device"] = ", ".join(d["name"] for d in py.get("devices", [])) or None
        env["gpu_reason"] = self.gpu_reason
        caps = sorted({d["capability"] for d in py.get("devices", [])}
                      or {g["compute_cap"] for g in gpus_listed if g.get("compute_cap", "").replace(".", "").isdigit()})
        env["capabilities"] = caps
        self.judge(res, rc, timeout)
        if res.status == "ok" and gpus_listed and not self.gpu and not self.args.no_gpu:
            res.status, res.reason = "failed", f"nvidia-smi lists {len(gpus_listed)} GPU(s) but {self.gpu_reason}"
        if res.status == "ok" and not self.gpu:
            res.reason = ""
            res.extra["note"] = f"no GPU: {self.gpu_reason}"
        res.extra["gpu"] = self.gpu

    def cuda_archs(self) -> str:
        if self.args.cuda_archs:
            return self.args.cuda_archs
        caps = self.env.get("capabilities") or []
        return ";".join(c.replace(".", "") for c in caps) or "90"

    def do_install(self, res: Result, cuda: bool) -> None:
        over = {"PIP_NO_INDEX": "1"}
        nvcc = self.env.get("nvcc") or _find_nvcc()
        if cuda and nvcc:
            over.update(SOUPKERN_BUILD_CUDA="1", SOUPKERN_CUDA_ARCHS=self.cuda_archs())
            if not shutil.which("nvcc") and not os.environ.get("CUDA_HOME"):
                over["CUDA_HOME"] = str(Path(nvcc).resolve().parent.parent)
        else:
            over["SOUPKERN_BUILD_CUDA"] = "0"
        res.extra["cuda_build_requested"] = over["SOUPKERN_BUILD_CUDA"] == "1"
        timeout = self.limit()
        rc = self.run_cmd(res, [PY, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
                          timeout, over)
        self.judge(res, rc, timeout)
        record = REPO / "soupkern" / "_cuda_build.json"
        if record.exists():
            shutil.copy2(record, self.work / "_cuda_build.json")
            try:
                res.extra["cuda_build"] = json.loads(record.read_text())
            except ValueError:
                pass
        build = res.extra.get("cuda_build") or {}
        if res.status == "ok":
            res.extra["note"] = (f"CUDA extension built for {build.get('archs')}" if build.get("built")
                                 else f"CUDA extension not built: {build.get('reason', '?')}")

    def do_backends(self, res: Result) -> None:
        timeout = self.limit()
        rc = self.run_cmd(res, [PY, "-m", "soupkern", "backends"], timeout)
        self.judge(res, rc, timeout)
        text = (self.work / res.log).read_text(errors="replace")
        rows = {m.group(1): (m.group(2), m.group(3).strip())
                for m in re.finditer(r"^(cpp|torch|cuda|triton)\s+(yes|no)\s+(.*)$", text, re.MULTILINE)}
        res.extra["backends"] = {k: {"available": v[0] == "yes", "reason": v[1]} for k, v in rows.items()}
        if res.status == "ok" and self.gpu:
            missing = [f"{k}: {rows[k][1]}" for k in ("cuda", "triton") if k in rows and rows[k][0] != "yes"]
            if missing:
                res.status, res.reason = "failed", "GPU backend unavailable: " + "; ".join(missing)

    def do_gpu_tests(self, res: Result) -> None:
        junit = self.work / "junit_gpu.xml"
        cmd = [PY, "-m", "pytest", "-q", "-m", "gpu", "tests", "-rfEs", "--maxfail=10", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        workers = self.args.test_workers
        if workers > 1 and self.env.get("xdist"):
            cmd += ["-n", str(workers)]
        timeout = self.limit()
        rc = self.run_cmd(res, cmd, timeout)
        self.judge(res, rc, timeout)
        counts = _junit_counts(junit)
        if counts:
            res.extra["tests"] = counts
            passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            res.extra["note"] = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                                 f"{counts['skipped']} skipped")
            if res.status == "ok" and passed == 0:
                res.status, res.reason = "failed", "no GPU test ran (all skipped)"

    def start_prep(self) -> None:
        """Write bench_gpu's ViT ingredients in the background while the install and tests run."""
        if not self.gpu or "bench_gpu" in self.skip or "--skip-e2e" in BENCH_GPU_ARGS:
            return
        log = self.logs / "prep_vit_ingredients.log"
        cmd = [PY, str(BENCH_DIR / "vit.py"), "--model", VIT_MODEL, "--dtype", "bf16", "-n", "4",
               "--outdir", str(self.bench_workdir)]
        with open(log, "ab") as f:
            f.write(f"$ {fmt_cmd(cmd)}\n".encode())
            try:
                self.prep = subprocess.Popen(cmd, cwd=REPO, env=self.child_env(), stdout=f, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                f.write(f"cannot start: {e}\n".encode())
        self.say("prep: writing the ViT ingredients of bench_gpu in the background")

    def wait_prep(self, limit: float) -> None:
        if self.prep is None:
            return
        try:
            rc = self.prep.wait(timeout=max(0.01, limit))
            self.say(f"prep: ingredients ready (exit {rc})")
        except subprocess.TimeoutExpired:
            self.say("prep: still running; stopped (bench_gpu writes what is missing)")
        kill_group(self.prep)
        self.prep = None

    def do_bench(self, res: Result, script: str, args: list[str]) -> None:
        if res.name == "bench_gpu":
            self.wait_prep(min(60.0, self.limit() / 2))
            args = [*args, "--workdir", str(self.bench_workdir)]
        elif res.name == "bench_greedy":
            args = [*args, "--workdir", str(self.bench_workdir / "digits")]
        before = _mtimes(self.results_dir)
        timeout = self.limit()
        rc = self.run_cmd(res, [PY, str(Path("benchmarks") / script), *args, "--results-dir", str(self.results_dir)],
                          timeout)
        self.judge(res, rc, timeout)
        res.extra["wrote"] = sorted(name for name, t in _mtimes(self.results_dir).items() if before.get(name) != t)
        res.extra["note"] = "wrote " + ", ".join(res.extra["wrote"]) if res.extra["wrote"] else "wrote no result file"

    # ------------------------------------------------------------------ outputs
    def result_files(self) -> list[tuple[Path, bool]]:
        files: dict[Path, bool] = {}
        if self.results_dir.is_dir():
            for pat in RESULT_PATTERNS:
                for p in self.results_dir.glob(pat):
                    files[p] = p.stat().st_mtime >= self.started_wall - 1
        return sorted(files.items())

    def summary(self) -> dict[str, Any]:
        failed = [r.name for r in self.results
                  if r.status in ("failed", "timeout", "interrupted") or r.reason in (OUT_OF_TIME, "not reached")]
        return {
            "title": "soupkern GPU check",
            "started_utc": self.started_utc,
            "elapsed_s": round(self.elapsed(), 1),
            "budget_s": self.args.budget_s,
            "gpu": self.gpu,
            "gpu_reason": self.gpu_reason,
            "ok": not failed,
            "failed": failed,
            "environment": self.env,
            "stages": [r.as_dict() for r in self.results],
            "results": [{"file": p.name, "written_in_this_run": new} for p, new in self.result_files()],
            "command": " ".join(shlex.quote(a) for a in [Path(PY).name, "benchmarks/gpu_check.py", *sys.argv[1:]]),
        }

    def summary_md(self, s: dict[str, Any]) -> str:
        e = s["environment"]
        devs = e.get("devices") or []
        dev = ", ".join(f"{d['name']} (sm {d['capability']}, {d['memory_gib']} GiB, {d['multiprocessors']} SMs)"
                        for d in devs) or ", ".join(g.get("name", "?") for g in e.get("gpus") or []) or "none"
        lines = [
            "# soupkern GPU check", "",
            f"- started (UTC): {s['started_utc']}; elapsed {s['elapsed_s']} s of a {s['budget_s']:.0f} s budget; "
            f"overall: {'ok' if s['ok'] else 'FAILED: ' + ', '.join(s['failed'])}",
            f"- GPU: {'yes' if s['gpu'] else 'no'} ({s['gpu_reason']}); device: {dev}",
            f"- driver {e.get('driver') or 'n/a'} (CUDA {e.get('driver_cuda') or 'n/a'}); nvcc: "
            f"{e.get('nvcc_version') or e.get('nvcc') or 'not found'}",
            f"- python {e.get('python', '?')}, torch {e.get('torch', '?')} (CUDA {e.get('torch_cuda')}), "
            f"triton {e.get('triton')}, numpy {e.get('numpy')}, pytest-xdist {e.get('xdist')}",
            f"- machine: {e.get('cpu', '?')}, {e.get('cpus', '?')} CPUs, {e.get('ram_gib', '?')} GiB RAM, {e.get('os', '?')}; "
            f"git {e.get('git_commit') or 'n/a'}",
            f"- command: `{s['command']}`", "",
            "| stage | status | seconds | note |", "| --- | --- | --- | --- |",
        ]
        for r in s["stages"]:
            note = r.get("note") or r.get("why") or ""
            lines.append(f"| {r['name']} | {r['label']} | {r['seconds']:.1f} | {str(note).replace('|', '/')} |")
        if s["results"]:
            lines += ["", "Results packed: " + ", ".join(
                f"{x['file']}{'' if x['written_in_this_run'] else ' (older, not from this run)'}" for x in s["results"])]
        for r in s["stages"]:
            if r["status"] == "skipped":
                continue
            lines += ["", f"## {r['name']}: {r['label']}", "", f"`{r['command']}`" if r["command"] else "", ""]
            if r.get("wrote"):
                lines += [f"wrote: {', '.join(r['wrote'])}", ""]
            if r["tail"]:
                lines += ["```", r["tail"], "```"]
        return "\n".join(lines) + "\n"

    def flush(self) -> None:
        """Summary, stage log and tarball, in the work dir and $OUT; never raises."""
        try:
            s = self.summary()
            md = self.summary_md(s)
            _write(self.work / f"{SUMMARY}.json", json.dumps(s, indent=1))
            _write(self.work / f"{SUMMARY}.md", md)
            self.pack()
            if self.out:
                for name in (f"{SUMMARY}.md", f"{SUMMARY}.json", STAGE_LOG):
                    _copy(self.work / name, self.out / name)
        except Exception as e:  # noqa: BLE001
            print(f"[gpu-check] could not write the summary or tarball: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def pack(self) -> Path:
        dest_dir = self.out or self.work
        dest = dest_dir / TARBALL
        for log_limit in (LOG_IN_TAR, 64 << 10):
            tmp = dest_dir / (TARBALL + ".part")
            with tarfile.open(tmp, "w:gz") as tar:
                for name in (f"{SUMMARY}.md", f"{SUMMARY}.json", STAGE_LOG, "_cuda_build.json", "junit_gpu.xml"):
                    if (self.work / name).exists():
                        tar.add(self.work / name, arcname=f"gpu_check/{name}")
                for log in sorted(self.logs.glob("*.log")):
                    _add_tail(tar, log, f"gpu_check/logs/{log.name}", log_limit)
                for p, _ in self.result_files():
                    if p.stat().st_size <= 4 << 20:
                        tar.add(p, arcname=f"gpu_check/results/{p.name}")
            os.replace(tmp, dest)
            if dest.stat().st_size <= MAX_TARBALL:
                break
        return dest

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        self.say(f"start: repo {REPO}, python {PY}, budget {self.args.budget_s:.0f} s, out {self.out or self.work}")
        interrupted = False
        try:
            self.stage("env", self.do_env)
            self.start_prep()
            inst = self.stage("install", lambda r: self.do_install(r, cuda=True))
            if inst.status in ("failed", "timeout") and inst.extra.get("cuda_build_requested"):
                self.stage("install_no_cuda", lambda r: self.do_install(r, cuda=False))
            self.stage("backends", self.do_backends)
            self.stage("gpu_tests", self.do_gpu_tests)
            self.stage("bench_gpu", lambda r: self.do_bench(r, "bench_gpu.py", BENCH_GPU_ARGS))
            self.stage("bench_soup_linear", lambda r: self.do_bench(r, "bench_soup_linear.py", BENCH_SOUP_LINEAR_ARGS))
            self.stage("bench_greedy", lambda r: self.do_bench(r, "bench_greedy.py", BENCH_GREEDY_ARGS))
        except Interrupted:
            interrupted = True
            self.say("interrupted: packing what there is")
        finally:
            if self.prep is not None:
                kill_group(self.prep)
            if self.current is not None:
                kill_group(self.current)
        for sig in (signal.SIGINT, signal.SIGTERM):  # the last pack takes a second: let it finish
            signal.signal(sig, signal.SIG_IGN)
        done = {r.name for r in self.results}
        for name in STAGES:
            if name not in done and name != "install_no_cuda":
                self.results.append(Result(name, "skipped", "interrupted" if interrupted else "not reached"))
        t = time.monotonic()
        pack = Result("pack", "ok", command=f"tar czf {(self.out or self.work) / TARBALL} ...")
        self.results.append(pack)
        self.flush()  # the tarball, with this summary in it
        tarball = (self.out or self.work) / TARBALL
        pack.seconds = time.monotonic() - t
        if not tarball.exists():
            pack.status, pack.reason = "failed", "no tarball written"
        else:
            pack.extra["note"] = f"{tarball} ({tarball.stat().st_size / 2**20:.2f} MiB)"
            if tarball.stat().st_size > 16 << 20:
                pack.status, pack.reason = "failed", "tarball over 16 MiB"
        self.flush()
        s = self.summary()
        print("\n" + "\n".join(line for line in self.summary_md(s).split("\n## ")[0].splitlines()), flush=True)
        print(f"\nsummary: {(self.out or self.work) / (SUMMARY + '.md')}; tarball: {tarball}", flush=True)
        if interrupted:
            return 130
        return 0 if s["ok"] else 1


# ---------------------------------------------------------------------- helpers
def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def _copy(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    tmp = dst.with_name(dst.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _add_tail(tar: tarfile.TarFile, path: Path, arcname: str, limit: int) -> None:
    size = path.stat().st_size
    if size <= limit:
        tar.add(path, arcname=arcname)
        return
    with open(path, "rb") as f:
        f.seek(size - limit)
        data = f"[gpu-check: first {size - limit} bytes of {size} left out]\n".encode() + f.read()
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime = len(data), int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*") if p.is_file()} if folder.is_dir() else {}


def _quiet(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + [shutil.which("nvcc") or "",
                                                                          "/usr/local/cuda/bin/nvcc"]:
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def _junit_counts(path: Path) -> dict[str, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return counts


def _on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=290.0, help="time for the whole check, packing included (290)")
    ap.add_argument("--skip", default="", help=f"comma list of stages to skip: {', '.join(STAGES)}")
    ap.add_argument("--stage-timeout", action="append", default=[], metavar="NAME=SECONDS",
                    help="override one stage's time limit (repeatable)")
    ap.add_argument("--cuda-archs", default=None,
                    help="SOUPKERN_CUDA_ARCHS for the install (default: the detected compute capability, else 90)")
    ap.add_argument("--no-gpu", action="store_true", help="act as on a machine without a GPU (GPU stages skipped)")
    ap.add_argument("--test-workers", type=int, default=4, help="pytest-xdist workers for gpu_tests when installed "
                    "(Triton compiles in parallel); 0 or 1: one process")
    ap.add_argument("--out", default=os.environ.get("OUT") or None,
                    help="where the tarball and summary go (default $OUT, else --work-dir)")
    ap.add_argument("--work-dir", default=str(REPO / "gpu_check_out"), help="logs and summary (default gpu_check_out/)")
    ap.add_argument("--results-dir", default=str(BENCH_DIR / "results"),
                    help="where the benchmarks write their results (default benchmarks/results)")
    ap.add_argument("--bench-workdir", default="/tmp/soupkern-gpu-check",
                    help="benchmark ingredients and outputs (ViT-L/14 bf16 x 4: 2.4 GB; digits)")
    ap.add_argument("--list", action="store_true", help="print the stages and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, (limit, gpu, what) in STAGES.items():
            print(f"{name:<18} {'GPU' if gpu else '   '} limit {limit:4.0f} s  {what}")
        print(f"{'pack':<18}     {TARBALL} (+ {SUMMARY}.md/.json, {STAGE_LOG}) into $OUT or --work-dir")
        return 0
    check = Check(args)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return check.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
