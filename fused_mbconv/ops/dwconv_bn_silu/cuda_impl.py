"""CUDA backend of the depthwise conv + BN + SiLU ops: glue from the op contract to the kernels
of ``fused_mbconv._C`` (device code in kernels/dwconv_bn_silu_*.cu, host code in
csrc/dwconv_bn_silu.cpp). Outputs are allocated here, with the layout rule the fakes use.

Implemented: inference forward. Training forward and backward are issue #6's remaining work.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fused_mbconv._checks import empty_like_layout
from fused_mbconv.ops.dwconv_bn_silu import IMPLS, output_size, reference


@IMPLS["forward_infer"].register("cuda")
def forward_infer(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    stride: int,
    padding: Sequence[int],
    with_squeeze: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype == torch.float64:  # the kernels compute in fp32; fp64 keeps the exact path
        return reference.forward_infer(x, weight, scale, shift, stride, padding, with_squeeze)
    n, c, h, w = x.shape
    k = weight.shape[-1]
    top, bottom, left, right = padding
    y = empty_like_layout(x, (n, c, output_size(h, k, stride, top, bottom), output_size(w, k, stride, left, right)))
    squeeze_sum = x.new_zeros((n, c), dtype=torch.float32) if with_squeeze else None
    torch.ops.fused_mbconv_cuda.dwconv_bn_silu_infer(
        x, weight.float().contiguous(), scale.float().contiguous(), shift.float().contiguous(),
        stride, list(padding), y, squeeze_sum,
    )  # fmt: skip
    if squeeze_sum is None:
        return y, x.new_empty(0)
    return y, (squeeze_sum / (y.shape[2] * y.shape[3])).to(x.dtype)
