"""The CUDA depthwise kernels themselves, run on the CPU against the reference.

The test copies kernels/*.cu, rewrites each ``kernel<<<...>>>(args)`` into a call of
tests/cuda_emulation.h (a block = 256 OS threads, __syncthreads a barrier, __shared__ a static),
compiles them with the host compiler and drives them through tests/cuda_emulation_driver.cpp the
way csrc/dwconv_bn_silu.cpp does. So the kernels' indexing, tiling, vector paths, block
reductions, combines and atomics execute here; the GPU run of tests/test_dwconv_bn_silu.py still
checks what emulation cannot (fast-math intrinsics, warps, the memory model, the host code).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fused_mbconv.ops.dwconv_bn_silu import output_size, reference

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cuda_include() -> Path | None:
    spec = importlib.util.spec_from_file_location("fused_mbconv_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # defines the helpers; setup() runs only as __main__
    home = setup.find_cuda_home()
    return None if home is None or not (home / "include" / "cuda_runtime.h").is_file() else home / "include"


CUDA_INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(
    CXX is None or CUDA_INCLUDE is None, reason="needs a C++20 compiler and the CUDA headers"
)

LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>", re.DOTALL)
DYNAMIC_SHARED = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")


def emulated_source(text: str) -> str:
    text = DYNAMIC_SHARED.sub(r"alignas(16) static \1 \2[::emu::kSharedBytes / sizeof(\1)];", text)
    return LAUNCH.sub(r"::emu::launch(\1, \2)", text)


PROBE = "#include <barrier>\n#include <atomic>\nint main() { float f = 0; std::atomic_ref<float>(f).fetch_add(1.f); }\n"


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    build = tmp_path_factory.mktemp("emulated_kernels")
    (build / "probe.cpp").write_text(PROBE)
    probe = subprocess.run([CXX, "-std=c++20", "-c", str(build / "probe.cpp"), "-o", str(build / "probe.o")],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"{CXX} lacks C++20 std::barrier / std::atomic_ref<float>")
    sources = []
    for cu in sorted((ROOT / "kernels").glob("*.cu")):
        cpp = build / (cu.stem + ".cpp")
        cpp.write_text(emulated_source(cu.read_text()))
        sources.append(cpp)
    sources.append(ROOT / "tests" / "cuda_emulation_driver.cpp")
    flags = ["-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas", f"-I{ROOT / 'kernels'}", f"-I{ROOT / 'tests'}",
             f"-I{CUDA_INCLUDE}", "-include", "cuda_emulation.h"]  # fmt: skip

    def compile_one(src: Path) -> Path:
        obj = build / (src.stem + ".o")
        done = subprocess.run([CXX, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-4000:]
        return obj

    with ThreadPoolExecutor() as pool:
        objects = list(pool.map(compile_one, sources))
    exe = build / "driver"
    done = subprocess.run([CXX, "-pthread", *map(str, objects), "-o", str(exe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return exe


DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the output's scale


def _write(path: Path, t: torch.Tensor) -> None:
    """t's storage from element 0, raw (what a data pointer with t's strides addresses)."""
    assert t.storage_offset() == 0
    storage = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    path.write_bytes(storage.view(torch.uint8).numpy().tobytes())


def _read(path: Path, like: torch.Tensor) -> torch.Tensor:
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).view(like.dtype)
    return data.as_strided(like.shape, like.stride())


def _strides(t: torch.Tensor) -> str:
    return ",".join(map(str, t.stride()))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    bound = TOL[actual.dtype] * max(1.0, expected.abs().max().item())
    print(f"{name}: max err {err:.3g} (bound {bound:.3g})")
    assert err <= bound, f"{name}: max error {err:.3g} exceeds {bound:.3g}"


def make_x(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "strided":  # every other column of a wider tensor
        return torch.randn(n, c, h, 2 * w, generator=g).to(dtype)[..., ::2]
    x = torch.randn(shape, generator=g).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _output_hw(shape, k: int, stride: int, padding) -> tuple[int, int]:
    top, bottom, left, right = padding
    return output_size(shape[2], k, stride, top, bottom), output_size(shape[3], k, stride, left, right)


def run_emulated(driver, tmp: Path, op: str, x: torch.Tensor, k: int, stride: int, padding, **extra) -> None:
    n, c, h, w = x.shape
    out_h, out_w = _output_hw(x.shape, k, stride, padding)
    args = dict(
        op=op, dtype=DTYPE_NAMES[x.dtype], dir=tmp, k=k, stride=stride, n=n, c=c, h=h, w=w, pad_top=padding[0],
        pad_left=padding[2], out_h=out_h, out_w=out_w, inner=int(c > 1 and x.stride(1) == 1), x_strides=_strides(x),
        **extra,
    )  # fmt: skip
    _write(tmp / "x", x)
    done = subprocess.run([str(driver), *(f"{key}={v}" for key, v in args.items())], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def check_forward(driver, tmp: Path, shape, dtype, layout, vectorised, k, stride, padding, training) -> None:
    x = make_x(shape, dtype, layout)
    n, c = shape[:2]
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(c, 1, k, k, generator=g) / k
    gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    out_h, out_w = _output_hw(shape, k, stride, padding)
    y_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format  # as the glue does
    y_like = torch.empty(n, c, out_h, out_w, dtype=dtype, memory_format=y_format)
    _write(tmp / "weight", weight)
    _write(tmp / ("gamma" if training else "scale"), gamma)
    _write(tmp / ("beta" if training else "shift"), beta)
    vec = 16 // x.element_size() if vectorised else 1
    run_emulated(driver, tmp, "train" if training else "infer", x, k, stride, padding, vec=vec,
                 y_strides=_strides(y_like), y_numel=y_like.numel(), squeeze=1, eps=1e-3)  # fmt: skip

    exact = (x.double(), weight.double(), gamma.double(), beta.double())
    if training:
        y_ref, s_ref, mean_ref, var_ref = reference.forward_train(*exact, 1e-3, stride, padding, True)
        _assert_close(_read(tmp / "mean_out", torch.empty(c)), mean_ref, "mean")
        _assert_close(_read(tmp / "var", torch.empty(c)), var_ref, "var")
    else:
        y_ref, s_ref = reference.forward_infer(*exact, stride, padding, True)
    _assert_close(_read(tmp / "y", y_like), y_ref, "y")
    _assert_close(_read(tmp / "squeeze_sum", torch.empty(n, c)) / (out_h * out_w), s_ref, "squeeze")


def check_backward(driver, tmp: Path, shape, dtype, layout, k, stride, padding, training) -> None:
    x = make_x(shape, dtype, layout)
    n, c = shape[:2]
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(c, 1, k, k, generator=g) / k
    gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    if training:
        mean, invstd = torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5
    else:  # the inference backward
        mean, invstd = torch.zeros(c), torch.ones(c)
    out_h, out_w = _output_hw(shape, k, stride, padding)
    dy = torch.randn(n, c, out_h, out_w, generator=g).to(dtype)
    if layout == "strided":  # grad_y in yet another layout than x
        dy = dy.contiguous(memory_format=torch.channels_last)
    dsq = torch.randn(n, c, generator=g)
    dx_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    dx_like = torch.empty_like(x, memory_format=dx_format)
    for name, t in dict(weight=weight, gamma=gamma, beta=beta, mean=mean, invstd=invstd, dy=dy, dsq=dsq).items():
        _write(tmp / name, t)
    run_emulated(driver, tmp, "bwd", x, k, stride, padding, dy_strides=_strides(dy), dx_strides=_strides(dx_like),
                 dx_numel=dx_like.numel(), squeeze=1, training=int(training))  # fmt: skip

    refs = reference.backward(dy.double(), dsq.double(), x.double(), weight.double(), gamma.double(), beta.double(),
                              mean.double(), invstd.double(), stride, padding, training)  # fmt: skip
    outputs = [_read(tmp / "dx", dx_like)] + [
        _read(tmp / name, torch.empty(like.shape)) for name, like in zip(["dweight", "dgamma", "dbeta"], refs[1:])
    ]
    for name, actual, expected in zip(["dx", "dweight", "dgamma", "dbeta"], outputs, refs):
        _assert_close(actual, expected, name)


CONFIGS = [(3, 1, [1, 1, 1, 1]), (5, 2, [1, 2, 1, 2]), (3, 2, [0, 1, 0, 1]), (5, 1, [2, 2, 2, 2])]
# (dtype, layout, whether the apply kernel takes 16-byte channel vectors: channels_last, C % vec == 0);
# fp16 shares bf16's code paths except for the vector conversions
FORWARD_CASES = [
    (dtype, layout, vectorised)
    for dtype in (torch.float32, torch.bfloat16)
    for layout, vectorised in [("nchw", False), ("channels_last", True), ("channels_last", False), ("strided", False)]
] + [(torch.float16, "channels_last", True)]


@pytest.mark.parametrize("dtype,layout,vectorised", FORWARD_CASES, ids=str)
@pytest.mark.parametrize("k,stride,padding", CONFIGS, ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward(driver, tmp_path, dtype, layout, vectorised, k, stride, padding, training):
    check_forward(driver, tmp_path, (2, 16, 13, 11), dtype, layout, vectorised, k, stride, padding, training)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k,stride,padding", CONFIGS, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_backward(driver, tmp_path, dtype, k, stride, padding, layout, training):
    # 17 channels: a partly idle channel group in channels_last
    check_backward(driver, tmp_path, (2, 17, 13, 11), dtype, layout, k, stride, padding, training)


ODD_CASES = [  # (shape, layout, vectorised)
    ((1, 40, 7, 7), "channels_last", True),  # fp32 vectors, 10 of 16 vector lanes busy
    ((3, 5, 1, 9), "nchw", False),  # one input row
    ((1, 3, 20, 1), "channels_last", False),  # one input column
    ((1, 2, 40, 40), "nchw", False),  # several chunks per image plane
    ((2, 1, 5, 6), "nchw", False),  # one channel
    ((1, 64, 9, 9), "channels_last", False),  # two channel groups of 32
]


@pytest.mark.parametrize("shape,layout,vectorised", ODD_CASES, ids=str)
@pytest.mark.parametrize("k,stride,padding", [(3, 1, [1, 1, 1, 1]), (5, 2, [2, 2, 2, 2])], ids=str)
def test_odd_shapes(driver, tmp_path, shape, layout, vectorised, k, stride, padding):
    check_forward(driver, tmp_path, shape, torch.float32, layout, vectorised, k, stride, padding, training=True)
    check_backward(driver, tmp_path, shape, torch.float32, layout, k, stride, padding, training=True)
