"""Shared test setup: which backends and device to test, and the dtype-aware comparison rule.

On a machine without a GPU the suite runs on the CPU; the Triton backend is exercised there
only under TRITON_INTERPRET=1 (the README's test command sets it), on small shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
from fast_interpreter import reuse_language_patch

import fused_mbconv
from fused_mbconv import parity

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1" and DEVICE.type == "cpu"
if INTERPRETED:
    reuse_language_patch()
BACKENDS = [b for b in ("reference", "triton", "cuda") if b in fused_mbconv.available_backends()]

# fp32 means fp32 in the comparisons: on a GPU torch runs fp32 convolutions in TF32 by default
# (cudnn.allow_tf32; 10-bit mantissas), and the fused GEMMs follow that flag as eager does, so
# fp32 eager, fused and their differences would all be TF32's (the H200 run of 2026-11-26: every
# fp32 projection, expansion and B0/B1 logits comparison failed, bf16 and fp16 passed). The TF32
# path has its own test (test_project_bn.py::test_tf32_follows_torch_flag).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# The Triton interpreter runs kernels element by element in numpy: keep its inputs small.
INTERPRETER_MAX_NUMEL = 8_000

# An error floor per dtype, relative to the output's magnitude (the whole-model checks' floor):
# about two units in the last place for fp16/bf16, and room for reordered fp32 sums.
FLOOR = parity.FLOOR


def past_int32(test):
    """A GPU test of a tensor past 2^31 elements (int64 offsets): it needs 40 GB of GPU memory,
    and all such tests run in one xdist worker (``--dist loadgroup``), one at a time (5-17 GB
    each)."""
    enough = torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 40 * 2**30
    test = pytest.mark.skipif(not enough, reason="needs a GPU with at least 40 GB")(test)
    return pytest.mark.xdist_group("past_int32")(test)


def past_int32_input(shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """Random fp16 of ``shape`` on the GPU, channels_last or NCHW; more than 2^31 elements."""
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    assert x.numel() > 2**31
    return x


def backend_params(*names: str) -> list:
    return [pytest.param(b, id=b) for b in BACKENDS if not names or b in names]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fused_mbconv.backend(request.param):
        yield request.param


def skip_if_slow(backend_name: str, *tensors_or_numel) -> None:
    """Skip shapes too large for the Triton interpreter (they run on the GPU instead)."""
    if backend_name == "triton" and INTERPRETED:
        numel = sum(t if isinstance(t, int) else t.numel() for t in tensors_or_numel)
        if numel > INTERPRETER_MAX_NUMEL:
            pytest.skip(f"{numel} elements is too slow for TRITON_INTERPRET; covered on the GPU")


def assert_matches(actual: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, name: str) -> None:
    """``actual`` (fused, dtype d) must be as close to ``exact`` (fp64 math) as eager PyTorch in
    dtype d is: error <= 2 x eager's error + the dtype's floor. (Liger-Kernel's rule for low
    precision: fusing may reorder sums but must not lose precision against eager.)"""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert actual.dtype == eager.dtype, f"{name}: dtype {actual.dtype} != {eager.dtype}"
    exact = exact.double()
    err = (actual.double() - exact).abs().max().item()
    eager_err = (eager.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    bound = 2 * eager_err + FLOOR[actual.dtype] * scale
    print(f"{name}: max err {err:.3g} (eager {eager_err:.3g}, bound {bound:.3g})")
    assert err <= bound, f"{name}: max error {err:.3g} exceeds {bound:.3g} (eager's error {eager_err:.3g})"
