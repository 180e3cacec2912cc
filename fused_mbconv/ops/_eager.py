"""The ops' eager fast path: ``call(op, *args)`` runs a fused_mbconv op as ``op(*args)`` does,
but in plain eager PyTorch it skips torch.library's dispatch and calls the op's Python body (and,
where a gradient is needed, its registered autograd formula through a plain autograd.Function).

Why: every call of a torch.library custom op passes the dispatcher twice (autograd, then the
device's kernel), a generated autograd.Function, a TorchDynamo-disabling wrapper and an aliasing
check. On this repository's CPU machine that was 35-115 us an op, up to as much as the op's own Python
(an inference call of the Triton depthwise op: 101 us through the op, 68 us of body); on the H200
the host took longer to issue a fused layer than its kernels ran (bench/results/
2026-11-26_h200_host_share.md), so the dispatch is a cost the GPU waits on.

The fast path is taken only when nothing could observe or transform the call: not under
torch.compile's tracing, TorchScript tracing, a dispatch or torch-function mode (fake tensors,
make_fx, FlopCounterMode, ...), functorch transforms or the autograd profiler, and with every
tensor argument a plain torch.Tensor (or Parameter). Anywhere else ``op(*args)`` runs, so
compiled graphs, opcheck and exported programs still see the registered op. Both paths run the
same body, the same checks and the same backward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch._C import _functorch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(args: tuple) -> bool:
    if (
        torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
        or _functorch.peek_interpreter_stack() is not None
        or torch.autograd.profiler._is_profiler_enabled
    ):
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


_FUNCTIONS: dict[Any, type] = {}


def _autograd_function(op) -> type:
    """A torch.autograd.Function whose forward is ``op``'s body and whose setup and backward are
    those registered with ``op.register_autograd`` (created once per op)."""
    function = _FUNCTIONS.get(op)
    if function is None:
        body, setup_context, backward = op._init_fn, op._setup_context_fn, op._backward_fn

        def forward(ctx, *args):
            output = body(*args)
            setup_context(ctx=ctx, inputs=args, output=output)
            return output

        function = type(f"Eager_fused_mbconv_{op._name}", (torch.autograd.Function,),
                        {"forward": staticmethod(forward), "backward": staticmethod(backward)})  # fmt: skip
        _FUNCTIONS[op] = function
    return function


_SCHEMAS: dict[Any, tuple[tuple[int, ...], tuple]] = {}


def _schema_facts(op) -> tuple[tuple[int, ...], tuple]:
    """From ``op``'s schema: the positions of the arguments it writes in place (``mutates_args``),
    and every argument's default (the autograd path's setup and backward see all the arguments,
    as through the dispatcher, which fills in the defaults)."""
    facts = _SCHEMAS.get(op)
    if facts is None:
        arguments = op._opoverload._schema.arguments
        mutated = tuple(i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write)
        facts = _SCHEMAS[op] = (mutated, tuple(a.default_value for a in arguments))
    return facts


def call(op, *args: Any) -> Any:
    """``op(*args)`` for a fused_mbconv custom op (positional arguments), past the dispatcher in
    plain eager mode (see the module's docstring)."""
    if not _plain_eager(args):
        return op(*args)
    body: Callable | None = getattr(op, "_init_fn", None)
    if body is None:  # a torch without these CustomOpDef internals: the dispatcher's way
        return op(*args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        if getattr(op, "_backward_fn", None) is None:
            return op(*args)  # the op's own error: no autograd formula
        defaults = _schema_facts(op)[1]
        return _autograd_function(op).apply(*args, *defaults[len(args) :])
    result = body(*args)
    # as the dispatcher does for a mutated argument (a kernel's own writes bump nothing): code
    # keyed on version counters must see the running statistics change
    for i in _schema_facts(op)[0]:
        torch.autograd.graph.increment_version(args[i])
    return result
