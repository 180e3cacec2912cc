"""The CUDA kernels themselves (depthwise conv + BN + SiLU, squeeze-excite), run on the CPU
against the reference.

The test copies kernels/*.cu and *.cuh, rewrites each ``kernel<<<...>>>(args)`` into a call of
tests/cuda_emulation.h (a block = an OS thread per thread, __syncthreads a barrier, __shared__ a
static, dynamic shared memory limited to 48 KB or what the kernel opted in to),
compiles them with the host compiler and drives them through tests/cuda_emulation_driver.cpp the
way csrc/dwconv_bn_silu.cpp and csrc/squeeze_excite.cpp do. So the kernels' indexing, tiling,
vector paths, block reductions, combines and atomics execute here; the GPU runs of
tests/test_dwconv_bn_silu.py and tests/test_squeeze_excite.py still check what emulation cannot
(fast-math intrinsics, warps, the memory model, the host code).

Tolerances are relative to the output's scale: a few units in the last place of the output dtype
(bf16 2^-8, fp16 2^-10), and room for reordered fp32 sums; inputs are the same rounded values on
both sides, so only the kernels' own rounding counts.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fused_mbconv.ops.dwconv_bn_silu import output_size, reference
from fused_mbconv.ops.squeeze_excite import reference as se_reference

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
    for header in (ROOT / "kernels").glob("*.cuh"):  # launches may sit in headers too
        (build / header.name).write_text(emulated_source(header.read_text()))
    for cu in sorted((ROOT / "kernels").glob("*.cu")):
        cpp = build / (cu.stem + ".cpp")
        cpp.write_text(emulated_source(cu.read_text()))
        sources.append(cpp)
    sources.append(ROOT / "tests" / "cuda_emulation_driver.cpp")
    flags = ["-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas", f"-I{build}", f"-I{ROOT / 'tests'}",
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


def _vector_width(*tensors: torch.Tensor) -> int:
    """csrc/host_utils.h's vector_width: 16-byte channel vectors when every tensor has channel
    stride 1 and C and its other strides are multiples of the vector (buffers here are aligned)."""
    vec = 16 // tensors[0].element_size()
    ok = tensors[0].shape[1] % vec == 0 and all(
        t.stride(1) == 1 and all(t.stride(d) % vec == 0 for d in (0, 2, 3)) for t in tensors
    )
    return vec if ok else 1


def check_backward(driver, tmp: Path, shape, dtype, layout, k, stride, padding, training, dy_layout=None) -> None:
    """grad_y in ``dy_layout``; by default channels_last for a strided x (yet another layout), else
    contiguous (NCHW)."""
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
    if (dy_layout or ("channels_last" if layout == "strided" else "nchw")) == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    dsq = torch.randn(n, c, generator=g)
    dx_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    dx_like = torch.empty_like(x, memory_format=dx_format)
    for name, t in dict(weight=weight, gamma=gamma, beta=beta, mean=mean, invstd=invstd, dy=dy, dsq=dsq).items():
        _write(tmp / name, t)
    vec = _vector_width(x, dy, dx_like)  # as the host decides
    run_emulated(driver, tmp, "bwd", x, k, stride, padding, vec=vec, dy_strides=_strides(dy),
                 dx_strides=_strides(dx_like), dx_numel=dx_like.numel(), squeeze=1, training=int(training))  # fmt: skip

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k,stride,padding", CONFIGS, ids=str)
def test_backward_channel_vectors(driver, tmp_path, dtype, k, stride, padding):
    """x, grad_y and grad_x channels_last with C a multiple of 8: x staged in 16-byte vectors, grad_y
    read and grad_x written 4 channels at once."""
    check_backward(driver, tmp_path, (2, 24, 13, 19), dtype, "channels_last", k, stride, padding, True,
                   dy_layout="channels_last")  # fmt: skip


ODD_CASES = [  # (shape, layout, vectorised)
    ((1, 40, 7, 7), "channels_last", True),  # fp32 vectors, 10 of 16 vector lanes busy
    ((3, 5, 1, 9), "nchw", False),  # one input row
    ((1, 3, 20, 1), "channels_last", False),  # one input column
    ((1, 2, 40, 40), "nchw", False),  # several chunks per image plane
    ((2, 1, 5, 6), "nchw", False),  # one channel
    ((1, 64, 9, 9), "channels_last", False),  # two channel groups of 32
    ((2, 24, 19, 37), "channels_last", True),  # halo tiles across and down the image, 6 of 8 lanes busy
]


@pytest.mark.parametrize("shape,layout,vectorised", ODD_CASES, ids=str)
@pytest.mark.parametrize("k,stride,padding", [(3, 1, [1, 1, 1, 1]), (5, 2, [2, 2, 2, 2])], ids=str)
def test_odd_shapes(driver, tmp_path, shape, layout, vectorised, k, stride, padding):
    check_forward(driver, tmp_path, shape, torch.float32, layout, vectorised, k, stride, padding, training=True)
    check_backward(driver, tmp_path, shape, torch.float32, layout, k, stride, padding, training=True)


# ---------------------------------------------------------------------------------------------
# squeeze-excite kernels (kernels/squeeze_excite.cu) against fused_mbconv/ops/squeeze_excite/reference.py


def make_activation(shape, dtype, layout, seed=0):
    """x of ``shape``; "padded": every other channel of a channels-last tensor three columns wider
    (no stride 1, and (H, W) cannot be walked as one flat index)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = (torch.randn(shape, generator=g) + torch.randn(n, c, 1, 1, generator=g)).to(dtype)
    if layout == "padded":
        wide = torch.zeros(n, h, w + 3, 2 * c, dtype=dtype).permute(0, 3, 1, 2)
        return wide[:, ::2, :, :w].copy_(x)
    if layout == "strided":  # every other column: flat planes with pixel stride 2
        return torch.zeros(n, c, h, 2 * w, dtype=dtype)[..., ::2].copy_(x)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _flat(*tensors: torch.Tensor) -> bool:
    """csrc/squeeze_excite.cpp's flat_planes."""
    return all(t.shape[2] == 1 or t.shape[3] == 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in tensors)


def _plane_strides(t: torch.Tensor, flat: bool) -> str:
    """csrc/squeeze_excite.cpp's plane_strides: with flat planes, the flat pixel stride last."""
    s = list(t.stride())
    if flat and t.shape[3] == 1:
        s[3] = s[2]
    return ",".join(map(str, s))


def _vector_width(*tensors: torch.Tensor) -> int:
    """csrc/host_utils.h's vector_width (the driver's buffers are 16-byte aligned)."""
    vec = 16 // tensors[0].element_size()
    if tensors[0].shape[1] % vec:
        return 1
    for t in tensors:
        if t.stride(1) != 1 or any(t.stride(d) % vec for d in (0, 2, 3)):
            return 1
    return vec


def _like_glue(x: torch.Tensor) -> torch.Tensor:
    """The output the glue allocates for x (empty_like_layout)."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else None
    return torch.empty_like(x, memory_format=fmt or torch.contiguous_format)


def run_driver(driver, tmp: Path, **args) -> str:
    done = subprocess.run([str(driver), f"dir={tmp}", *(f"{k}={v}" for k, v in args.items())], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def run_plane_op(driver, tmp: Path, op: str, x: torch.Tensor, *others: torch.Tensor, **extra) -> dict:
    """Runs op on x (and ``others``, the activations the host also checks for vectors and flat
    planes); returns the tiling the driver used."""
    n, c, h, w = x.shape
    flat = _flat(x, *others)
    _write(tmp / "x", x)
    out = run_driver(driver, tmp, op=op, dtype=DTYPE_NAMES[x.dtype], n=n, c=c, h=h, w=w, vec=_vector_width(x, *others),
                     inner=int(c > 1 and x.stride(1) == 1), flat=int(flat), x_strides=_plane_strides(x, flat),
                     **{k: (_plane_strides(v, flat) if isinstance(v, torch.Tensor) else v) for k, v in extra.items()})  # fmt: skip
    return dict(item.split("=") for item in out.split())


def _gate(n, c, dtype, seed=3):
    """(N, C) in ``dtype``, transposed in memory (not contiguous)."""
    return torch.rand(c, n, generator=torch.Generator().manual_seed(seed)).to(dtype).t()


SE_SHAPES = [(1, 17, 13, 11), (3, 72, 7, 9), (3, 17, 1, 21), (1, 72, 20, 1), (1, 3, 64, 64), (2, 16, 40, 40)]
SE_LAYOUTS = ["nchw", "channels_last", "padded", "strided"]
SE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", SE_DTYPES, ids=str)
@pytest.mark.parametrize("layout", SE_LAYOUTS)
@pytest.mark.parametrize("shape", SE_SHAPES, ids=str)
def test_se_squeeze(driver, tmp_path, shape, layout, dtype):
    x = make_activation(shape, dtype, layout)
    tiling = run_plane_op(driver, tmp_path, "se_squeeze", x)
    pooled = _read(tmp_path / "pooled", torch.empty(shape[:2], dtype=dtype))
    _assert_close(pooled, se_reference.squeeze(x.double()), f"pooled (chunks {tiling['chunks']}, vec {tiling['vec']})")


@pytest.mark.parametrize("gate_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", SE_DTYPES, ids=str)
@pytest.mark.parametrize("layout", SE_LAYOUTS)
@pytest.mark.parametrize("shape", SE_SHAPES, ids=str)
def test_se_scale(driver, tmp_path, shape, layout, dtype, gate_dtype):
    x = make_activation(shape, dtype, layout)
    y_like = _like_glue(x)
    gate = _gate(*shape[:2], dtype if gate_dtype == "same" else torch.float32)
    _write(tmp_path / "gate", gate)
    run_plane_op(driver, tmp_path, "se_scale", x, y_like, y_strides=y_like, y_numel=y_like.numel(),
                 gate_strides=f"{gate.stride(0)},{gate.stride(1)}", gate_float=int(gate.dtype == torch.float32))  # fmt: skip
    expected = x.double() * gate.double()[:, :, None, None]
    _assert_close(_read(tmp_path / "y", y_like), expected, "y")


@pytest.mark.parametrize("gate_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", SE_DTYPES, ids=str)
@pytest.mark.parametrize("layout", SE_LAYOUTS + ["broadcast_grad"])
@pytest.mark.parametrize("shape", SE_SHAPES, ids=str)
def test_se_scale_backward(driver, tmp_path, shape, layout, dtype, gate_dtype):
    x = make_activation(shape, dtype, "channels_last" if layout == "broadcast_grad" else layout)
    g = torch.Generator().manual_seed(4)
    if layout == "broadcast_grad":  # what y.sum() hands the backward: every stride 0
        dy = torch.randn(1, generator=g).to(dtype).reshape(1, 1, 1, 1).expand(shape)
    else:  # grad_y in yet another layout than x
        dy = make_activation(shape, dtype, "channels_last" if layout == "nchw" else "nchw", seed=5)
    dx_like = _like_glue(x)
    gate = _gate(*shape[:2], dtype if gate_dtype == "same" else torch.float32)
    _write(tmp_path / "gate", gate)
    _write(tmp_path / "dy", dy)
    tiling = run_plane_op(driver, tmp_path, "se_scale_bwd", x, dy, dx_like, dy_strides=dy, y_strides=dx_like,
                          y_numel=dx_like.numel(), gate_strides=f"{gate.stride(0)},{gate.stride(1)}",
                          gate_float=int(gate.dtype == torch.float32), out_float=int(gate.dtype == torch.float32))  # fmt: skip
    dx_ref, dgate_ref = se_reference.scale_backward(dy.double(), x.double(), gate.double())
    _assert_close(_read(tmp_path / "dx", dx_like), dx_ref, "dx")
    dgate = _read(tmp_path / "dgate", torch.empty(shape[:2], dtype=gate.dtype))
    _assert_close(dgate, dgate_ref, f"dgate (chunks {tiling['chunks']})")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_se_shapes_cover_every_path(driver, tmp_path, layout):
    """SE_SHAPES take both the one-chunk path (the tile kernel writes the result) and the split of
    H*W into chunks (a second kernel adds their partial sums), and in channels_last both the
    16-byte vector path (C = 72) and the scalar one (C = 17)."""
    tilings = [run_plane_op(driver, tmp_path, "se_squeeze", make_activation(s, torch.float32, layout)) for s in SE_SHAPES]
    chunks = {int(t["chunks"]) for t in tilings}
    assert 1 in chunks and max(chunks) > 1, chunks
    if layout == "channels_last":
        assert {int(t["vec"]) for t in tilings} == {1, 4}


# (N, C, R): one and several groups of kExciteSamples = 4 samples (a partial last one), C and R
# below, at and above the 32 reduction lanes, R = 1, C over one and two blocks of 256 gate columns
EXCITE_SHAPES = [(1, 17, 4), (3, 72, 18), (5, 3, 1), (9, 40, 10), (2, 1, 1), (6, 130, 33), (2, 300, 20), (5, 520, 8)]


def _excite_inputs(n, c, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pooled = (torch.randn(c, n, generator=g)).to(dtype).t()  # (N, C), not contiguous
    w1 = torch.randn(r, c, generator=g) * (1.5 / math.sqrt(c))
    b1 = torch.randn(r, generator=g) * 0.5
    w2 = torch.randn(c, r, generator=g) * (1.5 / math.sqrt(r))
    b2 = torch.randn(c, generator=g) * 0.5
    return pooled, w1, b1, w2, b2


def _write_excite(tmp: Path, pooled, w1, b1, w2, b2) -> dict:
    _write(tmp / "pooled", pooled)
    for name, t in dict(w1=w1, b1=b1, w2=w2, b2=b2).items():
        _write(tmp / name, t)
    return dict(n=pooled.shape[0], c=pooled.shape[1], r=w1.shape[0], dtype=DTYPE_NAMES[pooled.dtype],
                pooled_strides=f"{pooled.stride(0)},{pooled.stride(1)}")  # fmt: skip


@pytest.mark.parametrize("dtype", SE_DTYPES, ids=str)
@pytest.mark.parametrize("n,c,r", EXCITE_SHAPES, ids=str)
def test_se_excite(driver, tmp_path, n, c, r, dtype):
    inputs = _excite_inputs(n, c, r, dtype)
    run_driver(driver, tmp_path, op="se_excite", **_write_excite(tmp_path, *inputs))
    gate = _read(tmp_path / "gate", torch.empty(n, c, dtype=dtype))
    _assert_close(gate, se_reference.excite(*(t.double() for t in inputs)), "gate")


@pytest.mark.parametrize("grad_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", SE_DTYPES, ids=str)
@pytest.mark.parametrize("n,c,r", EXCITE_SHAPES, ids=str)
def test_se_excite_backward(driver, tmp_path, n, c, r, dtype, grad_dtype):
    inputs = _excite_inputs(n, c, r, dtype)
    dg = torch.randn(n, c, generator=torch.Generator().manual_seed(7)).to(dtype if grad_dtype == "same" else torch.float32)
    _write(tmp_path / "dg", dg)
    run_driver(driver, tmp_path, op="se_excite_bwd", grad_strides=f"{dg.stride(0)},{dg.stride(1)}",
               grad_float=int(dg.dtype == torch.float32), **_write_excite(tmp_path, *inputs))  # fmt: skip
    refs = se_reference.excite_backward(dg.double(), *(t.double() for t in inputs))
    outputs = [_read(tmp_path / "dpooled", torch.empty(n, c, dtype=dtype))] + [
        _read(tmp_path / name, torch.empty(like.shape)) for name, like in zip(["dw1", "db1", "dw2", "db2"], refs[1:])
    ]
    for name, actual, expected in zip(["dpooled", "dw1", "db1", "dw2", "db2"], outputs, refs, strict=True):
        _assert_close(actual, expected, name)
