"""decode_attention.py: the reference, and the Triton kernel against it.

On the CPU the kernel runs in Triton's interpreter: TRITON_INTERPRET=1 must be set before triton
compiles anything in the process, so test_kernel_runs_in_the_interpreter runs this file's
`interpreted` test in a pytest process of its own with it set; on a GPU (`gpu` marker) it runs
for real, with NaN in the cache slots beyond pos (never read). Tolerances: tests/tolerances.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import (ACCEL_EXAMPLES, assert_refusal, import_example, interpreted,
                      run_interpreted_tests, run_script)
from tolerances import KERNEL_BF16_REL, rel_err

SCRIPT = ACCEL_EXAMPLES / "decode_attention.py"
da = import_example(SCRIPT)


def test_reference_attention_writes_the_cache_and_ignores_later_slots() -> None:
    torch.manual_seed(0)
    B, H, Hkv, D, S, pos = 2, 4, 2, 32, 40, 29
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    qkv = torch.randn(B, (H + 2 * Hkv) * D)
    cos, sin = torch.ones(S, D), torch.zeros(S, D)                  # no rotation
    out, k_all, v_all = da.reference_attention(qkv, cos, sin, pos, k, v, H, Hkv)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, pos + 1:] = float("nan")
    v2[:, :, pos + 1:] = float("nan")
    assert torch.equal(da.reference_attention(qkv, cos, sin, pos, k2, v2, H, Hkv)[0], out)
    q, kn, vn = qkv.view(B, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=1)
    assert torch.equal(k_all[:, :, pos], kn) and torch.equal(v_all[:, :, pos], vn)
    scores = torch.einsum("bhd,bhsd->bhs", q, k_all.repeat_interleave(H // Hkv, 1)[:, :, :pos + 1]) / D**0.5
    ref = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v_all.repeat_interleave(H // Hkv, 1)[:, :, :pos + 1])
    assert rel_err(out, ref.reshape(B, H * D)) < KERNEL_BF16_REL


def test_kernel_runs_in_the_interpreter() -> None:
    run_interpreted_tests(__file__)


@interpreted
def test_interpreted_attention_kernel() -> None:
    torch.manual_seed(0)
    B, H, Hkv, D, S, pos = 2, 6, 2, 32, 80, 70
    k, v = torch.randn(B, Hkv, S, D).bfloat16(), torch.randn(B, Hkv, S, D).bfloat16()
    k[:, :, pos + 1:], v[:, :, pos + 1:] = float("nan"), float("nan")   # never read
    qkv = torch.randn(B, (H + 2 * Hkv) * D).bfloat16()
    cos, sin = da.rope_tables(S, D, torch.device("cpu"))
    ref, ref_k, _ = da.reference_attention(qkv, cos, sin, pos, k, v, H, Hkv)
    out = torch.empty(B, H * D).bfloat16()
    da.decode_attention(qkv, cos, sin, torch.tensor([pos]), k, v, out, H, Hkv)
    assert rel_err(k[:, :, pos], ref_k[:, :, pos]) < KERNEL_BF16_REL
    assert rel_err(out, ref) < KERNEL_BF16_REL


def test_script_prints_the_reference_on_the_cpu(tiny_model: Path) -> None:
    proc = run_script(SCRIPT, "--model", tiny_model, "--seq-lens", "64", "128",
                      env={"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}, timeout=300)
    assert "S 64" in proc.stdout and "S 128" in proc.stdout
    assert "needs a CUDA GPU" in proc.stdout


def test_refusals(tmp_path: Path) -> None:
    assert_refusal(run_script(SCRIPT, "--device", "cuda", check=False), "no CUDA GPU")
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", check=False), "cannot read")
    proc = run_script(SCRIPT, "--seq-lens", "0", check=False)
    assert proc.returncode == 2 and "--seq-lens" in proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("pos", [0, 77, 200])
def test_gpu_decode_attention_vs_reference(pos: int) -> None:
    """RoPE + cache write + attention over slots 0..pos; NaN beyond pos changes nothing."""
    torch.manual_seed(pos)
    B, H, Hkv, D, S, cuda = 3, 8, 2, 64, 256, "cuda"
    k = torch.randn(B, Hkv, S, D, device=cuda).bfloat16()
    v = torch.randn(B, Hkv, S, D, device=cuda).bfloat16()
    k[:, :, pos + 1:], v[:, :, pos + 1:] = float("nan"), float("nan")
    qkv = torch.randn(B, (H + 2 * Hkv) * D, device=cuda).bfloat16()
    cos, sin = da.rope_tables(S, D, torch.device(cuda))
    ref, ref_k, _ = da.reference_attention(qkv, cos, sin, pos, k, v, H, Hkv)
    out = torch.empty(B, H * D, device=cuda, dtype=torch.bfloat16)
    da.decode_attention(qkv, cos, sin, torch.tensor([pos], device=cuda), k, v, out, H, Hkv)
    assert rel_err(k[:, :, pos], ref_k[:, :, pos]) < KERNEL_BF16_REL
    assert rel_err(out, ref) < KERNEL_BF16_REL
