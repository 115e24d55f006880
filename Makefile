# Set-up and main entry points. `make demo` and `make test` each install everything first, so
# both work on a bare machine (Python 3.10+, a C++ compiler, network access to PyPI).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench-smoke gpu-check

# torch is installed first and pinned by constraints.txt so pip keeps the CPU build here.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test,demo]"
	@# byte-compile as a wheel install does: an editable install leaves that to the first import,
	@# which never happens under PYTHONDONTWRITEBYTECODE=1 (then every command recompiles ~50 ms)
	$(PYTHON) -m compileall -q soupkern

demo: install
	$(PYTHON) -m soupkern demo

test: install
	$(PYTHON) -m pytest -q

# On a GPU machine with its own torch/triton and no network (never `install`): editable install with
# the CUDA build, GPU tests, every GPU benchmark at a reduced size, one tarball in $OUT (else
# gpu_check_out/); at most ~5 minutes on an H200. Runs anywhere; without a GPU the GPU stages say
# "skipped: no GPU". GPU_CHECK_ARGS passes options (python3 benchmarks/gpu_check.py --help).
gpu-check:
	PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
