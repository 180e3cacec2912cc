"""Independent eager-PyTorch references the fused ops are tested against (nn.Conv2d(groups=C) +
nn.BatchNorm2d + nn.SiLU; squeeze-excite from torch ops), and helpers to build matched pairs."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import fused_mbconv


class EagerDWConvBNAct(nn.Sequential):
    """The unfused block; ``tf`` pads like TensorFlow "SAME" (F.pad, then an unpadded conv)."""

    def __init__(self, channels: int, k: int, stride: int, tf: bool = False, **bn_kwargs):
        conv = nn.Conv2d(channels, channels, k, stride, 0 if tf else k // 2, groups=channels, bias=False)
        super().__init__(conv, nn.BatchNorm2d(channels, **bn_kwargs), nn.SiLU())
        self.tf = tf

    def forward(self, x):
        if self.tf:
            k, s = self[0].kernel_size[0], self[0].stride[0]
            pads = []
            for size in (x.shape[3], x.shape[2]):  # F.pad order: (left, right, top, bottom)
                total = max((-(-size // s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random weights and plausible BN statistics, so no test passes on trivial values."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=generator) * 1.5 + 0.25)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=generator) * 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=generator) * (0.4 if t.dim() > 1 else 0.8))
    return module


def dw_triplet(channels, k, stride, tf, dtype, device, seed=0, **bn_kwargs):
    """(fused in dtype, eager in dtype, eager in fp64), all with the same random weights."""
    g = torch.Generator().manual_seed(seed)
    eager64 = randomize_(EagerDWConvBNAct(channels, k, stride, tf, **bn_kwargs), g).double()
    eager = copy.deepcopy(eager64).to(dtype)
    fused = fused_mbconv.nn.DWConvBNAct(channels, k, stride, "tf" if tf else "same", **bn_kwargs)
    fused.load_state_dict(eager.state_dict())
    return fused.to(device, dtype), eager.to(device), eager64.to(device)


def squeeze_excite_eager(x, w1, b1, w2, b2):
    """torchvision's SqueezeExcitation, written out: pool, conv, SiLU, conv, sigmoid, scale."""
    s = x.mean((2, 3), keepdim=True)
    s = F.conv2d(F.silu(F.conv2d(s, w1.view(w1.shape[0], -1, 1, 1), b1)), w2.view(w2.shape[0], -1, 1, 1), b2)
    return x * torch.sigmoid(s)
