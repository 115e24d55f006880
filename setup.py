"""Build of soupkern's extensions: `soupkern._native` (C++/OpenMP) and `soupkern._cuda` (CUDA).

Both are framework-free: no torch headers, so neither depends on torch's ABI (torch's
CUDAExtension does not work with the CPU torch wheel anyway). The C++ kernel is compiled once per
ISA level (csrc/wsum_<isa>.cpp) and chosen at run time; never -march=native, so a build runs on
any x86-64 machine.

The CUDA kernels (csrc/cuda/*.cu) are compiled by nvcc in a custom build_ext step and linked,
with the pybind11 bindings (csrc/cuda/*.cpp, compiled by the C++ compiler), against the static
CUDA runtime (no libcuda at link time: the runtime finds the driver when the module first asks
for a device, so the module imports on machines without a GPU). Environment:

  SOUPKERN_BUILD_CUDA   1: build it, fail if nvcc is missing; 0: skip it;
                        unset: build it when nvcc is found, else skip with a note.
  SOUPKERN_CUDA_ARCHS   GPU architectures, ';'-separated (default "80;90": A100 and H100 machine
                        code). Forms: 80, 8.0, sm_80, 90a; suffix +PTX embeds PTX of that arch too.
                        Without any +PTX the highest plain arch's PTX is embedded, so newer GPUs
                        (Blackwell, ...) run the kernels through the driver's JIT.
  CUDA_HOME             toolkit root; default: derived from the nvcc on PATH (the folder above its
                        bin/, or the TOP that nvcc reports when it is a wrapper script).

No hardware is probed and nothing is downloaded here. What happened is recorded in
soupkern/_cuda_build.json next to the extensions; `soupkern backends` reports it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CSRC = "csrc"
CUDA_SRC = os.path.join(CSRC, "cuda")
DEFAULT_CUDA_ARCHS = "80;90"
BUILD_INFO = "_cuda_build.json"
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-Xcompiler", "-fPIC", "--threads", "0"]
_ARCH = re.compile(r"^(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)(\+ptx)?$", re.IGNORECASE)


class CudaBuildError(RuntimeError):
    """The CUDA build was asked for (SOUPKERN_BUILD_CUDA=1) or configured wrongly."""


@dataclass
class CudaPlan:
    """Whether and how to build soupkern._cuda."""

    build: bool
    reason: str  # why not, or a description of the build
    nvcc: str | None = None
    home: str | None = None
    lib_dir: str | None = None
    archs: str = DEFAULT_CUDA_ARCHS
    gencode: list[str] = field(default_factory=list)
    required: bool = False  # SOUPKERN_BUILD_CUDA=1: a failed CUDA build fails the install


def parse_archs(spec: str) -> list[tuple[int, str, bool]]:
    """'80;9.0a;sm_100+PTX' -> [(80, '', False), (90, 'a', False), (100, '', True)], sorted by
    number (compared as integers, never as strings); duplicates merged."""
    seen: dict[tuple[int, str], bool] = {}
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        m = _ARCH.match(token)
        if not m:
            raise CudaBuildError(f"SOUPKERN_CUDA_ARCHS: cannot parse '{token}' (expected e.g. 80, 8.0, sm_90, 90a, 90+PTX)")
        major, minor, suffix, ptx = m.groups()
        number = int(major) * 10 + int(minor) if minor is not None else int(major)
        if number < 10:
            raise CudaBuildError(f"SOUPKERN_CUDA_ARCHS: '{token}' is not a GPU architecture (write 8.0 or 80)")
        key = (number, suffix.lower())
        seen[key] = seen.get(key, False) or ptx is not None
    if not seen:
        raise CudaBuildError("SOUPKERN_CUDA_ARCHS is empty")
    return sorted(((n, s, p) for (n, s), p in seen.items()), key=lambda a: (a[0], a[1]))


def gencode_flags(spec: str) -> list[str]:
    """nvcc -gencode flags: machine code for every arch, PTX for those marked +PTX, or else for
    the highest arch without a/f suffix (arch-specific PTX does not run on later GPUs)."""
    archs = parse_archs(spec)
    flags = [f"-gencode=arch=compute_{n}{s},code=sm_{n}{s}" for n, s, _ in archs]
    ptx = [(n, s) for n, s, p in archs if p]
    if not ptx:
        plain = [(n, s) for n, s, _ in archs if not s]
        ptx = plain[-1:] if plain else []
    flags += [f"-gencode=arch=compute_{n}{s},code=compute_{n}{s}" for n, s in ptx]
    return flags


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit root an nvcc (possibly a wrapper script) reports in a dry run."""
    try:
        r = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^#\$ TOP=(.*)$", r.stdout + r.stderr, re.MULTILINE)
    return os.path.normpath(m.group(1).strip()) if m else None


def cudart_dir(home: str) -> str | None:
    """The folder holding libcudart_static.a under a toolkit root."""
    for sub in ("lib64", "lib", os.path.join("targets", "*", "lib")):
        for d in sorted(glob.glob(os.path.join(home, sub))):
            if os.path.isfile(os.path.join(d, "libcudart_static.a")):
                return d
    return None


def find_cuda(env: dict[str, str]) -> tuple[str | None, str | None]:
    """(nvcc, toolkit root): CUDA_HOME when set, else the nvcc on PATH and the folder above its
    bin/ (resolving symlinks), else the root a wrapper-script nvcc reports. (None, None) if none."""
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        nvcc = os.path.join(home, "bin", "nvcc")
        return (nvcc if os.access(nvcc, os.X_OK) else None), home
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc is None:
        return None, None
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if cudart_dir(home) is None:
        home = _nvcc_top(nvcc) or home
    return nvcc, home


def plan_cuda(env: dict[str, str] | None = None) -> CudaPlan:
    """Decide the CUDA build from the environment. Raises CudaBuildError when the build is asked
    for (SOUPKERN_BUILD_CUDA=1) but cannot happen, or SOUPKERN_CUDA_ARCHS is malformed."""
    env = dict(os.environ) if env is None else env
    want = env.get("SOUPKERN_BUILD_CUDA", "").strip().lower()
    if want not in ("", "0", "1", "false", "true", "no", "yes", "off", "on"):
        raise CudaBuildError(f"SOUPKERN_BUILD_CUDA must be 0 or 1, got '{env['SOUPKERN_BUILD_CUDA']}'")
    if want in ("0", "false", "no", "off"):
        return CudaPlan(False, "SOUPKERN_BUILD_CUDA=0 at build time")
    required = want in ("1", "true", "yes", "on")
    nvcc, home = find_cuda(env)
    if nvcc is None:
        where = f"CUDA_HOME={home} has no bin/nvcc" if home else "nvcc not found at build time"
        if required:
            raise CudaBuildError(f"SOUPKERN_BUILD_CUDA=1 but {where}: install the CUDA toolkit, put nvcc on PATH "
                                 "or set CUDA_HOME (or build with SOUPKERN_BUILD_CUDA=0)")
        return CudaPlan(False, where)
    home = str(home)
    lib_dir = cudart_dir(home)
    if lib_dir is None:
        msg = f"no libcudart_static.a under {home} (the toolkit of {nvcc})"
        if required:
            raise CudaBuildError(f"SOUPKERN_BUILD_CUDA=1 but {msg}; set CUDA_HOME to the toolkit root")
        return CudaPlan(False, msg)
    archs = env.get("SOUPKERN_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
    return CudaPlan(True, f"built with {nvcc} for {archs}", nvcc, home, lib_dir, archs, gencode_flags(archs), required)


def _newer(target: str, sources: list[str]) -> bool:
    return not os.path.exists(target) or any(os.path.getmtime(s) > os.path.getmtime(target) for s in sources)


class BuildExt(build_ext):
    """pybind11's build_ext plus the nvcc step for soupkern._cuda (started before the C++
    extension is compiled, so both compilers run at once)."""

    def run(self) -> None:
        self._nvcc_jobs: list[tuple[subprocess.Popen[bytes] | None, str, list[str]]] = []
        if CUDA.build and any(e.name == "soupkern._cuda" for e in self.extensions):
            self._start_nvcc()
        try:
            super().run()
        finally:
            for proc, obj, _ in self._nvcc_jobs:
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    if os.path.exists(obj):  # a truncated object newer than its source would be reused
                        os.unlink(obj)
        self._write_build_info()

    def _start_nvcc(self) -> None:
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        headers = glob.glob(os.path.join(CUDA_SRC, "*.h")) + [os.path.join(CSRC, "soupkern.h")]
        arch_stamp = os.path.join(out_dir, "archs.txt")
        flags = NVCC_FLAGS + CUDA.gencode + [f"-I{CSRC}"]
        stale_flags = not os.path.exists(arch_stamp) or open(arch_stamp).read() != " ".join(flags)
        for src in sorted(glob.glob(os.path.join(CUDA_SRC, "*.cu"))):
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            cmd = [str(CUDA.nvcc), "-c", src, "-o", obj, *flags]
            proc = None
            if self.force or stale_flags or _newer(obj, [src, *headers]):
                print(" ".join(cmd), flush=True)
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self._nvcc_jobs.append((proc, obj, cmd))
        with open(arch_stamp, "w") as f:
            f.write(" ".join(flags))

    def build_extensions(self) -> None:
        super().build_extensions()
        if not CUDA.build:  # an optional CUDA build that failed: nothing to copy or install for it
            self.extensions = [e for e in self.extensions if e.name != "soupkern._cuda"]

    def build_extension(self, ext: Pybind11Extension) -> None:
        if ext.name != "soupkern._cuda":
            super().build_extension(ext)
            return
        try:
            objects = []
            for proc, obj, cmd in self._nvcc_jobs:
                if proc is not None:
                    out, _ = proc.communicate()
                    if proc.returncode != 0:
                        if os.path.exists(obj):
                            os.unlink(obj)
                        sys.stderr.write(out.decode(errors="replace"))
                        raise CudaBuildError(f"nvcc failed (exit {proc.returncode}): {' '.join(cmd)}")
                objects.append(obj)
            ext.extra_objects = objects
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - optional unless SOUPKERN_BUILD_CUDA=1
            if CUDA.required:
                raise
            CUDA.build, CUDA.reason = False, f"CUDA build failed ({e}); set SOUPKERN_BUILD_CUDA=1 to make it an error"
            print(f"soupkern: warning: {CUDA.reason}; installing without the CUDA extension", file=sys.stderr, flush=True)

    def _write_build_info(self) -> None:
        info = {"built": CUDA.build, "reason": CUDA.reason, "archs": CUDA.archs if CUDA.build else None,
                "nvcc": CUDA.nvcc, "cuda_home": CUDA.home}
        path = os.path.join(os.path.dirname(self.get_ext_fullpath("soupkern._native")), BUILD_INFO)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")


def extensions() -> list[Pybind11Extension]:
    sources = sorted(os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith(".cpp"))
    native = Pybind11Extension(
        "soupkern._native",
        sources,
        include_dirs=[CSRC],
        depends=[os.path.join(CSRC, f) for f in ("soupkern.h", "wsum_impl.inc")],
        cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )
    exts = [native]
    if CUDA.build:
        exts.append(Pybind11Extension(
            "soupkern._cuda",
            sorted(glob.glob(os.path.join(CUDA_SRC, "*.cpp"))),
            include_dirs=[CSRC, CUDA_SRC],
            depends=sorted(glob.glob(os.path.join(CUDA_SRC, "*.cu")) + glob.glob(os.path.join(CUDA_SRC, "*.h"))),
            cxx_std=17,
            define_macros=[("SOUPKERN_CUDA_ARCHS", json.dumps(CUDA.archs))],
            extra_compile_args=["-O2"],
            library_dirs=[str(CUDA.lib_dir)],
            libraries=["cudart_static", "dl", "rt", "pthread"],
        ))
    return exts


if __name__ == "__main__":
    try:
        CUDA = plan_cuda()
    except CudaBuildError as e:
        sys.exit(f"error: {e}")
    print(f"soupkern: CUDA extension {'will be ' + CUDA.reason if CUDA.build else 'skipped: ' + CUDA.reason}",
          file=sys.stderr, flush=True)
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
