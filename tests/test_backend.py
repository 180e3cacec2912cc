"""Backend selection: set_backend, the backend() context, FUSED_MBCONV_BACKEND, and the errors
for a backend that cannot run here."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import fused_mbconv
from fused_mbconv.ops.dwconv_bn_silu import IMPLS


def test_available_backends_always_has_auto_and_reference():
    names = fused_mbconv.available_backends()
    assert names[:1] == ["auto"] and "reference" in names


def test_context_manager_restores_previous_choice():
    assert fused_mbconv.get_backend() == "auto"
    with fused_mbconv.backend("reference"):
        assert fused_mbconv.get_backend() == "reference"
    assert fused_mbconv.get_backend() == "auto"


def test_choice_is_seen_by_other_threads():
    """Process-wide: autograd's CUDA worker thread runs the backward under the forward's backend."""
    seen = []
    with fused_mbconv.backend("reference"):
        t = threading.Thread(target=lambda: seen.append(fused_mbconv.get_backend()))
        t.start(), t.join()
    try:
        fused_mbconv.set_backend("reference")
        t = threading.Thread(target=lambda: seen.append(fused_mbconv.get_backend()))
        t.start(), t.join()
    finally:
        fused_mbconv.set_backend("auto")
    assert seen == ["reference", "reference"]


def test_backward_runs_under_the_forward_backend(monkeypatch):
    """The backward op picks its implementation under the backend of the enclosing block."""
    from fused_mbconv.ops.dwconv_bn_silu import IMPLS as DW

    calls = []
    reference_backward = DW["backward"]._by_backend["reference"]
    monkeypatch.setitem(DW["backward"]._by_backend, "reference", lambda *a: calls.append(1) or reference_backward(*a))
    block = fused_mbconv.nn.DWConvBNAct(4).train()
    with fused_mbconv.backend("reference"):
        block(torch.randn(2, 4, 6, 6, requires_grad=True)).sum().backward()
    assert calls == [1]


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend: expected one of .* got 'cudnn'"):
        fused_mbconv.set_backend("cudnn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_unavailable_backend_says_what_is_missing():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*"):
        with fused_mbconv.backend("cuda"):
            pass
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="no CUDA device is visible and TRITON_INTERPRET=1 is not set"):
            fused_mbconv.set_backend("triton")


def test_auto_runs_reference_on_cpu():
    x = torch.randn(1, 2, 5, 5)
    assert IMPLS["forward_infer"].pick(x.device) is IMPLS["forward_infer"]._by_backend["reference"]


def _backend_in_subprocess(env_value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FUSED_MBCONV_BACKEND": env_value}
    code = "import fused_mbconv; print(fused_mbconv.get_backend())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable():
    done = _backend_in_subprocess("reference")
    assert done.returncode == 0 and done.stdout.strip() == "reference", done.stderr
    bad = _backend_in_subprocess("fastest")
    assert bad.returncode != 0 and "FUSED_MBCONV_BACKEND: expected one of" in bad.stderr


def test_auto_on_cuda_runs_inference_and_training_on_the_fused_kernels(monkeypatch):
    """"auto" takes the fused kernels on CUDA for training too: the reference computes in fp32
    with a torch op per term (B5's bf16 training step: 6.6x eager's memory traffic, bench/
    traffic_model.py); on the CPU it stays on the reference."""
    from fused_mbconv import backends as backend_module

    if "triton" not in IMPLS["forward_infer"].backends():
        pytest.skip("triton is not installed")
    monkeypatch.setattr(backend_module, "available_backends", lambda: ["auto", "triton", "reference"])
    for op in ("forward_infer", "forward_train", "backward"):
        assert IMPLS[op].pick(torch.device("cuda")) is IMPLS[op]._by_backend["triton"], op
        assert IMPLS[op].pick(torch.device("cpu")) is IMPLS[op]._by_backend["reference"], op


def test_auto_follows_the_measured_table_on_cuda(monkeypatch):
    """A measured choice for the call's shape class wins over the fixed order, training ops
    included; a class the table lacks falls back to the order; an unavailable choice is skipped."""
    from fused_mbconv import backends as backend_module
    from fused_mbconv.ops import auto_table

    if "triton" not in IMPLS["forward_infer"].backends():
        pytest.skip("triton is not installed")
    monkeypatch.setattr(backend_module, "available_backends", lambda: ["auto", "triton", "reference"])
    like = torch.empty(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert auto_table.shape_class(like) == "float32/channels_last/small"
    table = {"dwconv_bn_silu_train": {"float32/channels_last/small": "reference"},
             "dwconv_bn_silu": {"float32/channels_last/small": "cuda"}}  # fmt: skip
    monkeypatch.setattr(auto_table, "load", lambda: table)
    cuda = torch.device("cuda")
    assert IMPLS["forward_train"].pick(cuda, like) is IMPLS["forward_train"]._by_backend["reference"]
    assert IMPLS["forward_train"].pick(cuda, like.contiguous()) is IMPLS["forward_train"]._by_backend["triton"]
    # "cuda" is not available here: the fixed order's first available takes over
    assert IMPLS["forward_infer"].pick(cuda, like) is IMPLS["forward_infer"]._by_backend["triton"]
    assert IMPLS["forward_train"].pick(torch.device("cpu"), like) is IMPLS["forward_train"]._by_backend["reference"]


def test_the_committed_auto_table_names_real_ops_classes_and_fused_backends():
    """fused_mbconv/ops/auto_table.json (measured on a GPU by bench/bench_auto_table.py): every
    op is one the registry knows, every class reads "<dtype>/<layout>/<size>", every choice is a
    fused backend the op implements (where that backend is present here) and the sample timings
    it was decided on hold that backend's best time."""
    import importlib
    import json
    import math

    from fused_mbconv.ops import auto_table

    if not auto_table.TABLE_PATH.exists():
        pytest.skip("no measured table committed")
    table = json.loads(auto_table.TABLE_PATH.read_text())
    packages = [importlib.import_module(f"fused_mbconv.ops.{name}")  # the op objects shadow these names
                for name in ("dwconv_bn_silu", "project_bn", "running_stats", "squeeze_excite")]  # fmt: skip
    ops = {impls.op_name: impls for package in packages for impls in package.IMPLS.values()}
    dtypes, layouts = {"float32", "float16", "bfloat16"}, {"channels_last", "nchw", "matrix"}
    assert table["choices"] == auto_table.load()
    for op, classes in table["choices"].items():
        assert op in ops, op
        for cls, backend in classes.items():
            dtype, layout, size = cls.split("/")
            assert dtype in dtypes and layout in layouts and size in {"small", "medium", "large"}, cls
            assert backend in ("triton", "cuda"), (op, cls, backend)
            if backend in fused_mbconv.available_backends():
                assert backend in ops[op].backends(), (op, backend)
            runs = [s["ms"] for s in table["samples"] if s["op"] == op and s["class"] == cls]
            assert runs and all(backend in r for r in runs), (op, cls)
            log_time = {b: sum(math.log(r[b]) for r in runs) for b in set.intersection(*(set(r) for r in runs))}
            assert log_time[backend] == min(log_time.values()), (op, cls, log_time)


def test_shape_classes():
    from fused_mbconv.ops import auto_table

    assert auto_table.shape_class(torch.empty(2, 3, dtype=torch.bfloat16)) == "bfloat16/matrix/small"
    assert auto_table.shape_class(torch.empty(1, 1 << 20)) == "float32/matrix/medium"
    assert auto_table.shape_class(torch.empty(16, 64, 128, 128, device="meta")) == "float32/nchw/large"


@pytest.mark.parametrize("triton_available", [True, False], ids=["with_triton", "without_triton"])
def test_cuda_backend_runs_the_gemms_it_lacks_on_triton_then_reference(monkeypatch, triton_available):
    """The extension has no GEMM: under "cuda" the projection ops run on Triton (else the
    reference), while the ops it has stay on its own kernels; a backend without an op and without
    a fallback is an error that names both."""
    from fused_mbconv import backends as backend_module
    from fused_mbconv.ops import _registry
    from fused_mbconv.ops.project_bn import IMPLS as PROJECT_IMPLS

    names = ["auto", "cuda", "reference"] + (["triton"] if triton_available else [])
    monkeypatch.setattr(backend_module, "available_backends", lambda: names)
    monkeypatch.setattr(backend_module, "check_usable", lambda name, device: None)
    cuda = torch.device("cuda")
    project = PROJECT_IMPLS["forward_train"]
    assert "cuda" not in project.backends()
    expected = "triton" if triton_available and "triton" in project.backends() else "reference"
    monkeypatch.setattr(backend_module, "get_backend", lambda: "cuda")
    assert project.pick(cuda) is project._by_backend[expected]
    if "cuda" in IMPLS["forward_train"].backends():
        assert IMPLS["forward_train"].pick(cuda) is IMPLS["forward_train"]._by_backend["cuda"]
    lonely = _registry.Implementations("lonely")
    lonely.register("reference")(lambda: None)
    monkeypatch.setattr(backend_module, "get_backend", lambda: "triton")
    with pytest.raises(NotImplementedError, match="lonely has no 'triton' implementation"):
        lonely.pick(cuda)
