"""Reference implementation of the squeeze-excite ops in plain torch ops (fp32 math, cast back).

Shapes: x (N, C, H, W); pooled and gate (N, C); reduce weight w1 (R, C) or (R, C, 1, 1),
b1 (R,); expand weight w2 (C, R) or (C, R, 1, 1), b2 (C,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_mbconv._checks import empty_like_layout


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def squeeze(x: torch.Tensor) -> torch.Tensor:
    return x.to(_acc(x)).mean(dim=(2, 3)).to(x.dtype)


def _hidden(pooled, w1, b1):
    acc = _acc(pooled)
    h = pooled.to(acc) @ w1.reshape(w1.shape[0], -1).to(acc).t() + b1.to(acc)  # (N, R)
    return h


def excite(pooled, w1, b1, w2, b2) -> torch.Tensor:
    acc = _acc(pooled)
    h = _hidden(pooled, w1, b1)
    logits = F.silu(h) @ w2.reshape(w2.shape[0], -1).to(acc).t() + b2.to(acc)  # (N, C)
    return torch.sigmoid(logits).to(pooled.dtype)


def excite_backward(grad_gate, pooled, w1, b1, w2, b2):
    acc = _acc(pooled)
    w1m = w1.reshape(w1.shape[0], -1).to(acc)
    w2m = w2.reshape(w2.shape[0], -1).to(acc)
    h = _hidden(pooled, w1, b1)
    sh = torch.sigmoid(h)
    a = h * sh  # silu(h)
    gate = torch.sigmoid(a @ w2m.t() + b2.to(acc))
    dlogits = grad_gate.to(acc) * gate * (1 - gate)  # sigmoid' = g (1 - g)
    dw2 = dlogits.t() @ a
    db2 = dlogits.sum(0)
    da = dlogits @ w2m
    dh = da * sh * (1 + h * (1 - sh))  # silu'(h)
    dw1 = dh.t() @ pooled.to(acc)
    db1 = dh.sum(0)
    dpooled = dh @ w1m
    return (
        dpooled.to(pooled.dtype),
        dw1.to(w1.dtype).reshape(w1.shape),
        db1.to(b1.dtype),
        dw2.to(w2.dtype).reshape(w2.shape),
        db2.to(b2.dtype),
    )


def scale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    acc = _acc(x)
    out = empty_like_layout(x, x.shape)
    out.copy_(x.to(acc) * gate.to(acc)[:, :, None, None])
    return out


def scale_backward(grad_y: torch.Tensor, x: torch.Tensor, gate: torch.Tensor):
    acc = _acc(x)
    dy = grad_y.to(acc)
    dx = empty_like_layout(x, x.shape)
    dx.copy_(dy * gate.to(acc)[:, :, None, None])
    dgate = (dy * x.to(acc)).sum(dim=(2, 3)).to(gate.dtype)
    return dx, dgate
