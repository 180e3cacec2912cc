"""Launching the Triton kernels with less host time: a kernel launched again with arguments of
the same kind reuses what Triton worked out for the first such launch.

Why: called eagerly, the fused model was host-bound on the H200 (bench/results/
2026-11-26_h200_host_share.md), and Triton's launch path (the autotuner's key and config
lookup, the JIT binder's per-argument specialization, the compiled-kernel cache key) was the
largest single part of an op's host time: with bench/standin_driver.py on this repository's CPU,
50-70 us of the 160-200 us a depthwise inference layer took to issue, for one launch.

How: ``launcher(kernel)`` wraps a ``@triton.jit`` kernel (autotuned or not) so that
``kernel[grid](*args, **kwargs)`` reads as before. The first launch for a key goes through
Triton (tuning, compiling, launching) and records the compiled kernel and the autotuned config;
a later launch with the same key calls that compiled kernel's launcher directly, with the
arguments in the order Triton passes them, on the current device's current stream. The key is
what decides Triton's choices: per tensor argument its dtype and whether its address is 16-byte
aligned (a pointer's specialization), every other argument's value except floats (never
specialized; a float's value changing between launches must not miss), the argument names and
the device. So a launch takes the fast path only where Triton's own would have picked the same
compiled kernel and config.

Triton's own path runs instead under the interpreter, while a launch hook is installed
(profilers such as proton) or the kernel has pre-run hooks, for a key whose first launch did not
return a compiled kernel, on a triton without the internals used here, and everywhere when
FUSED_MBCONV_FAST_LAUNCH=0 at import. tests/test_launch.py checks, with the stand-in driver,
that the fast path hands the launcher the same grid, compiled kernel and arguments as Triton's
path, for every kernel the fused blocks launch.
"""

from __future__ import annotations

import functools
import inspect
import operator
import os
from typing import Any, Callable

import torch

from fused_mbconv.backends import triton_interpreted

_MAX_KEYS = 4096  # per kernel; past it the table starts over (shapes that never repeat)
# read once: the check runs on every launch
ENABLED = os.environ.get("FUSED_MBCONV_FAST_LAUNCH", "1") != "0" and not triton_interpreted()


class _Entry:
    """What a fast launch needs from a first launch through Triton: the compiled kernel's
    launcher, function and metadata, and where each kernel parameter's value comes from in
    (*args, *kwargs values, *the autotuned config's values, *the parameters' defaults)."""

    __slots__ = ("run", "function", "metadata", "tail", "pick")

    def __init__(self, compiled, names: tuple, n_args: int, kwarg_names: tuple, config: dict, defaults: dict):
        self.run = compiled.run  # creates the launcher (on first access, in triton 3.6)
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.tail = (*config.values(), *defaults.values())
        position: dict[str, int] = {}
        for i, name in enumerate((*names[:n_args], *kwarg_names, *config, *defaults)):
            position.setdefault(name, i)  # a passed or tuned value before a default
        picks = [position[name] for name in names]
        self.pick = operator.itemgetter(*picks) if len(picks) > 1 else lambda values: (values[picks[0]],)


class Launcher:
    """``kernel`` (a JITFunction, or an Autotuner around one) launched as ``kernel[grid](...)``,
    by the fast path where it applies (see the module's docstring). ``fn`` is the wrapped
    kernel, as for triton's own wrappers."""

    def __init__(self, kernel) -> None:
        from triton.runtime.jit import JITFunction

        self.fn = kernel
        jit = kernel
        while not isinstance(jit, JITFunction):
            jit = jit.fn
        self._jit = jit
        self._names = tuple(jit.arg_names)
        self._defaults = {p.name: p.default for p in jit.params if p.default is not inspect.Parameter.empty}
        self._entries: dict[tuple, _Entry | None] = {}
        self._driver, self._hooks = _triton_runtime()

    def __getitem__(self, grid) -> Callable[..., None]:
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **kwargs) -> None:
        if not ENABLED or self._driver is None or self._jit.pre_run_hooks or _hooks_installed(self._hooks):
            self.fn[grid](*args, **kwargs)
            return
        device = self._driver.active.get_current_device()
        values = (*args, *kwargs.values())
        key = (device, len(args), *kwargs, *[
            (v.dtype, v.data_ptr() % 16 == 0) if isinstance(v, torch.Tensor) else float if type(v) is float else v
            for v in values
        ])  # fmt: skip
        try:
            entry = self._entries.get(key, self)  # self: never seen
        except TypeError:  # an unhashable argument (a list): Triton's path
            entry = None
        if entry is None:  # seen, not fast-launchable
            self.fn[grid](*args, **kwargs)
            return
        if entry is self:
            self._first_launch(key, grid, args, kwargs)
            return
        params = entry.pick((*values, *entry.tail))
        g = grid(dict(zip(self._names, params))) if callable(grid) else grid
        entry.run(
            g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,
            self._driver.active.get_current_stream(device), entry.function, entry.metadata,
            None, None, None,  # launch metadata and the enter / exit hooks: none installed
            *params,
        )  # fmt: skip

    def _first_launch(self, key: tuple, grid, args: tuple, kwargs: dict) -> None:
        compiled = self.fn[grid](*args, **kwargs)
        config = getattr(self.fn, "best_config", None)
        config = {} if config is None else {k: v for k, v in config.all_kwargs().items() if k in self._names}
        if len(self._entries) >= _MAX_KEYS:
            self._entries.clear()
        try:
            self._entries[key] = _Entry(compiled, self._names, len(args), tuple(kwargs), config, self._defaults)
        except (AttributeError, KeyError):  # not a compiled kernel (an async compile's future,
            self._entries[key] = None  # another triton), or a parameter without a value


def _hooks_installed(hooks) -> bool:
    """Whether a launch enter or exit hook is installed in triton's ``knobs.runtime``: triton 3.6+
    keeps each as a HookChain, empty unless a hook was added; older tritons had None or one."""
    for hook in (hooks.launch_enter_hook, hooks.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _triton_runtime():
    """Triton's driver and its launch-hook settings (``knobs.runtime``), or (None, None) where
    this triton lacks them."""
    try:
        from triton import knobs
        from triton.runtime.driver import driver
    except ImportError:
        return None, None
    return driver, knobs.runtime


def launcher(kernel) -> Launcher | Any:
    """``kernel`` wrapped in a ``Launcher``; under the interpreter, ``kernel`` itself."""
    return kernel if triton_interpreted() else Launcher(kernel)
