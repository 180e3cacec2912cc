"""python -m fused_mbconv (the README's main job) with small arguments: it reports PASS and exit
code 0 on a correct model, FAIL and exit code 1 on a broken one, and rejects bad arguments."""

from __future__ import annotations

import subprocess
import sys

import torch

import fused_mbconv
from fused_mbconv.__main__ import main

SMALL = ["--variant", "b0", "--resolution", "64", "--batch", "2", "--steps", "1", "--device", "cpu"]


def test_main_reports_pass(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    print(out)
    assert out.startswith("## fused_mbconv: EfficientNet-B0, 64x64, batch 2, float32, cpu")
    for row in ("| eval logits |", "| train logits |", "| gradients (worst of 213", "| running statistics (worst of 98",
                "| inference |", "| training step |", "| activations kept for backward |"):  # fmt: skip
        assert row in out
    assert "FAIL" not in out and out.rstrip().endswith("**PASS**")
    assert "CUDA graph" not in out  # the replayed inference row is a GPU's


def test_tf32_off_turns_tf32_off_inside_and_restores_the_flags(capsys, monkeypatch):
    """--tf32 off: eager's cuDNN convs and the fused GEMMs (which follow the cuDNN flag) run full
    fp32 during the checks and timings; the report says so; torch's flags come back afterwards."""
    import fused_mbconv.__main__ as entry

    seen = []
    check_parity = entry.check_parity

    def recording(*args):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return check_parity(*args)

    monkeypatch.setattr(entry, "check_parity", recording)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert main(SMALL + ["--tf32", "off"]) == 0
        assert seen == [(False, False)]
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("## fused_mbconv: EfficientNet-B0, 64x64, batch 2, float32, cpu") and header.endswith(
        ", NCHW, TF32 off"), header  # fmt: skip


def test_report_sets_the_cuda_graph_row_beside_eager_and_says_why_a_capture_failed():
    """The GPU's extra timing row (inference replayed from a CUDA graph), formatted without a GPU:
    the ratio of the two replays; a failed capture is printed in its cell, not hidden."""
    from fused_mbconv.__main__ import GRAPHED, parse_args, report

    def timings(graph):
        return {"inference": (4.0, None), "training step": (10.0, None), "saved": 100.0, GRAPHED: graph}

    args = parse_args(SMALL)
    both = {"torchvision eager": timings((2.0, None)), "fused": timings((0.5, None))}
    assert "| inference, CUDA graph | 2.00 | 0.50 | 4.00x |" in report(args, torch.device("cpu"), [], both)
    both["fused"][GRAPHED] = "capture failed: RuntimeError: operation not permitted when stream is capturing"
    row = "| inference, CUDA graph | 2.00 | capture failed: RuntimeError: operation not permitted when stream is capturing | - |"
    assert row in report(args, torch.device("cpu"), [], both)


def test_main_fails_on_a_wrong_model(capsys, monkeypatch):
    # an SE gate of ones (the projection then sees the ungated input): no longer EfficientNet
    monkeypatch.setattr(fused_mbconv.nn.functional, "se_gate", lambda pooled, *args: torch.ones_like(pooled))
    assert main(SMALL) == 1
    out = capsys.readouterr().out
    assert "| eval logits |" in out and "| FAIL |" in out and out.rstrip().endswith("**FAIL**")


def test_bad_arguments_exit_with_a_message():
    for args, message in ((["--backend", "cuda"], "--backend: 'cuda' cannot run here"),
                          (["--batch", "0"], "--batch: expected a positive number, got 0")):  # fmt: skip
        command = [sys.executable, "-m", "fused_mbconv", "--device", "cpu", *args]
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr
