# Set-up and main entry points. `make demo` and `make test` each install everything first, so
# both work on a bare machine (Python 3.10+, a C++ compiler, network access to PyPI).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench-smoke

# torch is installed first and pinned by constraints.txt so pip keeps the CPU build here.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test,demo]"

demo: install
	$(PYTHON) -m soupkern demo

test: install
	$(PYTHON) -m pytest -q
