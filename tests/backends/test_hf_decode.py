"""hf_decode.sample against transformers `generate` on the same model: greedy decoding must
pick the same tokens (so logits, KV cache, positions, prefix sharing and rows leaving the batch
are right), and sampled first tokens must follow the grammar-masked softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sublearn.backends import hf_decode
from sublearn.backends.base import ChatRequest, SamplingParams
from sublearn.backends.hf import HFBackend
from sublearn.backends.hf_decode import VocabSubset, prefill_groups, sample
from sublearn.domains.numbers import answer_grammar, make_prompts


@pytest.fixture(scope="module")
def backend(tiny_model: str) -> HFBackend:
    return HFBackend(tiny_model, dtype="float32", batch_size=8)


def _prompts(be: HFBackend, n: int, system: str | None = "You love owls.") -> list[list[int]]:
    reqs = [ChatRequest(p, system) for p in make_prompts(n, 3)]
    return [be.tok(t, add_special_tokens=False).input_ids for t in be.prompt_texts(reqs)]


def _hf_greedy(be: HFBackend, prompts: list[list[int]], new: int,
               grammar: object = None) -> list[list[int]]:
    from xgrammar.contrib.hf import LogitsProcessor

    eos = be.tok.convert_tokens_to_ids(be.tok.eos_token)
    out = []
    for p in prompts:  # one at a time: no padding on the reference side
        procs = [LogitsProcessor(grammar)] if grammar is not None else []
        gen = be.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=new,
                                eos_token_id=eos, pad_token_id=be.tok.pad_token_id,
                                logits_processor=procs)
        row = gen[0, len(p):].tolist()
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


@pytest.mark.parametrize("constrained", [True, False])
def test_greedy_matches_transformers_generate(backend: HFBackend, constrained: bool) -> None:
    prompts = _prompts(backend, 6)
    grammar = backend._grammar(answer_grammar()) if constrained else None
    eos = backend.tok.convert_tokens_to_ids(backend.tok.eos_token)
    ours = sample(backend.model, prompts, pad_id=backend.tok.pad_token_id, stop_ids={eos},
                  max_new_tokens=24, temperature=0.0, top_p=1.0, seed=0,
                  compiled_grammar=grammar, subset=VocabSubset() if constrained else None)
    ref = _hf_greedy(backend, prompts, 24, grammar)
    assert [r.ids for r in ours] == ref
    lengths = {len(r.ids) for r in ours}
    if constrained:  # the check is only worth something if rows left the batch early
        assert len(lengths) > 1


def test_sampled_first_token_follows_masked_softmax(backend: HFBackend) -> None:
    """2000 draws of the first answer token vs the exact grammar-masked full-vocab softmax."""
    from scipy.stats import chisquare

    prompt = _prompts(backend, 1)[0]
    grammar = backend._grammar(answer_grammar())
    eos = backend.tok.convert_tokens_to_ids(backend.tok.eos_token)
    rows = sample(backend.model, [prompt] * 2000, pad_id=0, stop_ids={eos}, max_new_tokens=1,
                  temperature=0.7, top_p=1.0, seed=1, compiled_grammar=grammar,
                  subset=VocabSubset())
    drawn = np.bincount([r.ids[0] for r in rows], minlength=backend.model.config.vocab_size)

    import xgrammar as xgr

    with torch.no_grad():
        logits = backend.model(torch.tensor([prompt])).logits[0, -1] / 0.7
    mask = xgr.allocate_token_bitmask(1, logits.shape[0])
    xgr.GrammarMatcher(grammar).fill_next_token_bitmask(mask)
    xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), mask)
    p = torch.softmax(logits, -1).numpy()
    support = p > 0
    assert drawn[~support].sum() == 0
    assert chisquare(drawn[support], p[support] / p[support].sum() * 2000).pvalue > 1e-3


def test_grammar_shares_match_a_full_forward(backend: HFBackend) -> None:
    """The share of the next-token distribution the grammar allowed, recorded while sampling,
    equals the one recomputed from one full-vocabulary forward over prompt + answer: at the
    first step, and the smallest over the later steps (the stop step included)."""
    import xgrammar as xgr

    prompts = _prompts(backend, 4)
    grammar = backend._grammar(answer_grammar())
    eos = backend.tok.convert_tokens_to_ids(backend.tok.eos_token)
    rows = sample(backend.model, prompts, pad_id=backend.tok.pad_token_id, stop_ids={eos},
                  max_new_tokens=12, temperature=0.8, top_p=1.0, seed=3,
                  compiled_grammar=grammar, subset=VocabSubset())
    for p, r in zip(prompts, rows, strict=True):
        answer = r.ids + [eos] * r.stopped
        with torch.no_grad():
            logits = backend.model(torch.tensor([p + answer])).logits[0, len(p) - 1:] / 0.8
        matcher, mask = xgr.GrammarMatcher(grammar), xgr.allocate_token_bitmask(1, logits.shape[1])
        shares = []
        for i, t in enumerate(answer):
            matcher.fill_next_token_bitmask(mask)
            allowed = logits[i].clone().unsqueeze(0)
            xgr.apply_token_bitmask_inplace(allowed, mask)
            shares.append(float((allowed.logsumexp(-1) - logits[i].logsumexp(-1)).exp()))
            matcher.accept_token(t)
        assert r.first_share == pytest.approx(shares[0], rel=1e-4, abs=1e-9)
        assert r.min_share == pytest.approx(min(shares[1:], default=1.0), rel=1e-4, abs=1e-9)
    assert any(r.min_share < 1 for r in rows)  # some step restricted the tiny model


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_allowed_share_is_bit_identical_to_the_float_then_double_formula(
        temperature: float, dtype: torch.dtype) -> None:
    """`_allowed_share` skips the fp32 copy and, at T = 1, the division: recorded shares (and so
    the teacher data's bytes) must not move by one bit from the formula it replaced."""
    gen = torch.Generator().manual_seed(0)
    full = (torch.randn(16, 4096, generator=gen) * 4).to(dtype)
    allowed = full[:, :300].float().masked_fill(torch.rand(16, 300, generator=gen) < 0.5,
                                                -torch.inf)
    t = temperature or 1.0
    lse = torch.logsumexp(allowed.double() / t, -1)
    before = (lse - torch.logsumexp(full.float().double() / t, -1)).exp().clamp(max=1.0)
    assert hf_decode._allowed_share(allowed, full, temperature) == before.tolist()


def test_backend_grammar_answers_and_seed(backend: HFBackend) -> None:
    reqs = [ChatRequest(p, "You love owls.") for p in make_prompts(10, 0)]
    params = SamplingParams(max_new_tokens=30, grammar=answer_grammar())
    a = backend.generate(reqs, params, seed=5)
    b = backend.generate(reqs, params, seed=5)
    assert [c.text for c in a] == [c.text for c in b]
    assert all(c.n_tokens <= 30 for c in a)
    assert {c.finish_reason for c in a} <= {"stop", "length"}


def test_prefill_groups_pad_to_similar_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_decode, "PREFILL_TOKENS", 100)
    lengths = [50, 10, 40, 12, 45, 11]
    # longest first; a group closes once its rows padded to its longest reach 100 tokens
    assert prefill_groups(lengths) == [[0, 4], [2, 3, 5], [1]]
    assert sorted(sum(prefill_groups(lengths), [])) == list(range(6))
    monkeypatch.setattr(hf_decode, "PREFILL_TOKENS", 1024)
    assert prefill_groups(lengths) == [[0, 4, 2, 3, 5, 1]]


def _context_model() -> torch.nn.Module:
    """A random Llama whose greedy tokens depend on the whole context (the shared tiny model's
    small weights make it repeat its last token, whatever its cache holds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
                      max_position_embeddings=128, attn_implementation="sdpa",
                      bos_token_id=None, eos_token_id=None)  # no end: every row runs 8 steps
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("shared", [[], list(range(200, 212))])
@pytest.mark.parametrize("prefill_tokens", [1, 20, 1024])
def test_grouped_prefill_matches_generate(shared: list[int], prefill_tokens: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts of different lengths prefilled in groups (1: a row each; 20: rows of about the
    same length together; 1024: one group), with and without a shared prefix, decode the
    tokens `generate` picks for each prompt alone."""
    monkeypatch.setattr(hf_decode, "PREFILL_TOKENS", prefill_tokens)
    model = _context_model()
    rng = np.random.default_rng(0)
    prompts = [shared + rng.integers(3, 300, size=k).tolist() for k in (9, 2, 5, 8, 3, 6)]
    ours = sample(model, prompts, pad_id=0, stop_ids=set(), max_new_tokens=8, temperature=0.0,
                  top_p=1.0, seed=0)
    ref = [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8,
                          pad_token_id=0)[0, len(p):].tolist()
           for p in prompts]
    assert [r.ids for r in ours] == ref
    assert len({tuple(r) for r in ref}) == len(ref)  # the model does read its context


def test_subset_grows_to_cover_new_tokens() -> None:
    sub = VocabSubset()
    m = np.zeros((2, 4), dtype=np.int32)
    m[0, 0] = 0b101  # tokens 0 and 2
    assert sub.cover(m) and sub.ids.tolist() == [0, 2]
    assert not sub.cover(m)
    m[1, 3] = 1 << 4  # token 100
    assert sub.cover(m) and sub.ids.tolist() == [0, 2, 100]
    assert sub.allowed(m).tolist() == [[True, True, False], [False, False, True]]


@pytest.mark.parametrize("window", [64, 6])
def test_greedy_matches_generate_with_sliding_window_layers(window: int) -> None:
    """Gemma 3 mixes sliding-window and full layers; a window shorter than prompt + answer
    must not let padding shift it (such batches are sampled row by row)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=400, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, sliding_window=window, max_position_embeddings=256,
                           layer_types=["sliding_attention"] * 3 + ["full_attention"])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    shared = list(range(5, 14))  # a 9-token shared prefix, then suffixes of different lengths
    prompts = [shared + [20, 21, 22], shared + [30], shared + [40, 41, 42, 43, 44, 45]]
    ours = sample(model, prompts, pad_id=0, stop_ids={1}, max_new_tokens=12, temperature=0.0,
                  top_p=1.0, seed=0)
    ref = [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12,
                          eos_token_id=1, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert [r.ids for r in ours] == ref
