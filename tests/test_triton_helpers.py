"""The helpers that the Triton backends share (fused_mbconv.ops._triton)."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import BACKENDS, DEVICE

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="needs a GPU or TRITON_INTERPRET=1")

if "triton" in BACKENDS:
    import triton
    import triton.language as tl

    from fused_mbconv.ops import _triton

    @triton.jit
    def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, _triton.cast(x, y_ptr.dtype.element_ty), mask=offs < n)

    @triton.jit
    def _chan_merge_kernel(a_ptr, b_ptr, out_ptr):
        n, mean, m2 = _triton.chan_merge(
            tl.load(a_ptr),
            tl.load(a_ptr + 1),
            tl.load(a_ptr + 2),
            tl.load(b_ptr),
            tl.load(b_ptr + 1),
            tl.load(b_ptr + 2),
        )
        tl.store(out_ptr, n)
        tl.store(out_ptr + 1, mean)
        tl.store(out_ptr + 2, m2)

    @triton.jit
    def _round_to_tf32_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, _triton.round_to_tf32(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cast_rounds_to_nearest_even(dtype):
    one = 1.0
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 0.0}[dtype]
    # ties (1 + ulp/2 goes down to the even 1, 1 + 3 ulp/2 up to the even 1 + 2 ulp), then
    # values off the ties, of both signs
    x = torch.tensor([one + ulp / 2, one + 1.5 * ulp, -(one + 1.5 * ulp), one + 0.7 * ulp], dtype=torch.float32)
    x = torch.cat([x, torch.randn(60, generator=torch.Generator().manual_seed(0))]).to(DEVICE)
    y = torch.empty_like(x, dtype=dtype)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=64)
    torch.testing.assert_close(y, x.to(dtype), rtol=0, atol=0)


def _tf32_nearest(v: float) -> float:
    """The TF32 value nearest ``v`` (11 significant bits, so a quantum of 2^(e - 11) for
    |v| = m 2^e with m in [0.5, 1), and fp32's subnormal quantum shifted by 13 bits below),
    ties away from zero, in float64 arithmetic; infinities and NaN as they are."""
    import math

    if not math.isfinite(v) or v == 0:
        return v
    _, e = math.frexp(abs(v))
    quantum = 2.0 ** (max(e, -125) - 11)
    return math.copysign(math.floor(abs(v) / quantum + 0.5) * quantum, v)


def test_round_to_tf32_is_round_to_nearest_ties_away():
    # what cuDNN feeds its TF32 tensor cores (cvt.rna); tl.dot's own "tf32" truncates instead
    unit = 2.0**-10  # one TF32 unit at 1
    ties = [1 + unit / 2, 1 + 1.5 * unit, -(1 + unit / 2), 3 * (1 + unit / 2)]
    near_ties = [1 + unit / 2 - 2.0**-23, 1 + unit / 2 + 2.0**-23, -(1 + unit / 2 - 2.0**-23)]
    edges = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4028234663852886e38, -3.4e38,
             1.17549435e-38, 1e-40, -3e-42, 2.0**-149]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(200, generator=gen) * torch.logspace(-30, 30, 200)
    x = torch.cat([torch.tensor(ties + near_ties + edges), spread]).float()
    y = torch.empty_like(x, device=DEVICE)
    _round_to_tf32_kernel[(1,)](x.to(DEVICE), y, x.numel(), BLOCK=256)
    want = torch.tensor([_tf32_nearest(v) for v in x.double().tolist()], dtype=torch.float64).float()
    assert want[0] == 1 + unit and want[2] == -(1 + unit) and want[4] == 1 and want[12] == float("inf")
    torch.testing.assert_close(y.cpu(), want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(y.cpu()), torch.signbit(want))  # -0.0 stays -0.0


def test_chan_merge_matches_the_pooled_moments():
    gen = torch.Generator().manual_seed(0)
    a, b = (
        1000 + torch.randn(7, generator=gen, dtype=torch.float64),
        1000 + torch.randn(5, generator=gen, dtype=torch.float64),
    )

    def moments(v):
        return [float(v.numel()), v.mean().item(), ((v - v.mean()) ** 2).sum().item()]

    out = torch.empty(3, dtype=torch.float32, device=DEVICE)
    args = (torch.tensor(moments(t), dtype=torch.float32, device=DEVICE) for t in (a, b))
    _chan_merge_kernel[(1,)](*args, out)
    torch.testing.assert_close(
        out.cpu(), torch.tensor(moments(torch.cat([a, b])), dtype=torch.float32), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("rows, channels", [(1, 24), (37, 24), (37, 200), (3000, 24)])
def test_combine_stats_matches_fp64_pooled_moments(rows, channels):
    """Partials of groups of positions (some empty) with a mean large against the spread, merged
    against the same fp32 partials merged in fp64. 37 rows take the two-level merge interpreted,
    3000 on the GPU (24 first-level programs of 128 rows at 24 channels)."""
    gen = torch.Generator().manual_seed(rows)
    counts = torch.randint(0, 5, (rows,), generator=gen).double()
    counts[0] = 3.0  # never all empty
    mean_part = (1000 + torch.randn(rows, channels, generator=gen, dtype=torch.float64)).float()
    m2_part = (counts[:, None] * torch.rand(rows, channels, generator=gen, dtype=torch.float64)).float()
    mean_part[counts == 0], m2_part[counts == 0] = 0.0, 0.0
    gamma, beta = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
    # the pooled moments of the fp32 partials, exactly: sum n_r mean_r / n; sum M2_r + n_r (mean_r - mean)^2
    n = counts.sum()
    mean = (counts[:, None] * mean_part.double()).sum(0) / n
    var = (m2_part.double() + counts[:, None] * (mean_part.double() - mean) ** 2).sum(0) / n
    scale = gamma.double() / (var + 1e-3).sqrt()

    # one spare row past ``rows``, of nonsense, that the merge must leave out
    pad = lambda t, v: torch.cat([t, torch.full_like(t[:1], v)]).to(DEVICE)  # noqa: E731
    got = _triton.combine_stats(pad(counts.float(), 7.0), pad(mean_part, -5.0), pad(m2_part, 9.0), rows=rows,
                                gamma=gamma.to(DEVICE), beta=beta.to(DEVICE), eps=1e-3)  # fmt: skip
    # fp32 holds a mean of 1000 to ~6e-5, which is 6e-5 of the spread: the merge's deviations
    # from the running mean, and so the variance, scale and shift, are good to ~1e-4 relative
    want = (mean, var, scale, beta.double() - mean * scale)
    for g, w, tol in zip(got, want, (1e-6, 1e-4, 1e-4, 1e-4)):
        torch.testing.assert_close(g.cpu().double(), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_rows(dtype):
    # integer values: every order of the fp32 sum is exact, so only the final rounding differs
    part = torch.randint(-300, 300, (70, 300), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    out = torch.empty((3, 100), dtype=dtype, device=DEVICE)
    assert _triton.sum_rows(part, out) is out
    torch.testing.assert_close(out.flatten(), part.sum(0).to(dtype), rtol=0, atol=0)


def test_sum_rows_rejects_mismatched_tensors():
    part = torch.zeros((4, 8), device=DEVICE)
    with pytest.raises(ValueError, match="part"):
        _triton.sum_rows(part.t(), torch.empty(4, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        _triton.sum_rows(part, torch.empty(7, device=DEVICE))


def test_host_cdiv_and_next_power_of_2_are_plain_ints():
    """Grid functions get meta-parameters as tl.constexpr at times: the host helpers must give
    plain ints (a constexpr left in a launch grid made the interpreter launch too few programs)."""
    for a in range(1, 70):
        for b in (1, 3, 16, 32):
            for got in (_triton.cdiv(a, b), _triton.cdiv(tl.constexpr(a), tl.constexpr(b))):
                assert type(got) is int and got == -(-a // b)
        got = _triton.next_power_of_2(tl.constexpr(a))
        assert type(got) is int and got >= a and got & (got - 1) == 0 and (got == 1 or got // 2 < a)


def test_prune_wider_than_keeps_fitting_blocks_else_the_narrowest():
    configs = [triton.Config({"BLOCK": b}) for b in (64, 16, 128)]
    prune = _triton.prune_wider_than("n", "BLOCK", at_least=16)
    assert [c.kwargs["BLOCK"] for c in prune(configs, {"n": 40})] == [64, 16]  # 40 -> 64
    assert [c.kwargs["BLOCK"] for c in prune(configs, {"n": 3})] == [16]  # at_least
    narrow = _triton.prune_wider_than("n", "BLOCK", at_least=1)
    assert [c.kwargs["BLOCK"] for c in narrow(configs[::2], {"n": 3})] == [64]  # none fits: the narrowest


def test_multiprocessors_of_a_cpu_device():
    assert _triton.multiprocessors(torch.device("cpu")) == 1


def _autotuned(monkeypatch, prune=None):
    """An autotuned kernel as built on a GPU (whatever this machine is), and its configs."""
    monkeypatch.setattr(_triton, "INTERPRETED", False)
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]

    @_triton.autotune(configs, key=["n"], prune=prune)
    @triton.jit
    def kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass

    kernel.nargs = {"x_ptr": None, "n": 100}
    return kernel, configs


@pytest.mark.parametrize("enabled", [True, False])
def test_autotune_prunes_then_keeps_the_first_when_disabled(monkeypatch, enabled):
    """Pruned, the candidates of a call are compiled side by side before they are timed (with
    tuning off, the one config left compiles at its launch)."""
    monkeypatch.setenv("FUSED_MBCONV_TRITON_AUTOTUNE", "1" if enabled else "0")
    compiled = []
    monkeypatch.setattr(_triton, "precompile", lambda fn, configs, named_args, kwargs: compiled.append(configs))
    kernel, configs = _autotuned(monkeypatch, prune=lambda configs, named_args, **kwargs: configs[1:])
    assert kernel.prune_configs({"BLOCK_FLAG": 1}) == (configs[1:] if enabled else configs[1:2])
    assert compiled == ([configs[1:]] if enabled else [])


@pytest.mark.parametrize("enabled", [True, False])
def test_autotune_times_configs_only_when_there_is_a_choice(monkeypatch, enabled):
    """The autotuner's timer runs the kernel only when the prune left more than one config:
    triton 3.6 times a lone config too (3.8 does not), which ran each new shape's kernels for
    ~25 ms more on a first call, with tuning off as well (seen with the stand-in driver and
    triton 3.6: every first launch twice)."""
    monkeypatch.setenv("FUSED_MBCONV_TRITON_AUTOTUNE", "1" if enabled else "0")
    monkeypatch.setattr(_triton, "precompile", lambda *args: None)
    timed = []
    monkeypatch.setattr(_triton, "_quick_bench", lambda fn, quantiles=None: timed.append(fn) or [1.0, 1.0, 1.0])
    ran = []
    for keep in (1, 2):
        kernel, configs = _autotuned(monkeypatch, prune=lambda configs, named_args, keep=keep, **kwargs: configs[:keep])
        kernel.prune_configs({})
        assert kernel.do_bench(lambda keep=keep: ran.append(keep), quantiles=(0.5, 0.2, 0.8)) is not None
    # only a tuned call with two configs left reaches the timer (which would run the kernel)
    assert len(timed) == (1 if enabled else 0) and not ran


def test_precompile_compiles_the_configs_side_by_side(monkeypatch):
    """precompile hands each config's compilation to triton's asynchronous compile mode with a
    thread pool: the compilations overlap, each finished kernel is kept (finalized), and a config
    whose compilation fails is skipped here (its launch will raise as usual). The launch's own
    grid and warmup flags, which triton 3.6's autotuner passes to the prune hook, stay out of
    the warmup call (it takes its own grid: a second one raised TypeError on the GPU)."""
    import threading
    import time

    from triton.runtime._async_compile import active_mode

    finalized, started, lock = {}, [], threading.Lock()

    class FakeJit:
        def warmup(self, *args, grid, **kwargs):  # triton's KernelInterface.warmup signature
            assert "warmup" not in kwargs and kwargs["n"] == 3
            block = kwargs["BLOCK"]

            def compile_one():
                with lock:
                    started.append(time.perf_counter())
                time.sleep(0.5)
                if block == 64:
                    raise RuntimeError("ptxas says no")
                return f"kernel{block}"

            active_mode.get().submit(block, compile_one, lambda kernel, b=block: finalized.__setitem__(b, kernel))

    monkeypatch.setenv("FUSED_MBCONV_COMPILE_THREADS", "3")
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    _triton.precompile(FakeJit(), configs, {"x_ptr": None}, {"n": 3, "grid": (7,), "warmup": False})
    assert finalized == {16: "kernel16", 32: "kernel32"}
    assert len(started) == 3 and max(started) - min(started) < 0.4  # all began before any could end
    assert active_mode.get() is None


def test_autotune_without_prune(monkeypatch):
    monkeypatch.setenv("FUSED_MBCONV_TRITON_AUTOTUNE", "0")
    kernel, configs = _autotuned(monkeypatch)
    assert kernel.prune_configs({}) == configs[:1]


def test_autotune_under_the_interpreter_runs_one_config(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRETED", True)
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32)]
    only = triton.Config({"BLOCK": 8})

    def kernel(x_ptr, BLOCK: tl.constexpr):
        pass

    assert _triton.autotune(configs, key=[])(triton.jit(kernel)).configs == configs[:1]
    assert _triton.autotune(configs, key=[], interpreted=only)(triton.jit(kernel)).configs == [only]


def test_triton_entry():
    calls = []
    reference = types.SimpleNamespace(op=lambda *args: calls.append("reference"))

    def op(x, maybe=None):
        calls.append("kernel")

    fp64_only = _triton.triton_entry(reference)(op)
    with_empty = _triton.triton_entry(reference, empty=True)(op)
    fp32, fp64, empty = torch.ones(2), torch.ones(2, dtype=torch.float64), torch.ones(0)
    for fn, args, expected in [
        (fp64_only, (fp32, None), "kernel"),
        (fp64_only, (fp32, fp64), "reference"),
        (fp64_only, (empty,), "kernel"),
        (with_empty, (fp32, empty), "reference"),
        (with_empty, (fp32, fp32), "kernel"),
    ]:
        fn(*args)
        assert calls.pop() == expected, (fn, args)
    assert fp64_only.__name__ == "op"


def test_vector_alignment_claims_only_what_holds(monkeypatch):
    """16 bytes of channels per row where every tensor has unit channel stride and 16-byte rows;
    otherwise 1 (no claim), whatever else is passed."""
    def cl(c, dtype=torch.bfloat16, h=3, w=5):
        return torch.empty(2, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)

    assert _triton.vector_alignment(cl(40)) == 8  # bf16: 8 channels a vector
    assert _triton.vector_alignment(cl(20, torch.float32)) == 4
    assert _triton.vector_alignment(cl(40), cl(20, torch.float32), None) == 4  # the widest dtype's vector
    assert _triton.vector_alignment(cl(20)) == 1  # 20 bf16 channels: rows of 40 bytes
    assert _triton.vector_alignment(torch.empty(2, 40, 3, 5, dtype=torch.bfloat16)) == 1  # NCHW: channels strided
    assert _triton.vector_alignment(cl(48)[:, 8:]) == 8  # a channel slice 16 bytes in keeps the claim
    assert _triton.vector_alignment(cl(48)[:, 4:44]) == 1  # 8 bytes in: misaligned
    assert _triton.vector_alignment(torch.empty(40, 240, dtype=torch.bfloat16)) == 8  # a GEMM weight (O, C)
    assert _triton.vector_alignment(None) == 1
    monkeypatch.setenv("FUSED_MBCONV_VECTOR_HINTS", "0")  # the bisection switch: no claim at all
    assert _triton.vector_alignment(cl(40)) == 1
