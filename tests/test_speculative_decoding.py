"""speculative_decoding.py: greedy speculative decoding returns the target's greedy tokens (ours
without a draft, and transformers' generate with and without prompt lookup / an assistant model),
the modified rejection sampling leaves the target distribution unchanged (a chi-square test that
fails once the correction is removed), and bench/speculative.py writes its schema.

Every comparison runs both paths inside the test; the tolerances come from tests/tolerances.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import ACCEL_EXAMPLES, assert_refusal, assert_results_header, import_example, run_bench, run_script
from tolerances import SPEC_CHI2_LEVEL, SPEC_CHI2_SAMPLES

SCRIPT = ACCEL_EXAMPLES / "speculative_decoding.py"
sd = import_example(SCRIPT)


def load_pair(folder: Path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, sd.model_from_hf(hf)


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):
    return load_pair(tiny_model)


def repetitive_prompt(vocab: int, seed: int) -> list[int]:
    """Random tokens with a repeated stretch, so prompt lookup finds matches to propose."""
    g = torch.Generator().manual_seed(seed)
    part = torch.randint(1, vocab, (12,), generator=g).tolist()
    return part + torch.randint(1, vocab, (5,), generator=g).tolist() + part[:7]


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculative_equals_plain_decode_and_transformers(tiny, tiny_model: Path, k: int) -> None:
    """fp32, every draft: the same greedy tokens as plain decode through our loop (k = 0) and as
    transformers' generate; the drafts' proposals are partly rejected, so the rollback is exercised."""
    hf, target = tiny
    _, other = load_pair(tiny_model)       # a separate copy plays the "--draft-model"
    drafts = sd.build_drafts(target, ["prompt-lookup", "int4", "early-exit"], None)
    drafts.append(sd.ModelDraft("draft model", other))
    new = 20
    for seed in range(2):
        prompt = repetitive_prompt(target.config.vocab_size, seed)
        for m in (target, other, drafts[1].model):
            m.setup_caches(len(prompt) + new + k + 1)
        plain, _ = sd.speculative_generate(target, None, prompt, new, 0)
        ref = sd.transformers_generate(hf, prompt, new, k)
        assert plain == ref, (plain, ref)
        for d in drafts:
            tokens, stats = sd.speculative_generate(target, d, prompt, new, k)
            print(d.name, k, stats)
            assert tokens == plain, d.name
            assert stats["drafted"] > 0 and stats["verify_steps"] < new
        assert stats["accepted"] == stats["drafted"]   # a copy of the target: every draft accepted


@torch.no_grad()
def test_transformers_assisted_generation_gives_the_same_tokens(tiny, tiny_model: Path) -> None:
    hf, target = tiny
    hf_draft, _ = load_pair(tiny_model)
    prompt = repetitive_prompt(target.config.vocab_size, 3)
    target.setup_caches(len(prompt) + 16 + 5)
    ours, _ = sd.speculative_generate(target, sd.PromptLookupDraft(), prompt, 16, 4)
    assert ours == sd.transformers_generate(hf, prompt, 16, 4, lookup=True)
    assert ours == sd.transformers_generate(hf, prompt, 16, 4, assistant=hf_draft)


@torch.no_grad()
def test_greedy_on_smollm2_equals_transformers(smollm2: Path) -> None:
    """Real weights, the script's rewrite prompt: prompt lookup and the INT4 self-draft return
    transformers' greedy tokens, and so does transformers' own prompt lookup."""
    from transformers import AutoTokenizer

    hf, target = load_pair(smollm2)
    prompt = sd.encode(AutoTokenizer.from_pretrained(smollm2), sd.DEFAULT_PROMPT)
    new, k = 8, 4
    drafts = sd.build_drafts(target, ["prompt-lookup", "int4"], None)
    for m in (target, drafts[1].model):
        m.setup_caches(len(prompt) + new + k + 1)
    ref = sd.transformers_generate(hf, prompt, new, k)
    assert sd.transformers_generate(hf, prompt, new, k, lookup=True) == ref
    for d in drafts:
        tokens, stats = sd.speculative_generate(target, d, prompt, new, k)
        print(d.name, stats)
        assert tokens == ref, d.name


# ---------------------------------------------------------------------------------------------
# Lossless sampling: the emitted tokens follow the target distribution
# ---------------------------------------------------------------------------------------------
V = 5
P = torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.05], [0.10, 0.15, 0.20, 0.25, 0.30],
                  [0.25, 0.05, 0.40, 0.05, 0.25], [0.20, 0.20, 0.20, 0.20, 0.20]])
Q = torch.tensor([[0.05, 0.10, 0.15, 0.30, 0.40], [0.40, 0.30, 0.15, 0.10, 0.05],
                  [0.20, 0.20, 0.20, 0.20, 0.20]])


def first_two_tokens(gen: torch.Generator, deterministic: bool) -> list[int]:
    """Run verify rounds with k = 2 until two tokens are out. The target wants p_j at output
    position j (context-free), the draft proposes from q_j, or always token j % V with a one-hot q
    (a deterministic draft, as prompt lookup). The pair must follow p_0 x p_1."""
    out: list[int] = []
    while len(out) < 2:
        j = len(out)
        if deterministic:
            drafted = [j % V, (j + 1) % V]
            q = torch.nn.functional.one_hot(torch.tensor(drafted), V).float()
        else:
            q = Q[j:j + 2]
            drafted = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
        out += sd.accept_sampled(P[j:j + 3], q, drafted, gen)
    return out[:2]


def chi2_p_value(deterministic: bool) -> float:
    """Pearson's chi-square of the (first, second) token counts against p_0 x p_1 (V^2 cells)."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V, V)
    for _ in range(SPEC_CHI2_SAMPLES):
        a, b = first_two_tokens(gen, deterministic)
        counts[a, b] += 1
    expected = SPEC_CHI2_SAMPLES * torch.outer(P[0], P[1])
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((V * V - 1) / 2)
    p_value = float(torch.special.gammaincc(dof, stat / 2))   # upper tail of chi-square(V^2 - 1)
    print(f"chi-square {stat:.1f} on {V * V - 1} degrees of freedom, p = {p_value:.3g}")
    return p_value


@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled draft", "one-hot draft"])
def test_rejection_sampling_keeps_the_target_distribution(deterministic: bool, monkeypatch) -> None:
    """Passes at the stated level with the correction; fails once the resample after a rejection
    draws from p instead of norm(max(0, p - q)) (the draft's mass is then counted twice)."""
    assert chi2_p_value(deterministic) > SPEC_CHI2_LEVEL
    monkeypatch.setattr(sd, "residual_distribution", lambda p, q: p)
    assert chi2_p_value(deterministic) < SPEC_CHI2_LEVEL


def test_residual_distribution_is_the_missing_mass() -> None:
    p, q = P[0], Q[0]
    r = sd.residual_distribution(p, q)
    accepted = torch.minimum(p, q)            # mass that passes the min(1, p/q) test
    beta = accepted.sum()
    assert torch.allclose(accepted + (1 - beta) * r, p)


@torch.no_grad()
def test_sampling_mode_runs_with_every_draft(tiny) -> None:
    _, target = tiny
    drafts = sd.build_drafts(target, ["prompt-lookup", "int4", "early-exit"], None)
    prompt = repetitive_prompt(target.config.vocab_size, 5)
    for m in (target, drafts[1].model):
        m.setup_caches(len(prompt) + 12 + 4)
    for d in drafts:
        tokens, stats = sd.speculative_generate(target, d, prompt, 12, 3, 0.8, torch.Generator().manual_seed(0))
        assert len(tokens) == 12 and stats["accepted"] <= stats["drafted"]


def test_int4_round_trip_on_the_grid() -> None:
    torch.manual_seed(0)
    W = torch.randn(64, 128) * 0.02
    q, scale, zero = sd.quantize_int4(W, 32)
    err = (W - sd.dequantize_int4(q, scale, zero)).abs()
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert (err <= scale.repeat_interleave(32, dim=1) * 1.0001).all()   # within one step (clamped ends)


# ---------------------------------------------------------------------------------------------
# The script as a reader runs it, its refusals, and the bench's schema
# ---------------------------------------------------------------------------------------------
def test_script_runs_on_the_tiny_model(tiny_model: Path) -> None:
    proc = run_script(SCRIPT, "--model", tiny_model, "--new-tokens", "8", "--k", "3",
                      env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert "prompt lookup" in proc.stdout and "8/8" in proc.stdout


def test_refusals(tmp_path: Path) -> None:
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", check=False), "cannot load model")
    with pytest.raises(SystemExit):
        sd.main(sd.build_parser().parse_args(["--k", "0"]))


def test_bench_cpu_preset_writes_its_schema(tiny_model: Path, tmp_path: Path) -> None:
    result = run_bench("speculative", "cpu", tmp_path, model=tiny_model)
    assert_results_header(result)
    for name in ("grounded", "free"):
        rows = result["workloads"][name]["rows"]
        assert {r["draft"] for r in rows} == {"prompt lookup", "int4 self-draft", "early exit (1 layers)"}
        for r in rows:
            assert 0 <= r["alpha"] <= 1 and r["tokens_per_step"] >= 1 and r["speedup"] > 0
            assert r["same_tokens_as_plain"] <= r["tokens"]
    assert set(result["draft_cost"]["ratio"]) == {r["draft"] for r in rows}
    assert (tmp_path / "speculative-cpu.en.md").exists() and (tmp_path / "speculative-cpu.png").exists()


@pytest.mark.gpu
@torch.no_grad()
def test_graphed_forward_equals_eager_on_the_gpu(tiny_model: Path) -> None:
    """CUDA graphs (the bench's draft and verify steps) give the same greedy tokens as eager."""
    import common

    bench = import_example(common.REPO_ROOT / "bench" / "speculative.py")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).cuda().eval()
    target = sd.model_from_hf(hf)
    prompt = repetitive_prompt(target.config.vocab_size, 0)
    target.setup_caches(len(prompt) + 20 + 5 + bench.MAX_GRAPH_TOKENS)
    eager, _ = sd.speculative_generate(target, sd.PromptLookupDraft(), prompt, 20, 4)
    int4 = sd.ModelDraft("int4", sd.int4_copy(target))
    int4.model.setup_caches(target.max_len)
    eager_int4, _ = sd.speculative_generate(target, int4, prompt, 20, 4)
    bench.use_graphs(target)
    bench.use_graphs(int4.model)
    assert sd.speculative_generate(target, sd.PromptLookupDraft(), prompt, 20, 4)[0] == eager
    assert sd.speculative_generate(target, int4, prompt, 20, 4)[0] == eager_int4
    assert not target.forward.failures and not int4.model.forward.failures


@pytest.mark.gpu
def test_bench_h200_preset_writes_its_schema(tiny_model: Path, tmp_path: Path) -> None:
    result = run_bench("speculative", "h200", tmp_path, model=tiny_model)
    assert_results_header(result)
    assert result["graph_capture_failures"] == 0
    big = result["llama3_8b"]
    assert [r["k"] for r in big["verify_cost"]] == [0, 2] and big["predicted"]
