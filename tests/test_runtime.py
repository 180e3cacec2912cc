"""Runtime integration: autocast (AMP), CUDA streams and CUDA graphs with the fused modules.

Autocast runs on the CPU too (bf16); streams and graphs need a GPU and skip cleanly without one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE
from eager import dw_triplet

import fused_mbconv

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_autocast_bf16_matches_eager_autocast(training):
    """Under autocast the fused block returns the autocast dtype, as eager conv2d would, and stays
    within bf16 rounding of eager's result."""
    fused, eager, _ = dw_triplet(16, 3, 2, False, torch.float32, DEVICE)
    fused.train(training), eager.train(training)
    x = torch.randn(2, 16, 15, 15, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y, ye = fused(x), eager(x)
    assert y.dtype == ye.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ye.float(), rtol=2e-2, atol=2e-2)  # a few bf16 ulps
    if training:
        gx = torch.autograd.grad(y.float().sum(), x)[0]
        gxe = torch.autograd.grad(ye.float().sum(), x)[0]
        assert gx.dtype == torch.float32
        torch.testing.assert_close(gx, gxe, rtol=5e-2, atol=5e-2)


@needs_cuda
def test_runs_on_the_current_stream():
    fused, _, _ = dw_triplet(32, 5, 1, False, torch.float32, DEVICE)
    fused.eval()
    x = torch.randn(4, 32, 40, 40, device=DEVICE).contiguous(memory_format=torch.channels_last)
    expected = fused(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # enough work queued that a wrong-stream launch would race
            y = fused(x)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, expected)


@needs_cuda
def test_cuda_graph_capture_and_replay():
    fused, _, _ = dw_triplet(24, 3, 2, True, torch.bfloat16, DEVICE)
    fused.eval()
    static_x = torch.randn(2, 24, 33, 31, device=DEVICE, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (autotuning, compilation) outside the capture
        fused(static_x, with_squeeze=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, static_s = fused(static_x, with_squeeze=True)
    for seed in range(2):
        new_x = torch.randn(static_x.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed))
        static_x.copy_(new_x)
        graph.replay()
        y, s = fused(static_x, with_squeeze=True)
        torch.testing.assert_close(static_y, y)
        torch.testing.assert_close(static_s, s)


def test_cuda_graphed_refuses_what_it_cannot_capture():
    """fused_mbconv.cuda_graphed: a clear error naming the argument before any capture."""
    with pytest.raises(ValueError, match="warmup: expected at least 1 call"):
        fused_mbconv.cuda_graphed(lambda x: x, torch.zeros(2), warmup=0)
    with pytest.raises(ValueError, match="example: expected a CUDA tensor .* got one on cpu"):
        fused_mbconv.cuda_graphed(lambda x: x, torch.zeros(2))
    with pytest.raises(TypeError, match="example: expected a torch.Tensor, got list"):
        fused_mbconv.cuda_graphed(lambda x: x, [1.0])


@needs_cuda
def test_cuda_graphed_replays_a_fused_model_on_new_inputs():
    """A fused B0 (bf16 under autocast, channels_last) replayed from cuda_graphed gives the eager
    call's logits for each new batch, whatever the batch's layout; the output is the captured
    tensor, refilled by every run; a batch of another shape is refused by name."""
    model = fused_mbconv.efficientnet_b0().to(DEVICE, memory_format=torch.channels_last).eval()

    def forward(x):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x)

    example = torch.randn(2, 3, 96, 96, device=DEVICE).contiguous(memory_format=torch.channels_last)
    run = fused_mbconv.cuda_graphed(forward, example)
    outputs = []
    for seed in range(2):
        x = torch.randn(2, 3, 96, 96, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed))
        out = run(x)  # NCHW: copied into the captured channels_last input
        torch.testing.assert_close(out, forward(x.contiguous(memory_format=torch.channels_last)))
        outputs.append(out)
    assert outputs[0] is outputs[1]
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 3, 96, 96\).*got \(1, 3, 96, 96\)"):
        run(example[:1])


@needs_cuda
@pytest.mark.skipif("triton" not in fused_mbconv.available_backends(), reason="needs the Triton backend")
@pytest.mark.parametrize("changed", ["conv weight", "bn weight", "bn running_var"])
@pytest.mark.parametrize("kind", ["depthwise", "projection"])
def test_cuda_graph_replay_follows_in_place_weight_updates(kind, changed):
    """The fused modules keep tensors derived from their parameters between calls (in eval() the
    BN fold; the Triton depthwise kernels' copy of the conv weight, its taps by channel): a
    captured graph must derive them anew on every replay, so that an in-place update between
    replays (an optimizer step, load_state_dict) is seen. A fold kept from the warm-up would be
    stale, then freed and reused under the replays."""
    if kind == "depthwise":
        fused = dw_triplet(24, 3, 1, False, torch.float32, DEVICE)[0]
    else:
        fused = fused_mbconv.nn.ProjectBN(24, 16).to(DEVICE)
    fused.eval()
    tensor = {"conv weight": fused[0].weight, "bn weight": fused[1].weight, "bn running_var": fused[1].running_var}[changed]
    static_x = torch.randn(2, 24, 16, 16, device=DEVICE)
    with fused_mbconv.backend("triton"), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: the fold and the copy are made and kept here
            fused(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = fused(static_x)
        for _ in range(2):
            tensor.mul_(1.5)
            graph.replay()
            torch.testing.assert_close(static_y, fused(static_x))


@needs_cuda
@pytest.mark.parametrize("backend_name", [b for b in ("triton", "cuda") if b in fused_mbconv.available_backends()])
def test_fp16_training_step_with_grad_scaler(backend_name):
    fused, _, _ = dw_triplet(16, 5, 2, False, torch.float32, DEVICE)
    reference = copy.deepcopy(fused)
    fused.train(), reference.train()
    x = torch.randn(4, 16, 32, 32, device=DEVICE)
    grads = []
    for module, name in ((fused, backend_name), (reference, "reference")):
        scaler = torch.amp.GradScaler("cuda")
        with fused_mbconv.backend(name), torch.autocast("cuda", dtype=torch.float16):
            loss = module(x).float().square().mean()
        scaler.scale(loss).backward()
        grads.append([p.grad / scaler.get_scale() for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)
