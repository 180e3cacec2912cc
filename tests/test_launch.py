"""The Triton fast launch path (fused_mbconv/ops/_launch.py) hands the GPU the very launches that
Triton's own path does.

Runs in a subprocess without TRITON_INTERPRET, with bench/standin_driver.py as Triton's driver:
the kernels compile for sm_90 and every launch is recorded instead of run. The first stages of a
fused EfficientNet-B0 (k3 and k5, stride 1 and 2, expansion, SE, residual; bf16, channels_last)
and a squeeze-excite module on its own run a training step (forward, backward), the stages an
inference forward, first through Triton's path only (the fast path off), then twice with the
fast path. Every launch of the last round must have taken the fast path, and match the first
round's: grid, compiled kernel, stream, and every argument (a tensor's dtype, shape, strides
and 16-byte alignment; any other value exactly).
Skipped when triton's NVIDIA backend or ptxas is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_triton_compile import standin_subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def _child() -> None:
    import torch
    from triton.runtime.jit import JITFunction

    sys.path.insert(0, str(ROOT))
    from bench import standin_driver

    standin_driver.install()
    import fused_mbconv
    from fused_mbconv.ops import _launch

    fused_mbconv.set_backend("triton")
    torch.manual_seed(0)
    model = fused_mbconv.efficientnet_b0(num_classes=10)
    stages = model.features[:4].to(torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    # a squeeze-excite on its own (squeeze, excite, scale kernels: in the blocks the depthwise
    # kernel squeezes and the projection scales)
    se = fused_mbconv.nn.SqueezeExcite(24, 6).to(torch.bfloat16)
    h = torch.randn(2, 24, 9, 7, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def one_round() -> list:
        with standin_driver.record() as launches:
            stages.train()
            stages(x.requires_grad_(True)).float().square().sum().backward()
            se(h.requires_grad_(True)).float().sum().backward()
            stages.eval()
            with torch.no_grad():
                stages(x)
        return launches

    def described(launches: list) -> list:
        def arg(a):
            if isinstance(a, torch.Tensor):
                return ["tensor", str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16 == 0]
            return repr(a)

        return [[list(grid), stream, function, repr(meta), [arg(a) for a in args]]
                for grid, stream, function, meta, args in launches]  # fmt: skip

    assert _launch.ENABLED
    _launch.ENABLED = False
    triton_path = described(one_round())
    _launch.ENABLED = True
    one_round()  # records each key's first launch
    slow_calls = []
    run = JITFunction.run
    JITFunction.run = lambda self, *a, **k: slow_calls.append(self) or run(self, *a, **k)
    fast_path = described(one_round())
    JITFunction.run = run
    print(json.dumps({"triton": triton_path, "fast": fast_path, "slow_calls": len(slow_calls)}))


def test_fast_launch_matches_triton_launches():
    env = standin_subprocess_env(FUSED_MBCONV_TRITON_AUTOTUNE="0")  # one config a kernel: fewer compiles
    done = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    triton_path, fast_path = result["triton"], result["fast"]
    assert result["slow_calls"] == 0, "some launches did not take the fast path"
    kernels = {launch[2] for launch in triton_path}
    assert len(kernels) >= 20, f"expected the ops' kernels to launch, got {sorted(kernels)}"
    assert len(fast_path) == len(triton_path)
    for i, (fast, slow) in enumerate(zip(fast_path, triton_path)):
        assert fast == slow, f"launch {i} ({slow[2]}) differs"


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    _child()
