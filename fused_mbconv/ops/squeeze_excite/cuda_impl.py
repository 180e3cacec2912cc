"""CUDA backend of the squeeze-excite ops: glue from the op contract (``reference``'s signatures,
dtypes and output layouts) to the kernels of ``fused_mbconv._C`` (device code in
kernels/squeeze_excite.cu, host code in csrc/squeeze_excite.cpp). Outputs are allocated here, with
the layout rules the fakes use; the excite kernels take the weights as contiguous fp32 matrices and
return fp32 parameter gradients, cast here to the parameters' dtypes and shapes.

The kernels read an (N, C) gate or upstream gradient in the activations' dtype or in fp32, any
strides; other dtypes are converted to fp32 first. Calls with fp64 (or empty) tensors take the
reference path: the kernels compute in fp32.
"""

from __future__ import annotations

import torch

from fused_mbconv._checks import empty_like_layout
from fused_mbconv.ops._registry import reference_fallback
from fused_mbconv.ops.squeeze_excite import IMPLS, reference


def _per_image(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An (N, C) input as the kernels read it: ``like``'s dtype or fp32, any strides."""
    return t if t.dtype in (like.dtype, torch.float32) else t.float()


def _f32_matrix(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight (out, in, 1, 1) or linear weight (out, in) as a contiguous fp32 matrix."""
    return w.reshape(w.shape[0], -1).float().contiguous()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


@IMPLS["squeeze"].register("cuda")
@reference_fallback(reference, empty=True)
def squeeze(x: torch.Tensor) -> torch.Tensor:
    pooled = torch.empty((x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    torch.ops.fused_mbconv_cuda.se_squeeze(x, pooled)
    return pooled


@IMPLS["scale"].register("cuda")
@reference_fallback(reference, empty=True)
def scale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    y = empty_like_layout(x, x.shape)
    torch.ops.fused_mbconv_cuda.se_scale(x, _per_image(gate, x), y)
    return y


@IMPLS["scale_backward"].register("cuda")
@reference_fallback(reference, empty=True)
def scale_backward(grad_y: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x = empty_like_layout(x, x.shape)
    # the kernel writes grad_gate in x's dtype or fp32; any other gate dtype gets an fp32 result cast
    out_dtype = gate.dtype if gate.dtype in (x.dtype, torch.float32) else torch.float32
    grad_gate = torch.empty((x.shape[0], x.shape[1]), dtype=out_dtype, device=x.device)
    torch.ops.fused_mbconv_cuda.se_scale_backward(grad_y.to(x.dtype), x, _per_image(gate, x), grad_x, grad_gate)
    return grad_x, grad_gate.to(gate.dtype)


@IMPLS["excite"].register("cuda")
@reference_fallback(reference, empty=True)
def excite(pooled, w1, b1, w2, b2) -> torch.Tensor:
    gate = torch.empty(pooled.shape, dtype=pooled.dtype, device=pooled.device)
    torch.ops.fused_mbconv_cuda.se_excite(pooled, _f32_matrix(w1), _f32(b1), _f32_matrix(w2), _f32(b2), gate)
    return gate


@IMPLS["excite_backward"].register("cuda")
@reference_fallback(reference, empty=True)
def excite_backward(grad_gate, pooled, w1, b1, w2, b2):
    w1m, w2m = _f32_matrix(w1), _f32_matrix(w2)
    grad_pooled = torch.empty(pooled.shape, dtype=pooled.dtype, device=pooled.device)
    grad_w1, grad_w2 = torch.empty_like(w1m), torch.empty_like(w2m)
    grad_b1 = torch.empty(b1.shape, dtype=torch.float32, device=pooled.device)
    grad_b2 = torch.empty(b2.shape, dtype=torch.float32, device=pooled.device)
    torch.ops.fused_mbconv_cuda.se_excite_backward(
        _per_image(grad_gate, pooled), pooled, w1m, _f32(b1), w2m, _f32(b2),
        grad_pooled, grad_w1, grad_b1, grad_w2, grad_b2,
    )  # fmt: skip
    return (
        grad_pooled,
        grad_w1.to(w1.dtype).reshape(w1.shape),
        grad_b1.to(b1.dtype),
        grad_w2.to(w2.dtype).reshape(w2.shape),
        grad_b2.to(b2.dtype),
    )
