"""The ops' eager fast path (fused_mbconv/ops/_eager.py): in plain eager mode ``call(op, ...)``
skips torch.library's dispatch and gives what ``op(...)`` gives, outputs and gradients; wherever
a mode, transform, tracer or tensor subclass could observe the call, it goes through the op."""

from __future__ import annotations

import pytest
import torch
from test_opcheck import all_samples

from fused_mbconv import ops
from fused_mbconv.ops import _eager


def _tensors(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


def _run(fn, op, args):
    """Outputs and, where they are differentiable, the gradients of every input requiring one
    for a fixed random upstream gradient."""
    outputs = _tensors(fn(op, *args))
    differentiable = [o for o in outputs if o.requires_grad]
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = []
    if differentiable:
        gen = torch.Generator().manual_seed(0)
        upstream = [torch.randn(o.shape, generator=gen).to(o) for o in differentiable]
        grads = torch.autograd.grad(differentiable, inputs, upstream, allow_unused=True)
    return outputs, grads, [o.grad_fn for o in differentiable]


# The path's choice is above the backends (both paths run the op's body, which picks one): the
# reference backend covers it in a second, where the interpreted Triton one took 40 s (and was
# bitwise equal too).
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_fast_path_matches_the_dispatched_op(requires_grad):
    for op, args in all_samples(torch.float32, requires_grad):
        fast, fast_grads, fast_fns = _run(_eager.call, op, args)
        slow, slow_grads, slow_fns = _run(lambda o, *a: o(*a), op, args)
        assert len(fast) == len(slow) and len(fast_grads) == len(slow_grads), op._name
        for a, b in zip([*fast, *fast_grads], [*slow, *slow_grads]):
            assert (a is None) == (b is None), op._name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=op._name)  # the same body: bitwise equal
        # which path ran: the fast path's autograd node, the op's generated one
        assert all(type(f).__name__.startswith("Eager_fused_mbconv") for f in fast_fns), op._name
        assert all(type(f).__name__.startswith("GeneratedBackwardFor_fused_mbconv") for f in slow_fns), op._name


def test_ops_run_below_autocast():
    """Under autocast both paths give the same results as without it (the ops are opaque to
    autocast: their callers cast the inputs), including the backward ops, whose reference
    convolution_backward failed on the mixed dtypes that autocast made inside it."""
    for op, args in all_samples(torch.float32, False):
        plain = _tensors(op(*args))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for out in (_tensors(_eager.call(op, *args)), _tensors(op(*args))):
                for a, b in zip(out, plain):
                    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=op._name)


def _plain(x):
    return _eager._plain_eager((x,))


def test_fast_path_only_in_plain_eager():
    x = torch.randn(2, 3)
    assert _plain(x) and _plain(torch.nn.Parameter(x))
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode

    with FakeTensorMode():
        assert not _plain(x)
    with TorchFunctionMode():
        assert not _plain(x)
    with torch.autograd.profiler.profile():
        assert not _plain(x)
    assert all(not v for v in torch.func.vmap(lambda r: torch.tensor([_plain(r)]))(x))

    class Subclass(torch.Tensor):
        pass

    assert not _plain(x.as_subclass(Subclass))


def test_fast_path_keeps_the_ops_own_errors():
    """A backward op has no autograd formula: with an input that requires a gradient, the fast
    path defers to the op, whose backward then says so (instead of a silently constant output)."""
    dy = torch.randn(2, 4, 3, 3, requires_grad=True)
    dx, _ = _eager.call(ops.se_scale_backward, dy, torch.randn(2, 4, 3, 3), torch.rand(2, 4))
    with pytest.raises(RuntimeError, match="no autograd formula"):
        dx.sum().backward()
