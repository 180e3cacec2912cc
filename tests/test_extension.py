"""The compiled extension fused_mbconv._C: found toolkit, built, loaded, kernels registered.

CI has nvcc but no GPU, so it proves the build and the registrations; the kernels themselves
run in the GPU session (the parity suites with backend "cuda")."""

from __future__ import annotations

import importlib.util
import os
import shutil
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
