"""decode_kernels.py: the INT4 strip packing, the references, and the Triton kernels against them.

On the CPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set before triton
compiles anything in the process, so test_kernels_run_in_the_interpreter runs this file's
`interpreted` tests in a pytest process of their own with it set; on a GPU (`gpu` marker) they run for
real on odd shapes, every INT4 launch configuration the bench's tuner may pick, and NaN-filled
outputs and cache slots that must be overwritten or never read. Tolerances: tests/tolerances.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import (ACCEL_EXAMPLES, BENCH, assert_refusal, import_example, interpreted,
                      run_interpreted_tests, run_script)
from tolerances import KERNEL_BF16_REL, LOGITS_FP32_REL, RTN_VS_LIBRARY_MISMATCHES, rel_err

SCRIPT = ACCEL_EXAMPLES / "decode_kernels.py"
dk = import_example(SCRIPT)
fd = import_example(ACCEL_EXAMPLES / "fast_decode.py")


@pytest.mark.parametrize("N, K, G", [(1, 8, 8), (37, 48, 16), (5, 192, 64), (13, 384, 128)])
def test_int4_packing_round_trip_and_layout(N: int, K: int, G: int) -> None:
    """Every 4-bit value survives (15 too, whose top field sets the int32 sign bit), and field i
    of word j of a group holds element i·W + j (W = G/8), as the comment draws it."""
    torch.manual_seed(N)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    q[0, -1] = 15
    packed = dk.pack_int4(q, G)
    assert packed.shape == (N, K // 8) and packed.dtype == torch.int32
    lin = dk.Linear("int4", packed, torch.ones(K // G, N), torch.zeros(K // G, N), G)
    assert torch.equal(dk.dequantize(lin), q.float())  # unpacked (scale 1, zero 0)
    W = G // 8
    for g, j in ((0, 0), (K // G - 1, W - 1)):
        word = int(packed[0, g * W + j]) & 0xFFFFFFFF
        assert word == sum(int(q[0, g * G + i * W + j]) << (4 * i) for i in range(8))


def test_reference_dequantization_equals_fast_decode() -> None:
    """The kernels' reference weights from fast_decode's codes (as the bench builds them) equal
    fast_decode's own dequantize_* exactly: the two pages agree on q, scale and zero."""
    torch.manual_seed(0)
    W = torch.randn(48, 256) * 0.02
    q, scale, zero = fd.quantize_int4(W, 64)
    lin4 = dk.Linear("int4", dk.pack_int4(q, 64), scale.t().contiguous(), zero.t().contiguous(), 64)
    q8, s8, z8 = fd.quantize_int8(W)
    mismatches = int((dk.dequantize(lin4) != fd.dequantize_int4(q, scale, zero)).sum())
    mismatches += int((dk.dequantize(dk.Linear("int8", q8, s8)) != fd.dequantize_int8(q8, s8, z8)).sum())
    assert mismatches <= RTN_VS_LIBRARY_MISMATCHES



@pytest.mark.parametrize("symmetric", [True, False])
def test_llm_compressor_checkpoint_repacked_for_the_kernel(tiny_model: Path, tmp_path: Path,
                                                           symmetric: bool) -> None:
    """A W4A16 checkpoint written by llm-compressor (compressed-tensors pack-quantized, group 32,
    symmetric or with zero points), every layer repacked into the kernel's strips: the model
    with our dequantized weights gives the logits of the model transformers loads from the file."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    G, load = 32, lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": G}
    model = load(tiny_model)
    oneshot(model=model, recipe=QuantizationModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]))
    model.save_pretrained(tmp_path, save_compressed=True)
    tensors = load_file(next(tmp_path.glob("*.safetensors")))
    ours = load(tiny_model)
    layers = [k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")]
    assert len(layers) == 2 * 7                                        # q k v o gate up down
    for name in layers:
        lin = dk.from_compressed_tensors(
            {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}, G)
        ours.get_submodule(name).weight.data = dk.dequantize(lin).bfloat16()
    ids = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        library, mine = load(tmp_path)(ids).logits.float(), ours(ids).logits.float()
    assert rel_err(mine, library) < LOGITS_FP32_REL


def test_kernels_run_in_the_interpreter() -> None:
    run_interpreted_tests(__file__)


@pytest.mark.parametrize("fmt, M, rms, glu, res, groups, G, split", [
    ("int4", 1, True, True, False, 3, 64, 1), ("int4", 1, False, False, True, 2, 32, 4),
    ("int4", 1, True, True, False, 1, 64, 4), ("int4", 3, False, False, True, 3, 128, 2),
    ("int8", 1, True, False, True, 64, 0, 1), ("int8", 1, True, True, True, 64, 0, 4),
    ("bf16", 3, True, True, False, 64, 0, 2)])
@interpreted
def test_interpreted_linear_kernels(fmt, M, rms, glu, res, groups, G, split) -> None:
    """fused_linear (odd N = 40, K = 256; fused RMSNorm, SiLU*up, residual) against the reference,
    twice: split-K must leave its workspace and counters at zero for the next call."""

    torch.manual_seed(M)
    N, K = 40, 256
    lin = dk.random_linear(fmt, 2 * N if glu else N, K, G or 64, torch.device("cpu"))
    x = torch.randn(M, K).bfloat16()
    r = torch.randn(M, N).bfloat16() if res else None
    for _ in range(2):
        out = torch.full((M, N), float("nan")).bfloat16()            # every element must be written
        dk.fused_linear(x, lin, out=out, rms=rms, glu=glu, residual=r, eps=1e-5,
                        config=(1 if M == 1 else 16, 16, groups, 4, 2, split))
        assert not out.isnan().any()
        assert rel_err(out, dk.reference_linear(x, lin, rms, glu, r)) < KERNEL_BF16_REL
        assert all(not ws.any() and not cnt.any() for ws, cnt in lin.scratch.values())


@interpreted
def test_interpreted_int4_kernel_on_a_compressed_tensors_layer() -> None:
    """Codes and zero points packed by compressed-tensors itself, repacked, through the kernel."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    torch.manual_seed(0)
    N, K, G = 40, 256, 64
    codes = torch.randint(-8, 8, (N, K), dtype=torch.int8)
    zp = torch.randint(-8, 8, (N, K // G), dtype=torch.int8)
    scale = (torch.rand(N, K // G) * 1e-2).bfloat16()
    lin = dk.from_compressed_tensors({"weight_packed": pack_to_int32(codes, 4), "weight_scale": scale,
                                      "weight_zero_point": pack_to_int32(zp, 4, packed_dim=0),
                                      "weight_shape": torch.tensor([N, K])}, G)
    W = (codes.float() - zp.float().repeat_interleave(G, 1)) * scale.float().repeat_interleave(G, 1)
    assert torch.equal(dk.dequantize(lin), W)
    x = torch.randn(1, K).bfloat16()
    out = dk.fused_linear(x, lin, config=(1, 16, 2, 4, 1, 2))
    assert rel_err(out, x.float() @ W.t()) < KERNEL_BF16_REL


def test_script_prints_the_references_on_the_cpu(tiny_model: Path) -> None:
    proc = run_script(SCRIPT, "--model", tiny_model, "--group-size", "32",
                      env={"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}, timeout=300)
    assert "int4 gate_up" in proc.stdout and "int8 down" in proc.stdout
    assert "need a CUDA GPU" in proc.stdout


def test_refusals(tmp_path: Path) -> None:
    assert_refusal(run_script(SCRIPT, "--device", "cuda", check=False), "no CUDA GPU")
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", check=False), "cannot read")
    proc = run_script(SCRIPT, "--batch", "0", check=False)
    assert proc.returncode == 2 and "--batch" in proc.stderr


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("M", [1, 8, 32])
def test_gpu_linear_kernel_vs_reference(fmt: str, M: int) -> None:
    torch.manual_seed(M)
    N, K, cuda = 1000, 384, torch.device("cuda")   # odd N: the last column block is partial
    for rms, glu, res in ((False, False, False), (True, False, False), (True, True, False), (False, False, True)):
        lin = dk.random_linear(fmt, 2 * N if glu else N, K, 128, cuda)
        x = torch.randn(M, K, device=cuda).bfloat16()
        r = torch.randn(M, N, device=cuda).bfloat16() if res else None
        out = torch.full((M, N), float("nan"), device=cuda, dtype=torch.bfloat16)
        dk.fused_linear(x, lin, out=out, rms=rms, glu=glu, residual=r, eps=1e-5)
        assert not out.isnan().any()
        assert rel_err(out, dk.reference_linear(x, lin, rms, glu, r)) < KERNEL_BF16_REL


@pytest.mark.gpu
@pytest.mark.parametrize("G", [32, 128])
def test_gpu_int4_gemv_every_tuner_config_odd_shape(G: int) -> None:
    """Batch 1, every INT4 configuration bench/fast_decode.py may pick, N = 997 (a partial row
    block), K = 640 (5 groups of 128 or 20 of 32)."""
    bench = import_example(BENCH / "fast_decode.py")
    torch.manual_seed(G)
    N, K, cuda = 997, 640, torch.device("cuda")
    for config in bench.GEMV_CANDIDATES["int4"]:
        for rms, glu, res in ((True, True, False), (False, False, True)):
            lin = dk.random_linear("int4", 2 * N if glu else N, K, G, cuda)
            x = torch.randn(1, K, device=cuda).bfloat16()
            r = torch.randn(1, N, device=cuda).bfloat16() if res else None
            out = torch.full((1, N), float("nan"), device=cuda, dtype=torch.bfloat16)
            dk.fused_linear(x, lin, out=out, rms=rms, glu=glu, residual=r, eps=1e-5, config=(1, *config))
            assert rel_err(out, dk.reference_linear(x, lin, rms, glu, r)) < KERNEL_BF16_REL


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8])
def test_gpu_tinygemm_equals_our_dequantized_reference(M: int) -> None:
    """PyTorch's CUDA int4 kernel on fast_decode's q, scale, zero gives the dequantized reference."""
    torch.manual_seed(M)
    W = torch.randn(1000, 384, device="cuda") * 0.02
    x = torch.randn(M, 384, device="cuda").bfloat16()
    ref = x.float() @ fd.dequantize_int4(*fd.quantize_int4(W, 128)).t()
    assert rel_err(fd.Int4Linear(W, 128)(x), ref) < KERNEL_BF16_REL
