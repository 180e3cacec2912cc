"""A stand-in CUDA driver for Triton, so that the host's cost of issuing the fused ops can be
measured on a machine without a GPU.

On the H200 the fused model called eagerly was host-bound (bench/results/
2026-11-26_h200_host_share.md): the host took longer to issue the ops than their kernels ran.
That time is Python (ours and Triton's launch path) and small torch ops, all of which run on any
CPU. With this driver installed, Triton's real launch path runs on CPU tensors: the JIT binder
and specialization, the kernel cache, the autotuner's key and config lookup, the kernels'
compilation for a real target (sm_90 by default, through ptxas). Only the last step is stood in
for: loading the cubin and the C launcher's cuLaunchKernelEx, replaced by a Python call that
reads each tensor argument's data pointer as the C launcher does. Autotuning "times" every
config as equal, so the first config that compiles is chosen: the launches are real launches of
real kernels, not of the configs a GPU would pick. (On CPU tensors fused_mbconv also sizes its
split reductions for one multiprocessor: fewer partial rows than on a GPU, the same launches.)

    from bench import standin_driver
    standin_driver.install()      # before the first launch; CPU tensors then launch
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_ARCH = 90
_recording: list[list] = []  # the lists launches are recorded into, innermost last
_installed: list[int] = []  # the architecture, once installed


class _Launcher:
    """Stands in for triton's CudaLauncher: the C launcher unpacks every argument (a tensor's
    data_ptr(), a scalar's value) and calls cuLaunchKernelEx; this only unpacks them, and
    records the launch inside ``record()``."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter, exit, *args):
        for a in args:
            if isinstance(a, torch.Tensor):
                a.data_ptr()
        if _recording:
            _recording[-1].append(((grid_x, grid_y, grid_z), stream, function, metadata, args))


class _Utils:
    @staticmethod
    def load_binary(name, kernel, shared, device):
        return None, name, 0, 0, 1024  # module, function (its name: recorded), registers, spills, max threads

    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}  # fmt: skip


@contextlib.contextmanager
def record() -> Iterator[list]:
    """The launches made inside the block: (grid, stream, function, packed metadata, arguments)
    as the launcher received them."""
    launches: list = []
    _recording.append(launches)
    try:
        yield launches
    finally:
        _recording.pop()


def _benchmarker(fn, *args, **kwargs):
    fn()  # compiles the config (and launches it, stood in)
    return 1.0


def install(arch: int = _ARCH, multiprocessors: int | None = None) -> None:
    """Make ``arch``'s Triton backend the active driver, with the stand-in loader and launcher,
    and let fused_mbconv's "triton" backend take CPU tensors. Idempotent. ``multiprocessors``:
    the SM count fused_mbconv sizes its split reductions for (default: one, as for any CPU
    tensor); a GPU's count gives the kernels the specializations a launch there gives them."""
    if _installed:
        return
    _installed.append(arch)
    import triton.testing

    from fused_mbconv import backends
    from fused_mbconv.ops import _triton

    if multiprocessors is not None:
        _triton.multiprocessors = lambda device: multiprocessors  # the ops call it through the module

    triton.testing.do_bench = _benchmarker  # fused_mbconv's autotuner times configs with it
    missing = backends._missing
    backends._missing = lambda name: None if name == "triton" else missing(name)
    backends.check_usable = lambda name, device: None

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.driver import driver

    class StandInDriver(CudaDriver):
        def __init__(self):
            self.utils = _Utils()
            self.launcher_cls = _Launcher
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None
            self.get_current_stream = lambda device=None: 0
            self.get_device_capability = lambda device=None: divmod(arch, 10)

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            return _benchmarker

        def get_empty_cache_for_benchmark(self):
            return torch.empty(1)

        def clear_cache(self, cache):
            pass

    driver.set_active(StandInDriver())
