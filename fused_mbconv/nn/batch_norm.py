"""The BatchNorm2d bookkeeping every fused module repeats around its op: which statistics a call
uses and how it advances the running ones (exactly as nn.BatchNorm2d.forward), and the eval-mode
fold of BN into (scale, shift), cached per module until a BN tensor changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fused_mbconv._derived import sources_key
from fused_mbconv.nn import functional as F


@dataclass
class BatchNormCall:
    """What one forward of ``bn`` does: normalise with the batch's statistics (``batch_stats``)
    or the running ones, and update ``running_mean``/``running_var`` (None: leave them) with
    factor ``momentum``."""

    batch_stats: bool
    momentum: float
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]

    @classmethod
    def of(cls, bn: nn.BatchNorm2d) -> "BatchNormCall":
        """The call about to happen; advances ``bn.num_batches_tracked`` as nn.BatchNorm2d does."""
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        keep_running = not bn.training or bn.track_running_stats
        return cls(
            batch_stats,
            momentum,
            bn.running_mean if keep_running else None,
            bn.running_var if keep_running else None,
        )


def cached_fold(owner: nn.Module, bn: nn.BatchNorm2d) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The BN fold (scale, shift) for inference, computed once and kept on ``owner`` until a BN
    tensor changes (``_derived.sources_key``: in-place updates by optimizer steps,
    load_state_dict or running statistics, replaced tensors, and never kept from before a CUDA
    graph capture). None, meaning "fold on this call", also while autograd records the BN
    parameters (the fold must be in the graph) and under torch.compile (the compiler fuses the
    fold into its own graph)."""
    tensors = [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    sources = sources_key(*tensors)
    if sources is None:
        return None
    # results made inside inference_mode cannot be saved for a backward outside it: key on it
    key = (bn.eps, torch.is_inference_mode_enabled(), sources)
    cache = owner.__dict__.get("_fold_cache")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            scale, shift = F.fold_batch_norm(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        cache = (key, [t.detach() for t in tensors], scale, shift)
        owner.__dict__["_fold_cache"] = cache
    return cache[2], cache[3]
