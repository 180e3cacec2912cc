"""DistributedDataParallel over the fused EfficientNet: two CPU processes on the gloo backend take
one training step; their gradients must be equal to each other and to the average of what each
rank's batch gives in a single process (BatchNorm statistics are per rank without SyncBatchNorm,
so each rank's running statistics must equal its own batch's single-process update)."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fused_mbconv

WORLD = 2
TIMEOUT_S = 180


def model_and_batch(rank: int):
    """The model every rank starts from (same seed) and rank ``rank``'s batch of 2 images."""
    torch.manual_seed(0)
    model = fused_mbconv.efficientnet_b0(num_classes=10, dropout=0.0, stochastic_depth_prob=0.0)
    g = torch.Generator().manual_seed(100 + rank)
    return model, torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 10, (2,), generator=g)


def step(model: nn.Module, forward: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training step through ``forward``; the gradients and buffers of ``model`` by name."""
    model.train()
    nn.functional.cross_entropy(forward(x), labels).backward()
    grads = {f"grad:{n}": p.grad.clone() for n, p in model.named_parameters()}
    return {**grads, **{f"buffer:{n}": b.clone() for n, b in model.named_buffers()}}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, x, labels = model_and_batch(rank)
        torch.save(step(model, DistributedDataParallel(model), x, labels), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_gloo_matches_single_process(tmp_path):
    context = mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.terminate()
            pytest.fail(f"the DDP workers did not finish within {TIMEOUT_S} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    singles = []
    for r in range(WORLD):
        model, x, labels = model_and_batch(r)
        singles.append(step(model, model, x, labels))

    grads = [n for n in ranks[0] if n.startswith("grad:")]
    assert len(grads) == sum(1 for _ in fused_mbconv.efficientnet_b0().parameters())
    for name in grads:
        torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0, msg=name)  # all-reduced
        average = (singles[0][name] + singles[1][name]) / WORLD
        scale = average.abs().max().item()
        # the same sums, added in another order by the all-reduce: fp32 rounding only
        torch.testing.assert_close(ranks[0][name], average, rtol=1e-5, atol=1e-5 * scale, msg=name)
    for r in range(WORLD):
        for name in (n for n in ranks[r] if n.startswith("buffer:")):
            torch.testing.assert_close(ranks[r][name], singles[r][name], rtol=1e-6, atol=1e-7, msg=name)
    # the two batches differ, so the checks above compared something: per-rank statistics differ,
    # and the all-reduced gradient is not either rank's own
    stat, grad = "buffer:features.1.0.block.0.1.running_mean", "grad:features.1.0.block.0.0.weight"
    assert not torch.equal(ranks[0][stat], ranks[1][stat])
    assert not torch.allclose(ranks[0][grad], singles[0][grad], rtol=1e-3)
