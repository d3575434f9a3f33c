"""gguf_blocks.py: our Q8_0, Q4_0 and Q4_1 encoders against gguf-py's, byte for byte.

The outside reference: `gguf.quants.quantize` (llama.cpp's own Python encoder, bit-exact with
ggml-quants.c), compared on real SmolLM2 rows and on Gaussian rows with an all-zero block and
exact ties.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import QUANT_EXAMPLES, assert_refusal, import_example, run_script
from tolerances import GGUF_BYTES_EQUAL

SCRIPT = QUANT_EXAMPLES / "gguf_blocks.py"
gb = import_example(SCRIPT)


@pytest.fixture(scope="module")
def smollm2_rows(smollm2) -> dict[str, torch.Tensor]:
    """64 rows of each linear weight of the first, a middle and the last layer."""
    weights = gb.decoder_linear_weights(str(smollm2))
    picked = {name: W[:64] for name, W in weights.items()
              if any(f".layers.{i}." in name for i in (0, 14, 29))}
    assert len(picked) == 3 * 7
    return picked


def differing_bytes(ours: np.ndarray, theirs: np.ndarray) -> int:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    count = int((ours != theirs).sum())
    print(f"{count} of {ours.size} bytes differ")
    return count


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_encoders_equal_gguf_py_bit_for_bit(smollm2_rows, qtype):
    import gguf

    torch.manual_seed(0)
    gaussian = torch.randn(16, 256)
    gaussian[0, :32] = 0.0  # an all-zero block
    gaussian[1, :32] = torch.linspace(-1, 1, 32)  # a block with exact ties
    quantize, dequantize = gb.SCRATCH[qtype]
    ggml_type = gguf.GGMLQuantizationType[qtype]
    for name, W in {**smollm2_rows, "gaussian": gaussian}.items():
        ours = gb.to_block_bytes(qtype, *quantize(W))
        theirs = gguf.quants.quantize(W.numpy(), ggml_type)
        print(name, qtype)
        assert differing_bytes(ours, theirs) <= GGUF_BYTES_EQUAL
        # and our dequantize reads the library's blocks back to the same values
        assert np.array_equal(dequantize(*quantize(W)).numpy(), gguf.quants.dequantize(theirs, ggml_type))


def test_a_wrong_q4_0_scale_is_caught(smollm2_rows, monkeypatch):
    """The comparison above fails for an encoder with d = m / -7 instead of m / -8."""
    import gguf

    W = next(iter(smollm2_rows.values()))
    true_div = torch.Tensor.__truediv__

    def minus_seven(self, other):  # the encoder's `m / -8`, made `m / -7`
        return true_div(self, -7) if isinstance(other, (int, float)) and other == -8 else true_div(self, other)

    monkeypatch.setattr(torch.Tensor, "__truediv__", minus_seven)
    wrong = gb.to_block_bytes("Q4_0", *gb.quantize_q4_0(W))
    monkeypatch.undo()
    assert differing_bytes(wrong, gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q4_0)) > 0


def test_script_table_on_tiny_model(tiny_model):
    proc = run_script(SCRIPT, "--model", tiny_model, "--quiet")
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert set(lines) == {"Q8_0", "Q4_0", "Q4_1"}
    for qtype, cells in lines.items():
        same, tensors = map(int, cells[2].split("/"))
        assert same == tensors > 0, f"{qtype}: our bytes differ from gguf-py's"
        assert float(cells[3]) == 0.0, "both decoders give the same weights"
    errors = {qtype: float(cells[4]) for qtype, cells in lines.items()}
    assert 0 < errors["Q8_0"] < errors["Q4_1"] < errors["Q4_0"], errors


def test_refusals(tmp_path):
    proc = run_script(SCRIPT, "--model", tmp_path / "nowhere", "--quiet", check=False)
    assert_refusal(proc, "cannot load model")
