"""The activations a training forward keeps for its backward (fused_mbconv.memory): the counter
itself, and that the fused EfficientNet keeps clearly less than torchvision's eager model (the
fused expansion keeps its narrow input and its pre-BN output, the depthwise op its input only,
the projection its input and its narrow output)."""

from __future__ import annotations

import torch
import torchvision

import fused_mbconv
from fused_mbconv.memory import saved_activation_bytes


def test_counts_each_saved_storage_once_and_skips_parameters():
    w = torch.randn(64, requires_grad=True)
    x = torch.randn(256, requires_grad=True)

    def run():
        h = x * 2.0  # saves nothing: the factor is a number
        a = h * w.repeat(4)  # saves h (1 KiB) and the repeat (1 KiB)
        return (h * h[:128].repeat(2) + a).sum()  # h again (once more, also through a view), a new repeat

    assert saved_activation_bytes(run, [w, x]) == 3 * 1024

    def saves_x():
        return (x * w.repeat(4)).sum()  # saves x (a parameter here) and the repeat

    assert saved_activation_bytes(saves_x, [w, x]) == 1024
    assert saved_activation_bytes(saves_x) == 2 * 1024


def test_fused_model_keeps_less_than_eager():
    torch.manual_seed(0)
    eager = torchvision.models.efficientnet_b0().train()
    fused = fused_mbconv.efficientnet_b0().train()
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 64, 64)
    eager_bytes, fused_bytes = (saved_activation_bytes(lambda m=m: m(x), m.parameters()) for m in (eager, fused))
    print(f"saved for backward: eager {eager_bytes / 2**20:.1f} MiB, fused {fused_bytes / 2**20:.1f} MiB")
    # per MBConv block the fused ops keep three expanded-width tensors (the expansion's pre-BN
    # output, its output = the depthwise input, the depthwise output = the projection input);
    # eager keeps the unfused intermediates too (conv outputs for BN, the SE-scaled tensor for
    # the projection conv, ...): measured 0.54x
    assert fused_bytes < 0.6 * eager_bytes
