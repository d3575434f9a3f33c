"""tensor_parallel.py: two gloo processes decode SmolLM2 token for token like one process and like
transformers; the shards add up to the checkpoint; bad inputs end in one line.

The script runs under torchrun (`python -m torch.distributed.run --standalone`, which picks a free
port), as a reader starts it. SmolLM2 has 9 query heads and 3 KV heads: on 2 processes the plan
gives whole KV groups, 6 + 3 query heads (see `plan_heads`); the tiny model (4 heads, 2 KV heads)
covers the other branch, a KV head copied to several ranks (N = 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ACCEL_EXAMPLES, REPO_ROOT, assert_results_header

SCRIPT = ACCEL_EXAMPLES / "tensor_parallel.py"
sys.path.insert(0, str(ACCEL_EXAMPLES))
import fast_decode  # noqa: E402  (the examples folder is not a package; its path is set just above)
import tensor_parallel as tp  # noqa: E402

NEW_TOKENS = 12
PROMPT = "The capital of France is"


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Start the script as a reader does: torchrun, one process per rank, a free port."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(SCRIPT), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def tp_result(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One launch, 2 processes: TP = 1 on rank 0, then TP = 2 over both."""
    out = tmp_path_factory.mktemp("tp") / "tp.json"
    proc = torchrun(2, "--model", smollm2, "--tp-sizes", "1,2", "--new-tokens", NEW_TOKENS,
                    "--prompt", PROMPT, "--json", out)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
                    pytrace=False)
    print(proc.stdout)
    return json.loads(out.read_text())


def test_two_processes_decode_like_one_process_and_like_transformers(tp_result: dict, smollm2: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert_results_header(tp_result)
    assert tp_result["backend"] == "gloo" and tp_result["world_size"] == 2
    runs = {r["tp_size"]: r for r in tp_result["runs"]}
    assert set(runs) == {1, 2} and runs[2]["allreduce"] == "gloo"

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids  # (1, T)
    T = prompt.shape[1]
    with torch.no_grad():
        expected_hf = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0, T:].tolist()
    one_process = fast_decode.generate(fast_decode.model_from_hf(hf), prompt, NEW_TOKENS)[0, T:].tolist()
    two_processes = runs[2]["tokens"][0]
    print(f"transformers: {expected_hf}\none process:  {one_process}\nTP = 1:       {runs[1]['tokens'][0]}\n"
          f"TP = 2:       {two_processes}\ntext: {runs[2]['text']!r}")
    assert two_processes == one_process == runs[1]["tokens"][0]
    assert two_processes[:len(expected_hf)] == expected_hf  # transformers stops at EOS, we do not
    assert len(expected_hf) >= 4 and "Paris" in runs[2]["text"]


def test_each_rank_holds_only_its_share(tp_result: dict, smollm2: Path):
    label = "SmolLM2-135M-Instruct"
    ranks = tp_result["per_rank"][f"{label}, TP=2"]
    assert [(r["query_heads"], r["kv_heads"]) for r in ranks] == [("0-5", "0-1"), ("6-8", "2")]
    assert [r["mlp_channels"] for r in ranks] == ["0-767", "768-1535"]
    assert [r["vocab_rows"] for r in ranks] == ["0-24575", "24576-49151"]
    whole = tp_result["per_rank"][f"{label}, TP=1"][0]
    # every value lives on exactly one rank, except the replicated embedding and norms
    args = fast_decode.ModelArgs(**tp_result["models"][label])
    replicated = sum(n for name, (*_, n) in _sizes(args).items() if tp.shard_bounds(name, args, tp.plan_shards(args, 0, 2)) is None)
    assert sum(r["params"] for r in ranks) == whole["params"] + replicated
    assert whole["params"] == 134_515_008  # SmolLM2-135M, tied LM head counted once
    assert ranks[0]["kv_cache_bytes"] == 2 * ranks[1]["kv_cache_bytes"]  # 2 KV heads against 1
    assert all(r["weight_bytes"] == 4 * r["params"] < whole["weight_bytes"] for r in ranks)  # float32


def _sizes(args: fast_decode.ModelArgs) -> dict[str, tuple[int, ...]]:
    """name -> (*shape, numel) of the full checkpoint."""
    out = {}
    for name, shape in tp.checkpoint_shapes(args).items():
        out[name] = (*shape, int(torch.tensor(shape).prod()))
    return out


def _args_from_config(folder: Path) -> fast_decode.ModelArgs:
    config = json.loads((folder / "config.json").read_text())
    return fast_decode.ModelArgs(dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
                                 n_heads=config["num_attention_heads"], n_kv_heads=config["num_key_value_heads"],
                                 head_dim=config["head_dim"], ffn_dim=config["intermediate_size"],
                                 vocab_size=config["vocab_size"], tie_embeddings=config["tie_word_embeddings"])


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's head layout (9 query heads, 3 KV heads, tied LM head) in odd small sizes: head dim 8
    with width 48 (H x D != C), 37 MLP channels and 101 vocabulary rows, so nothing splits evenly."""
    from safetensors.torch import save_file

    args = fast_decode.ModelArgs(dim=48, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=8, ffn_dim=37,
                                 vocab_size=101, tie_embeddings=True)
    folder = tmp_path_factory.mktemp("odd")
    generator = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(shape, generator=generator) for name, shape in tp.checkpoint_shapes(args).items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 8, "intermediate_size": 37, "vocab_size": 101, "tie_word_embeddings": True}))
    return folder


@pytest.mark.parametrize("model, world", [("odd_checkpoint", 2), ("odd_checkpoint", 3), ("odd_checkpoint", 9),
                                          ("tiny_model", 2), ("tiny_model", 4)])
def test_shards_add_up_to_the_checkpoint(model: str, world: int, request: pytest.FixtureRequest):
    from safetensors.torch import load_file

    folder = request.getfixturevalue(model)
    full = load_file(folder / "model.safetensors")
    args = _args_from_config(folder)
    plans = [tp.plan_shards(args, r, world) for r in range(world)]
    shards = [tp.load_shard(folder, args, plan, torch.float32, torch.device("cpu")) for plan in plans]
    held = 0
    for name, tensor in full.items():
        rebuilt, covered = torch.full_like(tensor, float("nan")), torch.zeros(tensor.shape, dtype=torch.bool)
        for plan, shard in zip(plans, shards):
            bounds = tp.shard_bounds(name, args, plan)
            held += shard[name].numel()
            if bounds is None:
                assert torch.equal(shard[name], tensor), f"{name}: replicated copy differs"
                rebuilt, covered[...] = tensor.clone(), True
                continue
            dim, start, stop = bounds
            index = (slice(None),) * dim + (slice(start, stop),)
            if covered[index].all():  # a KV head copied to several ranks: the copies agree
                assert torch.equal(rebuilt[index], shard[name]), f"{name}: copies differ"
            rebuilt[index] = shard[name]
            covered[index] = True
        assert covered.all() and torch.equal(rebuilt, tensor), f"{name}: shards do not rebuild the tensor"
    if args.tie_embeddings:  # the LM head shards are rows of the embedding table
        vocab_rows = torch.cat([s["lm_head.weight"] for s in shards])
        assert torch.equal(vocab_rows, full["model.embed_tokens.weight"])
    # values held = the checkpoint + the replicated tensors' extra copies + copied KV heads
    total = sum(t.numel() for t in full.values())
    copies = sum(t.numel() for name, t in full.items() if tp.shard_bounds(name, args, plans[0]) is None)
    kv_copies = max(world // args.n_kv_heads, 1)
    kv = sum(t.numel() for name, t in full.items() if name.endswith(("k_proj.weight", "v_proj.weight")))
    expected = total + (world - 1) * copies + (kv_copies - 1) * kv
    print(f"{model} N={world}: held {held:,} values, checkpoint {total:,}")
    assert held == expected == sum(tp.shard_numel(args, p) for p in plans)


def test_random_shards_have_the_loaded_shapes(odd_checkpoint: Path):
    """--random-weights builds each rank's shard directly; it must match what a checkpoint gives."""
    args = _args_from_config(odd_checkpoint)
    for world in (2, 3, 9):
        for rank in range(world):
            plan = tp.plan_shards(args, rank, world)
            loaded = tp.load_shard(odd_checkpoint, args, plan, torch.float32, torch.device("cpu"))
            made = tp.random_shard(args, plan, torch.bfloat16, torch.device("cpu"), seed=0)
            assert {k: v.shape for k, v in made.items()} == {k: v.shape for k, v in loaded.items()}
            assert all(v.dtype == torch.bfloat16 and v.abs().sum() > 0 for v in made.values())


def test_plan_follows_kv_groups_and_refuses_what_it_cannot_split():
    smol = fast_decode.ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                                 vocab_size=49152)
    assert [tuple(map(len, tp.plan_heads(smol, r, 2))) for r in range(2)] == [(6, 2), (3, 1)]
    assert [tp.plan_heads(smol, r, 9) for r in (0, 4, 8)] == [(range(0, 1), range(0, 1)), (range(4, 5), range(1, 2)),
                                                              (range(8, 9), range(2, 3))]
    with pytest.raises(fast_decode.UserError, match=r"4 processes cannot split 9 query heads and 3 KV heads.*"
                                                    r"use --nproc-per-node 1 or 2 or 3 or 9$"):
        tp.plan_heads(smol, 0, 4)
    llama8b = fast_decode.ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                                    vocab_size=128256)
    assert tp.supported_tp_sizes(llama8b) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32]
    assert [len(tp.split_range(10, 3, i)) for i in range(3)] == [4, 3, 3]


def _error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


def test_without_torchrun_it_says_how_to_start(tiny_model: Path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_model)], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)
    print(proc.stderr)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [_error_lines(proc)[0]]
    assert "torchrun --standalone --nproc-per-node" in proc.stderr


@pytest.mark.parametrize("nproc, flags, message", [
    (3, [], "3 processes cannot split 4 query heads and 2 KV heads"),
    (2, ["--device", "cuda"], "--nproc-per-node 2 needs 2 CUDA GPUs"),
])
def test_bad_inputs_end_in_one_line_from_rank_0(tiny_model: Path, nproc: int, flags: list[str], message: str):
    if "cuda" in flags and torch.cuda.device_count() >= nproc:
        pytest.skip("this machine has the GPUs, so the input is not bad here")
    proc = torchrun(nproc, "--model", tiny_model, *flags, timeout=180)
    print(proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.returncode != 0  # torchrun reports its workers' exit code 2 as a failure of its own
    assert len(_error_lines(proc)) == 1 and message in _error_lines(proc)[0]
    assert f'{SCRIPT.name}", line' not in proc.stderr  # no traceback from any rank
    assert "exitcode  : 2" in proc.stderr or "exitcode: 2" in proc.stderr


@pytest.mark.gpu
def test_symm_mem_all_reduce_gives_the_nccl_tokens_on_two_gpus(tiny_model: Path, tmp_path: Path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    out = tmp_path / "tp.json"
    proc = torchrun(2, "--model", tiny_model, "--allreduce", "nccl,symm_mem", "--batch-sizes", "1,4",
                    "--new-tokens", 16, "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert {r["allreduce"] for r in runs} == {"nccl", "symm_mem"}
    assert all(r["same_tokens_as_nccl"] for r in runs if r["allreduce"] == "symm_mem")
