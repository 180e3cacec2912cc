# Entry points: `make demo` (set up, then the main job), `make test` (set up, then the suite).
# Set-up makes .venv, installs requirements-dev.txt and this package (building fused_mbconv._C
# when a CUDA toolkit is found); it reruns only when its inputs change.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fused_mbconv-installed
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h kernels/*.cu kernels/*.cuh)

.PHONY: setup demo test test-gpu test-oldest gpu-prep gpu-cache bench lint clean

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
# One worker per core, at most 4 (each imports torch; the interpreter is one Python thread): on
# CI's 2 cores the suite took 10:58 with 2 workers, 17:24 in one process (2026-11-27).
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n auto --maxprocesses 4 tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q tests

# The oldest torch and triton the package supports, as on the GPU machine's image (Python 3.12,
# torch 2.11, triton 3.6), on this CPU: the suite without the CUDA extension (built for the
# tree's own torch) and the Triton interpreter (3.6's runs these kernels' launch grids wrong), so
# the Triton kernels are compiled for sm_90 and launched through the stand-in driver, not run.
# Not in CI (~4 GB, ~10 min): run it before a GPU session; it caught a torch.compile break.
OLDEST := .venv-oldest
PYTHON_OLDEST ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python) python3.12)

$(OLDEST)/bin/python:
	$(PYTHON_OLDEST) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 timm numpy pytest

test-oldest: $(OLDEST)/bin/python
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(OLDEST)/bin/python -m pytest -q -p no:cacheprovider tests \
		--deselect tests/test_extension.py

# Before a GPU session's first device call (no GPU needed, ~70 min here): the suite on the GPU
# image's versions, then their Triton kernels (B0-B7's benchmark steps, the kernel benches', the
# blocks', the shape sweeps', the models step's, the tests step's) compiled ahead into
# .triton-cache.tar.xz (2026-11-27: 1902 kernels, 29.8 MiB xz-compressed, of which the tests step's ~850 kernels
# took ~30 min; carry it: the device tool sends at most 64 MiB with the tree), then the kernel
# benchmarks' depthwise kernels in their old program order, for gpu_check.sh's tile_order step
# (121 kernels, 6 min). 2026-11-28, with the GPU tests past 2^31 elements and the kernel benchmarks
# on all 14 B5 shapes of each op (171 kernels more, ~5 min): 2205 kernels, 33.6 MiB in all. After
# a kernel edit, the first command with --drop-unused instead of --fresh recompiles what changed
# (the depthwise program order's edit of 2026-11-27: 997 kernels, 65 min), then the second.
gpu-prep: test-oldest
	env -u TRITON_INTERPRET $(OLDEST)/bin/python bench/precompile_triton.py --fresh --variants b5,b0,b1,b2,b3,b4,b6,b7 \
		--kernel-benchmarks --blocks --gpu-sweeps --models-step --suite
	FUSED_MBCONV_CHANNELS_FASTEST=0 env -u TRITON_INTERPRET $(OLDEST)/bin/python bench/precompile_triton.py \
		--variants "" --kernel-benchmarks --kernel-shapes quick

# The archive is git-ignored, and a new checkout has none (2026-11-28's had none). The quick way
# to what a first device call uses (the models step, the sweeps, the kernel benchmarks on all B5
# shapes and tile_order's old order, B5's model steps), without the suite run and the tests
# step's and other variants' kernels: two compiling processes side by side (this VM has 2 cores),
# each into its own archive, then the shared cache directory packed whole. 2026-11-28: ~45 min,
# 1131 kernels, 14.7 MiB (kernel benchmarks 9 min, models step 7.5, sweeps 25, B5 8, old order 5.5).
PRECOMPILE := env -u TRITON_INTERPRET $(OLDEST)/bin/python bench/precompile_triton.py
gpu-cache: $(OLDEST)/bin/python
	($(PRECOMPILE) --variants "" --kernel-benchmarks --models-step --out /tmp/gpu-cache-1.tar.xz \
		&& $(PRECOMPILE) --variants b5 --out /tmp/gpu-cache-2.tar.xz) & first=$$!; \
	$(PRECOMPILE) --variants "" --gpu-sweeps --out /tmp/gpu-cache-3.tar.xz \
		&& FUSED_MBCONV_CHANNELS_FASTEST=0 $(PRECOMPILE) --variants "" --kernel-benchmarks --kernel-shapes quick \
		--out /tmp/gpu-cache-4.tar.xz; second=$$?; wait $$first && test $$second = 0
	$(PRECOMPILE) --variants ""
	rm -f /tmp/gpu-cache-[1-4].tar.xz

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

lint:
	$(PY) -m ruff check fused_mbconv tests bench setup.py

clean:
	rm -rf build *.egg-info fused_mbconv/*.so
