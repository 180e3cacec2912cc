# Entry points: `make demo` (set up, then the main job), `make test` (set up, then the suite).
# Set-up makes .venv, installs requirements-dev.txt and this package (building fused_mbconv._C
# when a CUDA toolkit is found); it reruns only when its inputs change.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fused_mbconv-installed
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h kernels/*.cu kernels/*.cuh)

.PHONY: setup demo test test-gpu bench lint clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m fused_mbconv

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (small shapes only).
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

lint:
	$(PY) -m ruff check fused_mbconv tests bench setup.py

clean:
	rm -rf build *.egg-info fused_mbconv/*.so
