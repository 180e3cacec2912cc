"""The compiled extension fused_mbconv._C: found toolkit, built, loaded, kernels registered.

CI has nvcc but no GPU, so it proves the build and the registrations; the kernels themselves
run in the GPU session (the parity suites with backend "cuda")."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from fused_mbconv import _extension

ROOT = Path(__file__).resolve().parents[1]
TOOLKIT = shutil.which("nvcc") is not None and os.environ.get("FUSED_MBCONV_SKIP_CUDA_BUILD", "0") != "1"


def _setup_module():
    spec = importlib.util.spec_from_file_location("fused_mbconv_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on PATH")
def test_finds_real_toolkit_behind_a_wrapper(tmp_path, monkeypatch):
    """An nvcc wrapper script in a folder without lib64 (as on these machines) still leads to
    the real root: the folder with bin/nvcc and lib64/."""
    real_nvcc = shutil.which("nvcc")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{real_nvcc}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    root = _setup_module().find_cuda_home()
    assert root is not None and (root / "bin" / "nvcc").is_file() and (root / "lib64").is_dir()


@pytest.mark.skipif(not TOOLKIT, reason="built only where a CUDA toolkit is found")
def test_extension_is_built_and_loaded():
    assert _extension.loaded(), _extension.load_error()


# The kernel entry points csrc/extension.cpp defines, one CUDA implementation each.
CUDA_SCHEMAS = [
    "dwconv_bn_silu_infer",
    "dwconv_bn_silu_train",
    "dwconv_bn_silu_backward",
    "se_squeeze",
    "se_excite",
    "se_excite_backward",
    "se_scale",
    "se_scale_backward",
]


@pytest.mark.skipif(not TOOLKIT, reason="built only where a CUDA toolkit is found")
def test_every_cuda_kernel_is_registered_for_cuda():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fused_mbconv_cuda::")]
    assert sorted(names) == sorted(f"fused_mbconv_cuda::{s}" for s in CUDA_SCHEMAS)
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


@pytest.mark.skipif(not TOOLKIT, reason="built only where a CUDA toolkit is found")
def test_every_op_has_a_cuda_backend():
    """Each public op's implementation table has a "cuda" entry once the extension is loaded."""
    from fused_mbconv.ops.dwconv_bn_silu import IMPLS as DW_IMPLS
    from fused_mbconv.ops.squeeze_excite import IMPLS as SE_IMPLS

    for impls in [*DW_IMPLS.values(), *SE_IMPLS.values()]:
        assert "cuda" in impls.backends(), impls.op_name


def test_every_public_op_has_one_implementation_for_all_devices():
    """Each public op has one implementation for all devices that picks the backend at call time."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fused_mbconv::")]
    assert len(names) >= 8
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"), name


# ---------------------------------------------------------------------------------------------
# the depthwise kernels as compiled for sm_90 (static: what the SASS holds, not how fast it runs)

_HALO_KERNEL = re.compile(
    r"(dwconv_bn_silu_apply_kernel|dwconv_stats_kernel|dwconv_bn_silu_bwd_reduce_kernel|dwconv_bn_silu_bwd_input_kernel)"
    r"I(f|6__half|13__nv_bfloat16)Li(\d)ELi(\d)EE"
)
_SASS_OP = re.compile(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def _sm90_sass(library: Path, tool: Path) -> tuple[dict[str, Counter], dict[str, int]]:
    """Per halo kernel (mangled name): its SASS opcodes, and its local memory (spills) in bytes."""
    sass = subprocess.run([str(tool), "-sass", "-arch", "sm_90", str(library)], capture_output=True, text=True)
    usage = subprocess.run([str(tool), "-res-usage", "-arch", "sm_90", str(library)], capture_output=True, text=True)
    assert sass.returncode == 0 and usage.returncode == 0, sass.stderr + usage.stderr
    ops: dict[str, Counter] = {}
    current = None
    for line in sass.stdout.splitlines():
        if "Function : " in line:
            name = line.split("Function : ")[1].strip()
            current = ops.setdefault(name, Counter()) if _HALO_KERNEL.search(name) else None
        elif current is not None and (m := _SASS_OP.match(line)):
            current[m.group(1)] += 1
    local = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:(\d+)", usage.stdout):
        if _HALO_KERNEL.search(m.group(1)):
            local[m.group(1)] = int(m.group(2))
    return ops, local


@pytest.mark.skipif(not TOOLKIT, reason="built only where a CUDA toolkit is found")
def test_depthwise_kernels_convolve_from_shared_halo_tiles():
    """Every CUDA kernel that computes conv(x) (apply: inference and training pass 2; batch
    statistics; the backward's sums and its dx + dweight pass) reads each tap from the
    shared-memory patch in 16-byte loads, a patch row once per strip of 4 outputs
    (k * ((4 - 1) * stride + k) LDS.128, plus the k * k weights), never spills, and stages x
    through 16-byte channel vectors (LDG.E.128) where the layout allows; the apply kernel then
    stores 4 channels of y at once."""
    assert _extension.loaded(), _extension.load_error()
    spec = importlib.util.find_spec("fused_mbconv._C")
    triton_tools = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin"
    tool = next((p for p in [triton_tools / "cuobjdump", _setup_module().find_cuda_home() / "bin" / "cuobjdump"]
                 if p.is_file()), None)  # fmt: skip
    if tool is None:
        pytest.skip("no cuobjdump (triton's NVIDIA backend or the toolkit's)")
    ops, local = _sm90_sass(Path(spec.origin), tool)
    assert len(ops) == 3 * 4 * 4, sorted(ops)  # dtypes x (k, stride) x kernels
    assert local and not any(local.values()), local
    for name, counts in ops.items():
        kernel, dtype, k, stride = _HALO_KERNEL.search(name).groups()
        k, stride = int(k), int(stride)
        assert counts["LDS.128"] >= k * ((4 - 1) * stride + k) + k * k, (name, counts["LDS.128"])
        assert any(op.startswith("LDG.E.128") for op in counts), (name, counts)  # .CONSTANT: read-only path
        if kernel == "dwconv_bn_silu_apply_kernel":
            assert counts["STG.E.128" if dtype == "f" else "STG.E.64"] == 4, (name, counts)
