"""The BatchNorm2d bookkeeping every fused module repeats around its op: which statistics a call
uses and how it advances the running ones, exactly as nn.BatchNorm2d.forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


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
