"""flash_attention.py: tiled attention with the online softmax equals standard attention.

FlashAttention's rule (tests/tolerances.py, agrees_like_reference): against a float64 reference,
the tiled loop's error may be at most twice the error of the written-out formula in the same
dtype; in float32 it must also stay under FLASH_FP32_ATOL. Shapes are deliberately odd (T = 113,
D = 59, tiles that do not divide T, Tq != Tk, one query), causal and not, and scores far beyond
exp's range. PyTorch's SDPA backends are held to the same rule. bench/flash_attention.py writes its
documented schema; the GPU backends and the h200 preset are tested on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import (ACCEL_EXAMPLES, BENCH, assert_refusal, assert_results_header, import_example,
                      run_bench, run_script)
from tolerances import FLASH_FP32_ATOL, agrees_like_reference

SCRIPT = ACCEL_EXAMPLES / "flash_attention.py"
fa = import_example(SCRIPT)


def qkv(B: int, H: int, Tq: int, Tk: int, D: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, H, Tk, D, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B, H, Tq, Tk, D, block", [
    (1, 1, 16, 16, 8, 4),
    (2, 3, 113, 113, 59, 32),   # odd T and D, tiles that do not divide T
    (2, 2, 77, 130, 32, 16),    # more keys than queries
    (1, 2, 1, 300, 64, 128),    # one query (a decode step)
    (1, 2, 50, 50, 16, 256),    # one tile larger than the sequence
])
def test_tiled_equals_standard_and_float64(B: int, H: int, Tq: int, Tk: int, D: int, block: int,
                                           causal: bool) -> None:
    q, k, v = qkv(B, H, Tq, Tk, D, seed=Tq * 1000 + D)
    ref = fa.standard_attention(q, k, v, causal)  # float64
    q32, k32, v32 = q.float(), k.float(), v.float()
    tiled = fa.tiled_attention(q32, k32, v32, causal, block_q=block, block_k=block)
    plain = fa.standard_attention(q32, k32, v32, causal)
    assert tiled.dtype == torch.float32 and torch.isfinite(tiled).all()
    assert agrees_like_reference(tiled, plain, ref)
    assert (tiled - plain).abs().max() <= FLASH_FP32_ATOL
    assert (tiled.double() - ref).abs().max() <= FLASH_FP32_ATOL


def test_scores_beyond_exps_range() -> None:
    """Scores of several thousand: exp(S) overflows float32, the running max keeps every exp <= 1."""
    q, k, v = qkv(1, 2, 70, 70, 16, seed=1)
    q = q * 200.0
    ref = fa.standard_attention(q, k, v, causal=True)
    q32, k32, v32 = q.float(), k.float(), v.float()
    assert torch.isinf(torch.exp(q32 @ k32.transpose(-2, -1) / 4)).any()  # the naive exp overflows
    out = fa.tiled_attention(q32, k32, v32, causal=True, block_q=16, block_k=16)
    assert torch.isfinite(out).all()
    assert agrees_like_reference(out, fa.standard_attention(q32, k32, v32, causal=True), ref)


def test_bfloat16_inputs_follow_the_rule() -> None:
    """bf16 Q, K, V (state kept in float32): the output stays bf16, within twice the bf16 formula's error."""
    q, k, v = qkv(1, 3, 113, 113, 59, seed=2)
    ref = fa.standard_attention(q, k, v, causal=True)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = fa.tiled_attention(qb, kb, vb, causal=True, block_q=32, block_k=32)
    assert out.dtype == torch.bfloat16
    assert agrees_like_reference(out, fa.standard_attention(qb, kb, vb, causal=True), ref)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_sdpa_backends_follow_the_rule(causal: bool) -> None:
    """The library's kernels (SDPA flash and math on the CPU) against the same float64 reference."""
    q, k, v = qkv(2, 3, 113, 113, 59, seed=3)
    ref = fa.standard_attention(q, k, v, causal)
    q32, k32, v32 = q.float(), k.float(), v.float()
    plain = fa.standard_attention(q32, k32, v32, causal)
    for name in ("sdpa-flash", "sdpa-math"):
        out = fa.sdpa_with(fa.SDPA_BACKENDS[name])(q32, k32, v32, causal)
        print(name)
        assert agrees_like_reference(out, plain, ref), name


def test_script_runs_on_the_tiny_model(tiny_model: Path) -> None:
    proc = run_script(SCRIPT, "--model", tiny_model, "--seq-len", "113", "--block", "32", "--device", "cpu")
    lines = proc.stdout.splitlines()
    assert any("H=4" in line and "D=16" in line for line in lines)  # the tiny model's shape
    for name in ("standard (ours)", "tiled (ours)", "sdpa-flash", "sdpa-math"):
        assert any(line.startswith(name) for line in lines), name


def test_refusals(tmp_path: Path) -> None:
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", check=False), "cannot read the config")
    if not torch.cuda.is_available():
        assert_refusal(run_script(SCRIPT, "--device", "cuda", check=False), "no CUDA GPU")
    for flag in ("--seq-len", "--block"):
        with pytest.raises(SystemExit) as exit_info:
            fa.main(fa.build_parser().parse_args([flag, "0"]))
        assert exit_info.value.code == 2, flag


def check_bench_schema(result: dict, out: Path, preset: str) -> None:
    assert_results_header(result)
    assert result["quick"] and result["preset"] == preset
    for key in ("device", "setup", "check", "benchmark"):
        assert key in result, key
    assert {"batch", "heads", "head_dim", "dtype", "causal", "block", "lengths"} <= set(result["setup"])
    assert any(r["shape"][2] == 113 and r["shape"][4] == 59 and r["causal"] for r in result["check"])
    for r in result["check"]:
        assert {"tiled_max_err", "standard_fp32_max_err"} <= set(r)
    ran = [r for r in result["benchmark"] if r["status"] == "ok"]
    assert ran and all({"impl", "T", "ms", "ms_spread", "tflops"} <= set(r) for r in ran)
    assert all(r["status"] in ("ok", "OOM", "unsupported") for r in result["benchmark"])
    for suffix in (".md", ".en.md", ".png", "-memory.png"):
        assert (out / f"flash_attention-{preset}{suffix}").stat().st_size > 100, suffix


def test_bench_cpu_preset_writes_its_schema(tmp_path: Path) -> None:
    result = run_bench("flash_attention", "cpu", tmp_path)
    check_bench_schema(result, tmp_path, "cpu")
    impls = {r["impl"] for r in result["benchmark"]}
    assert impls == {"sdpa-math", "sdpa-flash", "standard (ours)", "tiled (ours)"}
    last = {r["impl"]: r for r in result["benchmark"] if r["T"] == result["setup"]["lengths"][-1]}
    assert last["tiled (ours)"]["score_matrix_gib_computed"] < last["standard (ours)"]["score_matrix_gib_computed"]


def test_bench_h200_path_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The h200 preset's code with --quick's shapes, in-process with the device switched to the
    CPU: the GPU-only backends are recorded as unsupported, the rest run."""
    bench = import_example(BENCH / "flash_attention.py")
    monkeypatch.setitem(bench.PRESETS["h200"], "device", "cpu")
    monkeypatch.setattr(sys, "argv", [str(BENCH / "flash_attention.py"), "--preset", "h200", "--quick"])
    bench.main(argparse.Namespace(preset="h200", quick=True, model=None, out=tmp_path))
    result = json.loads((tmp_path / "flash_attention-h200.json").read_text())
    check_bench_schema(result, tmp_path, "h200")
    status = {r["impl"]: r["status"] for r in result["benchmark"]}
    assert status["sdpa-cudnn"] == "unsupported" and status["tiled (ours)"] == "ok"


def test_bench_refuses_an_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_script(BENCH / "flash_attention.py", "--preset", "cpu", "--quick", "--out", blocker / "sub",
                      check=False)
    assert_refusal(proc, "cannot write")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_backends_follow_the_rule(dtype: torch.dtype) -> None:
    """Every SDPA backend that runs, and the tiled loop, within twice the error of the written-out
    formula in the same dtype (against float64); flash and math must run."""
    q, k, v = qkv(2, 4, 1000, 1000, 64, seed=4)
    ref = fa.standard_attention(q, k, v, causal=True).cuda()
    qd, kd, vd = (x.cuda().to(dtype) for x in (q, k, v))
    plain = fa.standard_attention(qd, kd, vd, causal=True)
    ran = set()
    for name, fn in fa.implementations(128, torch.device("cuda")).items():
        try:
            out = fn(qd, kd, vd, True)
        except RuntimeError:
            continue
        ran.add(name)
        print(name)
        assert agrees_like_reference(out, plain, ref), name
    assert {"sdpa-flash", "sdpa-math", "tiled (ours)"} <= ran


@pytest.mark.gpu
def test_gpu_bench_h200_preset_quick(tmp_path: Path) -> None:
    result = run_bench("flash_attention", "h200", tmp_path)
    check_bench_schema(result, tmp_path, "h200")
    assert result["accuracy"] and all("peak_extra_gib" in r for r in result["benchmark"] if r["status"] == "ok")
