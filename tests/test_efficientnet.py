"""The fused EfficientNet against torchvision's (the independent eager reference): the same module
and state_dict layout for B0-B7, the same eval logits and training step (its logits, every
gradient, running statistics) with the same weights, timm checkpoints, feature maps, and bad input."""

from __future__ import annotations

import contextlib
import copy
import os
import time

import pytest
import timm
import torch
import torchvision
from conftest import BACKENDS, DEVICE, INTERPRETED
from torch import nn

import fused_mbconv
from fused_mbconv import parity
from fused_mbconv.__main__ import randomize_batch_norm_
from fused_mbconv.models import VARIANTS, load_timm_state_dict
from fused_mbconv.ops.dwconv_bn_silu import IMPLS as DW_IMPLS
from fused_mbconv.ops.squeeze_excite import IMPLS as SE_IMPLS

RUN_SLOW = os.environ.get("FUSED_MBCONV_RUN_SLOW", "0") == "1"


def model_backends_names() -> list[str]:
    """Backends that implement every op of the model."""
    return [name for name in BACKENDS
            if all(name in impls.backends() for impls in (*DW_IMPLS.values(), *SE_IMPLS.values()))]  # fmt: skip


def model_backends():
    """Backends that implement every op; the Triton interpreter needs minutes per forward pass of
    a whole network, so there it runs only with FUSED_MBCONV_RUN_SLOW=1 (the GPU run covers it)."""
    out = []
    for name in model_backends_names():
        slow = name == "triton" and INTERPRETED and not RUN_SLOW
        marks = pytest.mark.skip(reason="a whole model under TRITON_INTERPRET: FUSED_MBCONV_RUN_SLOW=1") if slow else ()
        out.append(pytest.param(name, id=name, marks=marks))
    return out


@contextlib.contextmanager
def backend_everywhere(name: str):
    """``name`` for every thread: autograd runs the backward of CUDA tensors on its own thread,
    which the thread-local ``fused_mbconv.backend(name)`` does not reach."""
    previous = fused_mbconv.get_backend()
    fused_mbconv.set_backend(name)
    try:
        yield
    finally:
        fused_mbconv.set_backend(previous)


def matched_pair(variant: str, seed: int = 0, **kwargs):
    """(torchvision efficientnet_<variant>, fused) with the same random weights and BN statistics."""
    torch.manual_seed(seed)
    tv = getattr(torchvision.models, f"efficientnet_{variant}")(**kwargs)
    randomize_batch_norm_(tv, torch.Generator().manual_seed(seed))
    fused = getattr(fused_mbconv, f"efficientnet_{variant}")(weights=tv.state_dict(), **kwargs)
    return tv.to(DEVICE), fused.to(DEVICE)


def images(n, size, seed=1, **kwargs):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), **kwargs).to(DEVICE)


def check(c: parity.Check) -> None:
    print(c)
    assert c.ok, str(c)


# ---------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layout_and_state_dict_round_trip_with_torchvision(variant):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, f"efficientnet_{variant}")()
    fused = getattr(fused_mbconv, f"efficientnet_{variant}")()
    tv_sd, fused_sd = tv.state_dict(), fused.state_dict()
    assert list(fused_sd) == list(tv_sd)
    assert [t.shape for t in fused_sd.values()] == [t.shape for t in tv_sd.values()]
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in tv.parameters())
    assert fused.variant.dropout == tv.classifier[0].p == fused.classifier[0].p
    # BatchNorm settings as torchvision chose them per variant (eps 1e-3 and momentum 0.01 for B5-B7)
    tv_bn = [(m.eps, m.momentum) for m in tv.modules() if isinstance(m, nn.BatchNorm2d)]
    fused_bn = [(m.eps, m.momentum) for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert fused_bn == tv_bn
    # strict both ways, values carried over exactly
    fused.load_state_dict(tv_sd, strict=True)
    assert all(torch.equal(fused_sd[k], tv_sd[k]) for k in tv_sd)
    randomize_batch_norm_(fused, torch.Generator().manual_seed(1))
    tv.load_state_dict(fused.state_dict(), strict=True)
    assert all(torch.equal(tv.state_dict()[k], v) for k, v in fused.state_dict().items())


def test_stochastic_depth_schedule_and_options_match_torchvision():
    tv = torchvision.models.efficientnet_b2(stochastic_depth_prob=0.3, dropout=0.1, num_classes=10)
    fused = fused_mbconv.efficientnet_b2(stochastic_depth_prob=0.3, dropout=0.1, num_classes=10)
    tv_p = [m.p for m in tv.modules() if type(m).__name__ == "StochasticDepth"]
    fused_p = [m.p for m in fused.modules() if type(m).__name__ == "StochasticDepth"]
    assert fused_p == pytest.approx(tv_p, abs=0) and max(fused_p) > 0.25
    assert fused.classifier[1].out_features == 10 and fused.classifier[0].p == 0.1
    bn = fused.features[0][1]
    custom = fused_mbconv.efficientnet_b0(norm_eps=1e-3, norm_momentum=0.02, padding="tf").features[0]
    assert (bn.eps, bn.momentum) == (1e-5, 0.1) and (custom[1].eps, custom[1].momentum) == (1e-3, 0.02)
    assert type(custom[0]).__name__ == "Conv2dSame"


# ---------------------------------------------------------------------------------------------
# numerics: fused vs torchvision eager, both against torchvision in float64


# 72 px gives odd feature sizes (9, 5, 3), which exercise the padding; channels_last: the input and
# both models in that layout (the fused ops keep it)
PARITY_CASES = [("b0", 64, "nchw"), ("b1", 72, "nchw"), ("b0", 64, "channels_last")]


def in_layout(layout, *tensors_or_modules):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [t.to(memory_format=fmt) for t in tensors_or_modules]


@pytest.mark.parametrize("backend", model_backends())
@pytest.mark.parametrize("variant,size,layout", PARITY_CASES)
def test_eval_logits_match_torchvision(variant, size, layout, backend):
    tv, fused = matched_pair(variant)
    exact = copy.deepcopy(tv).double().eval()
    x, tv, fused = in_layout(layout, images(2, size), tv, fused)
    x64 = x.double().contiguous()  # fp64 is slow in channels_last
    with torch.no_grad(), backend_everywhere(backend):
        check(parity.compare("logits", fused.eval()(x), tv.eval()(x), exact(x64), torch.float32))
        features = fused.forward_features(x)
        check(parity.compare("forward_features", features, tv.features(x), exact.features(x64), torch.float32))
    assert features.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def train_step(model, x, labels, seed=3, run=None):
    """One training step of ``model`` (called through ``run``, e.g. its compiled form) with dropout
    and stochastic depth active (the same masks from the same seed); returns the logits (which
    bound the loss: fused_mbconv/parity.py), gradients and buffers (cloned) by name."""
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    # compiled runs have no dropout nor stochastic depth, and stay free of the function mode
    with parity.same_masks_in_every_dtype() if run is None else contextlib.nullcontext():
        logits = (model if run is None else run)(x.to(next(model.parameters()).dtype))
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return logits.detach().clone(), grads, buffers  # a CUDA graph's output buffer is reused by its next replay


@pytest.mark.parametrize("backend", model_backends())
@pytest.mark.parametrize("variant,size,layout", PARITY_CASES)
def test_training_step_matches_torchvision(variant, size, layout, backend):
    # stochastic depth 0.5 so that several blocks drop their branch for some sample in this batch
    tv, fused = matched_pair(variant, stochastic_depth_prob=0.5)
    exact = copy.deepcopy(tv).double()
    x, tv, fused = in_layout(layout, images(4, size), tv, fused)
    labels = torch.tensor([1, 5, 7, 999], device=DEVICE)
    with backend_everywhere(backend):
        f = train_step(fused, x, labels)
    e, d = train_step(tv, x, labels), train_step(exact, x.contiguous(), labels)  # fp64 is slow in channels_last
    check(parity.compare("training logits", f[0], e[0], d[0], torch.float32))
    assert set(f[1]) == set(d[1]) and all(g is not None for g in f[1].values())
    grads = parity.compare_all(f[1], e[1], d[1], torch.float32)
    stats = {n: t for n, t in d[2].items() if t.is_floating_point()}
    running = parity.compare_all({n: f[2][n] for n in stats}, {n: e[2][n] for n in stats}, stats, torch.float32)
    for c in (parity.worst(grads), parity.worst(running)):
        print("worst:", c)
    assert all(c.ok for c in grads), [str(c) for c in grads if not c.ok]
    assert all(c.ok for c in running), [str(c) for c in running if not c.ok]
    counts = {n: t for n, t in f[2].items() if not t.is_floating_point()}
    assert counts == {n: t for n, t in d[2].items() if not t.is_floating_point()}
    assert all(t == 1 for t in counts.values())


def test_eval_after_an_optimizer_step_uses_the_new_weights():
    """eval() caches the BN fold between calls: after an optimizer step and new running
    statistics it must use the new values (checked against torchvision given the same state)."""
    tv, fused = matched_pair("b0")
    x, labels = images(2, 64), torch.tensor([3, 4], device=DEVICE)
    with torch.no_grad():
        before = fused.eval()(x)  # fills the caches
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.1)
    train_step(fused, x, labels)
    optimizer.step()
    tv.load_state_dict(fused.state_dict())
    exact = copy.deepcopy(tv).double().eval()
    with torch.no_grad():
        after = fused.eval()(x)
        check(parity.compare("logits after a step", after, tv.eval()(x), exact(x.double()), torch.float32))
    assert (after - before).abs().max() > 1e-2 * before.abs().max()  # the step did change the model


# ---------------------------------------------------------------------------------------------
# weights


def test_weights_from_file_and_state_dict(tmp_path):
    tv, fused = matched_pair("b0")
    path = tmp_path / "b0.pth"
    torch.save(tv.state_dict(), path)
    loaded = fused_mbconv.efficientnet_b0(weights=str(path))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(loaded.state_dict().values(), tv.state_dict().values()))
    with pytest.raises(TypeError, match=r"weights: expected None, a file path or a state_dict, got int"):
        fused_mbconv.efficientnet_b0(weights=3)
    with pytest.raises(RuntimeError, match=r"size mismatch for classifier.1.weight"):
        fused_mbconv.efficientnet_b0(weights=tv.state_dict(), num_classes=10)


@pytest.mark.parametrize(
    "name,padding,eps,size",
    [
        ("efficientnet_b0", "same", 1e-5, 64),
        ("tf_efficientnet_b0", "tf", 1e-3, 67),  # odd sizes: TF "same" pads asymmetrically
        ("tf_efficientnet_b2", "tf", 1e-3, 61),
    ],
)
def test_timm_checkpoints_load_and_match(name, padding, eps, size):
    torch.manual_seed(0)
    reference = randomize_batch_norm_(timm.create_model(name, pretrained=False), torch.Generator().manual_seed(0))
    variant, options = name.rsplit("_", 1)[1], {"padding": padding, "norm_eps": eps}
    fused = fused_mbconv.models.create_efficientnet(variant, **options)
    load_timm_state_dict(fused, reference.state_dict())
    fused, reference = fused.to(DEVICE), reference.to(DEVICE)
    x = images(2, size)
    exact = copy.deepcopy(reference).double().eval()
    with torch.no_grad():
        check(parity.compare(f"{name} logits", fused.eval()(x), reference.eval()(x), exact(x.double()), torch.float32))
    # the same checkpoint through the builders' ``weights`` (the layout is recognised)
    again = fused_mbconv.models.create_efficientnet(variant, weights=reference.state_dict(), **options)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(again.state_dict().values(), fused.state_dict().values()))


def test_timm_keys_that_do_not_fit_are_named():
    sd = timm.create_model("efficientnet_b0", pretrained=False).state_dict()
    sd["blocks.0.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"keys outside timm's EfficientNet layout: \['blocks.0.0.extra.weight'\]"):
        load_timm_state_dict(fused_mbconv.efficientnet_b0(), sd)


# ---------------------------------------------------------------------------------------------
# feature extraction


def test_feature_maps_are_the_last_block_of_each_stride():
    tv, fused = matched_pair("b0")
    x = images(1, 96)
    info = {i["stride"]: i for i in fused.feature_info}
    assert [(s, info[s]["channels"]) for s in (4, 8, 16, 32)] == [(4, 24), (8, 40), (16, 112), (32, 320)]
    with torch.no_grad():
        maps = fused.eval().feature_maps(x)
        expected, y = {}, x
        for index, layer in enumerate(tv.eval().features):
            y = layer(y)
            expected[index] = y
    for stride, m in zip((4, 8, 16, 32), maps):
        assert m.shape == (1, info[stride]["channels"], 96 // stride, 96 // stride)
        torch.testing.assert_close(m, expected[info[stride]["index"]], rtol=1e-4, atol=1e-5)
    assert [m.shape[1] for m in fused.feature_maps(x, strides=(32, 2))] == [320, 16]
    with pytest.raises(ValueError, match=r"strides: expected a non-empty selection from \(2, 4, 8, 16, 32\), got \(3,"):
        fused.feature_maps(x, strides=(3,))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "x,error,pattern",
    [
        (torch.randn(1, 1, 64, 64), ValueError, r"x: expected 3 channels \(RGB\) .* got shape \(1, 1, 64, 64\)"),
        (torch.randn(1, 3, 16, 64), ValueError, r"x: image too small: 16x64 pixels; .* at least 32x32"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, r"x: expected a floating-point .* got torch.uint8"),
        (torch.randn(1, 3, 64, 64).double(), TypeError, r"x: expected dtype torch.float32 .* got torch.float64"),
        (torch.randn(3, 64, 64), ValueError, r"x: expected a 4-D batch of images"),
        ([[1.0]], TypeError, r"x: expected a torch.Tensor of images"),
    ],
    ids=["channels", "too-small", "uint8", "float64", "3-d", "list"],
)
def test_bad_input_is_named(x, error, pattern):
    model = fused_mbconv.efficientnet_b0().eval()
    for call in (model, model.forward_features, model.feature_maps):
        with pytest.raises(error, match=pattern):
            call(x)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(variant="b9"), r"variant: expected one of \('b0', .*'b7'\), got 'b9'"),
        (dict(num_classes=0), r"num_classes: expected a positive int, got 0"),
        (dict(dropout=1.5), r"dropout: expected a probability in \[0, 1\], got 1.5"),
        (dict(stochastic_depth_prob=-0.1), r"stochastic_depth_prob: expected a probability in \[0, 1\], got -0.1"),
        (dict(padding="valid"), r"padding: expected one of \('same', 'tf'\), got 'valid'"),
    ],
)
def test_bad_arguments_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        fused_mbconv.models.EfficientNet(**kwargs)


def test_autocast_accepts_float32_input():
    model = fused_mbconv.efficientnet_b0().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


# ---------------------------------------------------------------------------------------------
# torch.compile


# Inductor generates and builds C++ for the CPU: compiling B0's eval and training graphs takes
# 2 to 10 minutes on two cores, so the CPU suite captures the same graphs with "aot_eager" (full
# graph, fakes and autograd of the fused ops, AOT backward) unless FUSED_MBCONV_RUN_SLOW=1.
COMPILE_BACKENDS = [
    pytest.param("inductor", marks=pytest.mark.skipif(
        DEVICE.type == "cpu" and not RUN_SLOW, reason="inductor on the CPU takes minutes: FUSED_MBCONV_RUN_SLOW=1")),
    "aot_eager",
]  # fmt: skip


@pytest.mark.parametrize("compiler", COMPILE_BACKENDS)
def test_compile_fullgraph_whole_model_eval_and_train(compiler):
    """The whole model as one graph with the fused ops inside, against eager torchvision in fp32
    and fp64. Training runs at 64 px: at 32 px the last stages are 1x1, so each BN normalises
    2 values per channel and fp32 itself is off from fp64 by O(1)."""
    torch._dynamo.reset()
    tv, fused = matched_pair("b0", dropout=0.0, stochastic_depth_prob=0.0)
    exact = copy.deepcopy(tv).double()
    model = copy.deepcopy(fused).eval()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    start = time.perf_counter()
    x = images(2, 32)
    with torch.no_grad():
        logits = compiled(x), tv.eval()(x), exact.eval()(x.double())
        check(parity.compare("compiled eval logits", *logits, torch.float32))
    eval_s = time.perf_counter() - start
    x, labels = images(2, 64), torch.tensor([1, 2], device=DEVICE)
    compiled.train()
    c, e, d = train_step(model, x, labels, run=compiled), train_step(tv, x, labels), train_step(exact, x, labels)
    print(f"compile and run: eval {eval_s:.1f} s, train {time.perf_counter() - start - eval_s:.1f} s")
    check(parity.compare("compiled training logits", c[0], e[0], d[0], torch.float32))
    grads = parity.compare_all(c[1], e[1], d[1], torch.float32)
    print("worst:", parity.worst(grads))
    assert all(g.ok for g in grads), [str(g) for g in grads if not g.ok]
    stats = ({n: t for n, t in b[2].items() if t.is_floating_point()} for b in (c, e, d))
    running = parity.compare_all(*stats, torch.float32)
    assert all(r.ok for r in running), [str(r) for r in running if not r.ok]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in model_backends_names()])
def test_compile_reduce_overhead_replays_cuda_graphs(backend):
    """torch.compile(mode="reduce-overhead"): the fused ops' kernels are captured in CUDA graphs
    (after the warm-up call has autotuned them) and replayed on new inputs; each replay must give
    what eager torchvision gives for those inputs, in eval and in training steps (whose running
    statistics advance in step with torchvision's)."""
    torch._dynamo.reset()
    tv, fused = matched_pair("b0", dropout=0.0, stochastic_depth_prob=0.0)
    exact = copy.deepcopy(tv).double()
    model = copy.deepcopy(fused)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    labels = torch.tensor([1, 2], device=DEVICE)
    with backend_everywhere(backend):
        for seed in range(3):  # warm-up, recording, replay
            x = images(2, 64, seed=seed)
            with torch.no_grad():
                model.eval()
                logits = compiled(x).clone()  # the graph's output buffer is reused by the next replay
                check(parity.compare(f"eval logits, call {seed}", logits, tv.eval()(x), exact.eval()(x.double()),
                                     torch.float32))  # fmt: skip
        for seed in range(3):
            x = images(2, 64, seed=10 + seed)
            c, e, d = train_step(model, x, labels, run=compiled), train_step(tv, x, labels), train_step(exact, x, labels)
            check(parity.compare(f"training logits, call {seed}", c[0], e[0], d[0], torch.float32))
            grads = parity.compare_all(c[1], e[1], d[1], torch.float32)
            assert all(g.ok for g in grads), [str(g) for g in grads if not g.ok]
