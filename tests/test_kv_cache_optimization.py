"""kv_cache_optimization.py: cached greedy decode equals full recomputation, token for token.

Invariances checked: the hand-written loop with and without the KV cache, and transformers'
`generate(use_cache=True/False)`, give the same greedy tokens on the real small model; the
hand-written forward equals the model's own logits (prefill in one piece or in two chunks); the
KV calculator gives the exact bytes for SmolLM2 and Llama-3-8B. Bad inputs end in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import import_example, ACCEL_EXAMPLES, assert_results_header, run_script, run_script_json

SCRIPT = ACCEL_EXAMPLES / "kv_cache_optimization.py"


@pytest.fixture(scope="module")
def kv():
    """The script imported as a module (as the vLLM example of the same folder does)."""
    return import_example(SCRIPT)


def test_kv_bytes_per_token_exact(kv, smollm2: Path) -> None:
    from transformers import AutoConfig, LlamaConfig

    # SmolLM2: 2 x 30 layers x 3 KV heads x 64 x 2 bytes (bf16); vLLM's CPU backend agrees.
    assert kv.kv_bytes_per_token(AutoConfig.from_pretrained(smollm2), 2) == 23_040
    assert kv.kv_bytes_per_token((30, 3, 64), 2) == 23_040
    llama3_8b = LlamaConfig(**kv.RANDOM_CONFIGS["llama-3-8b"])
    assert kv.kv_bytes_per_token(llama3_8b, 2) == 131_072
    assert kv.kv_bytes_per_token(llama3_8b.to_dict(), 2) == 131_072
    assert kv.kv_bytes_per_token(llama3_8b, kv.DTYPE_BYTES["fp8"]) == 65_536
    # A config without num_key_value_heads is plain multi-head attention.
    mha = {"num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096}
    assert kv.kv_bytes_per_token(mha, 2) == 524_288
    assert kv.kv_cache_bytes((32, 8, 128), tokens=8192, batch=4) == 131_072 * 8192 * 4

    rows = {r["model"]: r for r in kv.memory_table(kv.KNOWN_SHAPES)}
    assert rows["Llama-3-8B"]["overstatement"] == 4
    assert rows["Llama-3-70B"]["overstatement"] == 8
    assert rows["Qwen2.5-7B"]["bytes_per_token"] == 57_344
    assert rows["Llama-2-7B"]["overstatement"] == 1  # no GQA, no error
    assert rows["Llama-3-8B"]["gib"]["B=1, T=131072"] == 16.0


def test_forward_matches_model(kv, tiny_model: Path) -> None:
    """The hand-written forward equals the model's logits: prefill at once, or chunked with a cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits[:, -1]  # (1, vocab)
    whole, cache = kv.forward(model, ids, start=0, cache=[])
    first, part = kv.forward(model, ids[:, :9], start=0, cache=[])
    chunked, cache2 = kv.forward(model, ids[:, 9:], start=9, cache=part)  # offset causal mask
    uncached, _ = kv.forward(model, ids, start=0, cache=None)
    for name, got in (("prefill", whole), ("chunked", chunked), ("no cache", uncached)):
        diff = (got - expected).abs()
        print(f"{name}: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
        assert diff.max() < 1e-4, name
    assert len(cache) == model.config.num_hidden_layers
    K, V = cache[0]
    assert K.shape == (1, model.config.num_key_value_heads, 23, model.config.head_dim)  # (B, Hkv, T, D)
    for layer in range(len(cache)):  # the chunked cache holds the same rows (up to matmul rounding)
        for got, want in zip(cache2[layer], cache[layer]):
            assert torch.allclose(got, want, atol=1e-5)


def test_identical_tokens_small_model(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    result = run_script_json(SCRIPT, out, "--model", smollm2, "--max-new-tokens", "16", "--threads", "1",
                             "--quiet", "--device", "cpu")
    assert_results_header(result)
    loop = result["loop"]
    print("with cache   ", loop["tokens_cache"])
    print("without cache", loop["tokens_no_cache"])
    assert loop["new_tokens"] == 16 and loop["tokens_identical"]
    assert loop["tokens_cache"][:2] == [7042, 30]  # " Paris."
    for key in ("use_cache=True", "use_cache=False"):
        assert result["generate"][key]["same_as_loop"], key
    assert result["kv_bytes_per_token_this_model"] == 46_080  # float32: 2 x 30 x 3 x 64 x 4
    assert len(loop["step_ms_cache"]) == len(loop["step_ms_no_cache"]) == 16
    table = out.with_suffix(".md").read_text()
    assert "| positions |" in table and "same tokens as our loop" in table
    assert "131,072 B" in out.with_name("kv-kv-memory.md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000
    assert json.loads(out.read_text())["kv_memory"]["dtype"] == "bfloat16"


def test_random_weights_path(kv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU run's path (random weights from a config, sweep only) on a shrunken config."""
    small = dict(kv.RANDOM_CONFIGS["llama-3-8b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    monkeypatch.setitem(kv.RANDOM_CONFIGS, "llama-3-8b", small)
    args = kv.build_parser().parse_args(["--random-weights", "llama-3-8b", "--device", "cpu", "--max-new-tokens", "0",
                                         "--lengths", "4,16", "--repeats", "1", "--quiet",
                                         "--json", str(tmp_path / "r.json")])
    result = kv.main(args)
    assert "loop" not in result and [r["context"] for r in result["sweep"]] == [4, 16]
    assert all(r["ms_per_token_cache"] > 0 and r["ms_per_token_no_cache"] > 0 for r in result["sweep"])
    assert result["model"].startswith("llama-3-8b shape")
    assert "| context n |" in (tmp_path / "r.md").read_text()


def test_bad_model_path_one_line() -> None:
    """As a reader meets it: a subprocess, one line on stderr, exit code 2, no traceback."""
    proc = run_script(SCRIPT, "--model", "/no/such/folder", "--quiet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: no model folder at '/no/such/folder'; pass a local transformers folder or a hub id with --model"]


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "error: --device cuda but no CUDA GPU is visible"),
    (["--repeats", "0"], "error: --max-new-tokens and --warmup must be >= 0, --repeats >= 1"),
    (["--lengths", "8,x"], "expected comma-separated integers"),
])
def test_bad_input_in_process(kv, args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    """The same checks in-process (cheaper than a subprocess each): exit code 2 and one line."""
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        kv.main(kv.build_parser().parse_args([*args, "--quiet"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
