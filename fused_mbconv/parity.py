"""What "matches eager PyTorch" means for whole models (``python -m fused_mbconv`` and the tests).

A tensor computed by the fused model is compared with the same tensor computed in float64 (the
exact answer) and with eager PyTorch's in the same dtype: the fused error may be at most twice
eager's plus a floor. Fusing reorders sums, so it must not be held to eager's exact rounding, but
it must not lose precision either.

For one tensor the floor is a few units in the last place of the dtype. For a model's gradients
and BN statistics it is the typical relative error eager PyTorch itself makes over the whole set
(its median): through a deep network each tensor's rounding noise is a single random sample, and
eager is sometimes luckier than usual on one tensor; a real bug is off by orders of magnitude.
Some gradients are exactly zero in exact arithmetic (the bias of a BN whose output reaches a
training-mode BN only through a conv: the second BN removes any constant shift), so what every
implementation returns for them is rounding noise; where eager has no correct digit, the fused
noise may be up to NOISE_FACTOR times eager's.

A training step compares three networks only if they drop the same samples and activations:
``same_masks_in_every_dtype()`` makes stochastic depth and dropout draw alike in every dtype.
Its forward is judged by its logits, not by its loss. The loss is one scalar, so its error is
one sample of rounding noise: where that noise is well above the floor (fp32 on a GPU, whose
convs round to TF32; 16-bit), "at most twice eager's" would fail an implementation exactly as
precise as eager about 30% of the time (for two equal, independent Gaussian errors
P(|X/Y| > 2) = 1 - (2/pi) atan 2; a float64 emulation of fp32's TF32 convs put B4's fused loss
at 0.98 of that bound and failed B6's). The logits' largest error over N x classes values is stable, and it bounds
the loss: a mean cross-entropy's gradient has an L1 norm of at most 2 per sample, so the loss
moves by at most twice the logits' largest change.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping

import torch
from torch.overrides import TorchFunctionMode

# relative to the exact tensor's magnitude: reordered fp32 sums; ~2 units in the last place of 16-bit
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NOISE_FACTOR = 10.0


@dataclass
class Check:
    name: str
    error: float  # max |fused - exact|
    bound: float
    eager_error: float  # max |eager - exact|

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        errors = f"max error {self.error:.3g} (eager {self.eager_error:.3g}, bound {self.bound:.3g})"
        return f"{self.name}: {errors} {verdict}"


def _errors(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    if not fused.shape == eager.shape == exact.shape:
        shapes = f"fused {tuple(fused.shape)}, eager {tuple(eager.shape)}, exact {tuple(exact.shape)}"
        raise ValueError(f"fused, eager, exact: expected one shape, got {shapes}")
    exact = exact.double()
    error = (fused.double() - exact).abs().max().item()
    eager_error = (eager.double() - exact).abs().max().item()
    return error, eager_error, exact.abs().max().item()


def compare(name: str, fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> Check:
    """One tensor: error <= 2 x eager's error + FLOOR[dtype] x max |exact|."""
    error, eager_error, scale = _errors(fused, eager, exact)
    return Check(name, error, 2 * eager_error + FLOOR[dtype] * scale, eager_error)


def compare_all(
    fused: Mapping[str, torch.Tensor],
    eager: Mapping[str, torch.Tensor],
    exact: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
) -> list[Check]:
    """Every tensor of a set (a model's gradients, its BN buffers): error <= 2 x (eager's error on
    that tensor + eager's median relative error over the set x max |exact|) + the dtype's floor;
    for a tensor that is zero up to eager's rounding noise, error <= NOISE_FACTOR x eager's."""
    if not set(fused) == set(eager) == set(exact):
        raise ValueError(f"the tensor sets differ: {sorted(set(fused) ^ set(exact))[:5]}")
    errors = {n: _errors(fused[n], eager[n], exact[n]) for n in exact}
    relative = [e / s for _, e, s in errors.values() if s > 0]
    typical = statistics.median(relative) if relative else 0.0
    checks = []
    for n, (error, eager_error, scale) in errors.items():
        if scale <= eager_error:  # eager has no correct digit: the exact value is zero up to noise
            bound = NOISE_FACTOR * eager_error
        else:
            bound = 2 * (eager_error + typical * scale) + FLOOR[dtype] * scale
        checks.append(Check(n, error, bound, eager_error))
    return checks


def worst(checks: list[Check]) -> Check:
    """The check closest to (or furthest past) its bound. A tensor that is exactly zero in every
    model (the gradients of a block whose branch stochastic depth dropped for the whole batch)
    passes with bound 0 and ranks last."""

    def used(c: Check) -> float:
        if c.bound > 0:
            return c.error / c.bound
        return float("inf") if c.error > 0 else 0.0

    return max(checks, key=used)


class same_masks_in_every_dtype(TorchFunctionMode):
    """Inside it, ``Tensor.bernoulli_(p)`` (stochastic depth's per-sample draw, torchvision's,
    timm's and ours) and ``F.dropout`` draw their masks in float32 whatever the tensor's dtype, so
    that models in float64, float32 and 16-bit take the same masks from the same seed. On CUDA they
    would not: a float64 ``bernoulli_`` turns other random bits into its numbers than a float32 or
    16-bit one (curand_uniform2_double vs curand_uniform4), and dropout's vectorized kernel maps
    draws to elements by dtype, so the float64 reference trained another network: the H200's fp32
    B0 step had eager itself 1.2% off on a running variance."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.bernoulli_:
            t, p = args[0], args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            if isinstance(p, float) and t.dtype != torch.float32 and not kwargs.get("generator"):
                return t.copy_(torch.empty(t.shape, dtype=torch.float32, device=t.device).bernoulli_(p))
        elif func is torch.nn.functional.dropout:
            return _dropout(*args, **kwargs)
        return func(*args, **kwargs)


def _dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """F.dropout with its mask drawn in float32; the product in float32 (float64 for float64), as
    torch's kernel computes it."""
    if not training or p == 0.0 or p == 1.0:
        return torch.nn.functional.dropout(input, p, training, inplace)  # no draw
    math = torch.float64 if input.dtype == torch.float64 else torch.float32
    keep = torch.empty(input.shape, dtype=torch.float32, device=input.device).bernoulli_(1.0 - p)
    out = (input.to(math) * (keep.to(math) / (1.0 - p))).to(input.dtype)
    return input.copy_(out) if inplace else out
