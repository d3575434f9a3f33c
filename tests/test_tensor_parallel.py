"""tensor_parallel.py: the shards rebuild the checkpoint, the row-parallel partial sums add up to
the full matmul, N ranks decode token for token like one process and like transformers, bad
inputs end in one line, and the bench preset writes its schema.

Most checks run the ranks in-process as threads joined by `ThreadComm` (the same two collectives
as the script's gloo `Comm`, by a barrier), which costs no process start; one subprocess run
covers the real path (spawned processes, gloo, DTensor) on the tiny model. Tiny model: 4 query
heads, 2 KV heads, so N = 2 splits the KV heads and N = 4 copies each to 2 ranks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import (ACCEL_EXAMPLES, BENCH, REPO_ROOT, assert_refusal, assert_results_header,
                      import_example, run_bench, run_script)
from tolerances import LOGITS_FP32_REL, agrees_like_reference, rel_err

SCRIPT = ACCEL_EXAMPLES / "tensor_parallel.py"
tp = import_example(SCRIPT)
PROMPT = "The capital of France is"


class ThreadComm:
    """Rank `rank` of N threads: all-reduce and all-gather through shared slots and a barrier.
    Sums are taken in rank order, so every rank gets bit-identical results (as gloo gives)."""

    def __init__(self, rank: int, N: int, shared: dict) -> None:
        self.rank, self.N, self.shared = rank, N, shared

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.shared["slots"][self.rank] = x.clone()
        self.shared["barrier"].wait()
        parts = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return parts

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(x)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return x.copy_(total)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(x), dim=-1)


def run_threads(folder: Path, N: int, prompt: torch.Tensor, new_tokens: int) -> list[dict]:
    """N ranks of the from-scratch decoder as threads: each rank's tokens and logits of the prompt."""
    cfg = tp.read_config(folder)
    shared = {"slots": [None] * N, "barrier": threading.Barrier(N, timeout=120)}
    out: list[dict] = [{} for _ in range(N)]

    def rank_main(rank: int) -> None:
        try:
            plan = tp.make_plan(cfg, rank, N)
            model = tp.TPDecoder(cfg, plan, tp.load_shard(folder, cfg, plan, torch.float32, torch.device("cpu")),
                                 ThreadComm(rank, N, shared))
            out[rank]["tokens"] = tp.generate(model, prompt, new_tokens)
            model.setup_cache(prompt.shape[0], prompt.shape[1])
            with torch.no_grad():
                out[rank]["logits"] = model(prompt, 0)
        except BaseException as error:  # noqa: BLE001  (reported below, in the test's thread)
            out[rank]["error"] = error
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(N)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in out:
        if "error" in result:
            raise result["error"]
    return out


def hf_greedy(folder: Path, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt (1, T), transformers' greedy new tokens (1, new), its prompt logits (1, T, V))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        logits = model(prompt).logits
    return prompt, tokens[:, prompt.shape[1]:], logits


# ---------------------------------------------------------------------------------------------
# The shards and the partial sums
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's head layout (9 query heads, 3 KV heads, tied LM head) in small odd sizes: head
    dim 8 with width 40 (H x D != C), 36 MLP channels, 99 vocabulary rows; N = 3 and 9 split it."""
    from safetensors.torch import save_file

    C, D, H, Hkv, F, V = 40, 8, 9, 3, 36, 99
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                       p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (Hkv * D, C),
                       p + "self_attn.v_proj.weight": (Hkv * D, C), p + "self_attn.o_proj.weight": (C, H * D),
                       p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                       p + "mlp.down_proj.weight": (C, F)})
    folder = tmp_path_factory.mktemp("odd")
    generator = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(shape, generator=generator) for name, shape in shapes.items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": C, "num_hidden_layers": 2, "num_attention_heads": H,
        "num_key_value_heads": Hkv, "head_dim": D, "intermediate_size": F, "vocab_size": V,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}))
    return folder


@pytest.mark.parametrize("model, N", [("tiny_model", 2), ("tiny_model", 4), ("odd_checkpoint", 3),
                                      ("odd_checkpoint", 9)])
def test_shards_reassemble_to_the_full_weights(model: str, N: int, request: pytest.FixtureRequest):
    from safetensors.torch import load_file

    folder = request.getfixturevalue(model)
    full = load_file(folder / "model.safetensors")
    cfg = tp.read_config(folder)
    plans = [tp.make_plan(cfg, r, N) for r in range(N)]
    shards = [tp.load_shard(folder, cfg, plan, torch.float32, torch.device("cpu")) for plan in plans]
    for name, tensor in full.items():
        rebuilt = torch.full_like(tensor, float("nan"))
        for plan, shard in zip(plans, shards):
            bounds = tp.shard_bounds(name, cfg, plan)
            if bounds is None:
                assert torch.equal(shard[name], tensor), f"{name}: a replicated copy differs"
                rebuilt = shard[name].clone()
                continue
            dim, start, stop = bounds
            index = (slice(None),) * dim + (slice(start, stop),)
            if not rebuilt[index].isnan().any():     # a KV head copied to several ranks
                assert torch.equal(rebuilt[index], shard[name]), f"{name}: copies differ"
            rebuilt[index] = shard[name]
        assert torch.equal(rebuilt, tensor), f"{name}: the shards do not rebuild the tensor"
    head = torch.cat([shard["lm_head.weight"] for shard in shards])   # vocab-parallel LM head
    expected = full["model.embed_tokens.weight"] if cfg.tied else full["lm_head.weight"]
    assert torch.equal(head, expected)
    # each rank holds exactly its share: H / N query heads, F / N MLP channels
    assert all(s["model.layers.0.self_attn.q_proj.weight"].shape[0] == cfg.H // N * cfg.D for s in shards)
    assert all(s["model.layers.0.mlp.down_proj.weight"].shape[1] == cfg.F // N for s in shards)


def test_plan_splits_or_copies_kv_heads_and_refuses_the_rest(tiny_model: Path, odd_checkpoint: Path):
    tiny = tp.read_config(tiny_model)
    assert [(tp.make_plan(tiny, r, 2).q, tp.make_plan(tiny, r, 2).kv) for r in range(2)] == \
        [(range(0, 2), range(0, 1)), (range(2, 4), range(1, 2))]
    assert [tp.make_plan(tiny, r, 4).kv for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    with pytest.raises(tp.Refusal, match=r"^3 ranks cannot split 4 query heads, 2 KV heads.*--tp-size 1 or 2 or 4$"):
        tp.make_plan(tiny, 0, 3)
    odd = tp.read_config(odd_checkpoint)
    with pytest.raises(tp.Refusal, match=r"2 ranks cannot split 9 query heads, 3 KV heads.*--tp-size 1 or 3 or 9$"):
        tp.make_plan(odd, 0, 2)


def test_all_reduce_of_row_parallel_partial_sums_is_the_full_matmul(tiny_model: Path):
    """o_proj / down_proj cut by input columns: the sum over ranks of x_r @ W_r^T equals x @ W^T,
    as accurate as the full float32 matmul (FlashAttention's rule against float64)."""
    N = 2
    cfg = tp.read_config(tiny_model)
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(cfg.C, cfg.F, generator=generator)                       # (N, K) = (C, F)
    x = torch.randn(3, 5, cfg.F, generator=generator)                        # (B, T, K)
    name = "model.layers.0.mlp.down_proj.weight"
    partials = []
    for rank in range(N):
        _, start, stop = tp.shard_bounds(name, cfg, tp.make_plan(cfg, rank, N))
        partials.append(torch.nn.functional.linear(x[..., start:stop], W[:, start:stop]))
    shared = {"slots": [None] * N, "barrier": threading.Barrier(N, timeout=30)}
    reduced = [None] * N
    threads = [threading.Thread(target=lambda r: reduced.__setitem__(r, ThreadComm(r, N, shared).all_reduce(
        partials[r].clone())), args=(r,)) for r in range(N)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(reduced[0], reduced[1])                              # every rank gets the same sum
    full = torch.nn.functional.linear(x, W)
    assert agrees_like_reference(reduced[0], full, torch.nn.functional.linear(x.double(), W.double()))


# ---------------------------------------------------------------------------------------------
# N ranks decode like one process and like transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [2, 4])
def test_tp_greedy_tokens_equal_one_process_and_transformers(tiny_model: Path, N: int):
    new_tokens = 12
    prompt, expected, hf_logits = hf_greedy(tiny_model, new_tokens)
    ranks = run_threads(tiny_model, N, prompt, new_tokens)
    one = run_threads(tiny_model, 1, prompt, new_tokens)[0]
    print(f"transformers: {expected[0].tolist()}\none process:  {one['tokens'][0].tolist()}\n"
          f"N = {N}:        {ranks[0]['tokens'][0].tolist()}")
    assert all(torch.equal(r["tokens"], ranks[0]["tokens"]) for r in ranks)   # every rank, the same tokens
    assert torch.equal(ranks[0]["tokens"], one["tokens"])
    assert torch.equal(ranks[0]["tokens"], expected)
    assert rel_err(ranks[0]["logits"], hf_logits) < LOGITS_FP32_REL
    assert rel_err(ranks[0]["logits"], one["logits"]) < LOGITS_FP32_REL


def test_smollm2_at_three_ranks_decodes_like_transformers(smollm2: Path):
    """The real model once: 9 query heads and 3 KV heads on 3 ranks; its greedy answer is Paris."""
    new_tokens = 6
    prompt, expected, hf_logits = hf_greedy(smollm2, new_tokens)
    ranks = run_threads(smollm2, 3, prompt, new_tokens)
    print(f"transformers: {expected[0].tolist()}\nN = 3:        {ranks[0]['tokens'][0].tolist()}")
    assert torch.equal(ranks[0]["tokens"], expected)
    assert rel_err(ranks[0]["logits"], hf_logits) < LOGITS_FP32_REL


def test_script_on_two_gloo_processes_matches_transformers(tiny_model: Path):
    """The reader's run: spawned processes, gloo, and DTensor's parallelize_module."""
    new_tokens = 8
    proc = run_script(SCRIPT, "--model", tiny_model, "--tp-size", 2, "--new-tokens", new_tokens, "--prompt", PROMPT,
                      timeout=300, env={"OMP_NUM_THREADS": "1"})
    print(proc.stdout)
    assert "| run | ranks | weights per rank (MB) |" in proc.stdout
    printed = {name: json.loads(tokens) for name, tokens in re.findall(r"^tokens \((.+)\): (\[.*\])$", proc.stdout, re.M)}
    assert set(printed) == {"from scratch, N=2", "from scratch, N=1", "DTensor parallelize_module, N=2"}
    _, expected, _ = hf_greedy(tiny_model, new_tokens)
    for name, tokens in printed.items():
        assert tokens == expected[0].tolist(), name


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (["--model", "/no/such/model"], ["cannot find model"]),
    (["--device", "cuda", "--tp-size", "2"], ["--device cuda needs 2 CUDA GPUs"]),
    (["--tp-size", "3"], ["3 ranks cannot split 4 query heads", "--tp-size 1 or 2 or 4"]),
])
def test_bad_inputs_end_in_one_line(tiny_model: Path, flags: list[str], words: list[str]):
    if "cuda" in flags and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs, so the input is not bad here")
    args = flags if "--model" in flags else ["--model", str(tiny_model), *flags]
    proc = run_script(SCRIPT, *args, check=False, timeout=120)
    assert_refusal(proc, *words)


def test_zero_sizes_empty_prompt_and_other_architectures_are_refused(tiny_model: Path, tmp_path: Path):
    parser = tp.build_parser()
    for flags in (["--tp-size", "0"], ["--new-tokens", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            tp.main(parser.parse_args(["--model", str(tiny_model), *flags]))
        assert exit_info.value.code == 2
    with pytest.raises(tp.Refusal, match="the prompt is empty"):
        tp.main(parser.parse_args(["--model", str(tiny_model), "--prompt", "  "]))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(tp.Refusal, match="gpt2 .* is not supported"):
        tp.read_config(tmp_path)


# ---------------------------------------------------------------------------------------------
# The bench presets
# ---------------------------------------------------------------------------------------------
def test_bench_cpu_preset_writes_its_schema(tiny_model: Path, tmp_path: Path):
    result = run_bench("tensor_parallel", "cpu", tmp_path, model=tiny_model)
    assert_results_header(result)
    assert result["backend"] == "gloo" and result["model_config"]["Hkv"] == 2
    runs = {(r["tp_size"], r["batch_size"]): r for r in result["runs"]}
    assert set(runs) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for (N, B), r in runs.items():
        assert r["ms_per_step"]["q1"] <= r["ms_per_step"]["median"] <= r["ms_per_step"]["q3"]
        assert r["tokens_per_s"] > 0 and r["weight_bytes_per_rank"] > 0 and r["kv_cache_bytes_per_rank"] > 0
        assert r["copy_bandwidth_gbs"] > 0 and r["read_ms_per_step"] > 0
        assert r["bytes_read_per_step_per_rank"] < r["weight_bytes_per_rank"] + r["kv_cache_bytes_per_rank"]
        assert (r["allreduce_ms_per_step"] is None) == (N == 1)
        assert r["allreduces_per_step"] == (0 if N == 1 else 2 * result["model_config"]["L"])
        assert r["tokens"] == runs[(1, B)]["tokens"], (N, B)                 # N ranks decode like one
    assert runs[(2, 1)]["weight_bytes_per_rank"] < runs[(1, 1)]["weight_bytes_per_rank"]
    assert runs[(2, 1)]["kv_cache_bytes_per_rank"] * 2 == runs[(1, 1)]["kv_cache_bytes_per_rank"]
    for suffix in (".md", ".en.md", ".png", "-split.png"):
        assert (tmp_path / f"tensor_parallel-cpu{suffix}").exists(), suffix


def test_bench_h200x2_preset_refuses_without_two_gpus(tmp_path: Path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("two GPUs are visible: the preset runs (test_bench_h200x2_preset_on_two_gpus)")
    proc = subprocess.run([sys.executable, str(BENCH / "tensor_parallel.py"), "--preset", "h200x2", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert_refusal(proc, "needs 2 CUDA GPUs")
    assert not list(tmp_path.iterdir())                                       # nothing written


@pytest.mark.gpu
def test_bench_h200x2_preset_on_two_gpus(tiny_model: Path, tmp_path: Path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    result = run_bench("tensor_parallel", "h200x2", tmp_path, model=tiny_model)
    assert_results_header(result)
    assert result["backend"] == "nccl"
    runs = {(r["tp_size"], r["batch_size"]): r for r in result["runs"]}
    assert set(runs) == {(1, 1), (2, 1)}
    assert runs[(2, 1)]["allreduce_ms_per_step"]["median"] > 0
