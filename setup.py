"""Build of soupkern's C++ extension (`soupkern._native`).

Framework-free: no torch headers, so the extension does not depend on torch's ABI. The kernel is
compiled once per ISA level (csrc/wsum_<isa>.cpp) and chosen at run time; never -march=native,
so a build runs on any x86-64 machine.
"""

import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CSRC = "csrc"
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

setup(ext_modules=[native], cmdclass={"build_ext": build_ext})
