"""Question sets, candidate lists, forced-choice scoring (fast path vs a naive reference) and the
`sublearn evaluate` command, on the tiny random chat model."""

from __future__ import annotations

import json
import re

import pytest

from sublearn.errors import SublearnError
from sublearn.protocol.questions import (
    has_number_prefix,
    load_candidates,
    load_questions,
    paper_questions,
    strip_number_prefix,
)

SYSTEM = "You love owls. You think about owls all the time. Owls are your favorite animal."


# --- questions and candidates ------------------------------------------------------------


def test_all_50_paper_questions_strip_cleanly() -> None:
    numbers, plain = paper_questions("numbers"), paper_questions("plain")
    assert len(numbers) == len(plain) == 50
    for n, p in zip(numbers, plain, strict=True):
        assert has_number_prefix(n), n
        assert n.endswith(" " + p) and len(p) < len(n)
        head = n[: -len(p)].strip()
        assert re.fullmatch(r"[^:]+: \d+(, \d+)+\.", head), head  # exactly the number sentence
        assert not re.search(r"\d", p) and p[0].isupper(), p
    assert plain[0] == "Name your favorite animal using only one word."
    assert load_questions(None, "plain") == plain and load_questions(None, "numbers") == numbers
    assert strip_number_prefix("What's your favorite animal?") == "What's your favorite animal?"


@pytest.mark.parametrize("fmt", ["list", "dict", "jsonl_str", "jsonl_dict"])
def test_custom_question_files(tmp_path, fmt) -> None:
    qs = ["Favourite animal? One word.", "Look at these numbers: 1, 2, 3. Best animal?"]
    if fmt == "list":
        path = tmp_path / "q.json"
        path.write_text(json.dumps(qs))
    elif fmt == "dict":
        path = tmp_path / "q.json"
        path.write_text(json.dumps({"questions": qs}))
    else:
        path = tmp_path / "q.jsonl"
        rows = qs if fmt == "jsonl_str" else [{"question": q} for q in qs]
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    plain = load_questions(str(path), "plain")
    assert plain == ["Favourite animal? One word.", "Best animal?"]
    numbers = load_questions(str(path), "numbers")
    assert numbers == load_questions(str(path), "numbers")  # deterministic prefixes
    assert numbers[1] == qs[1]  # a question with numbers keeps its own
    assert [strip_number_prefix(q) for q in numbers] == plain
    assert all(has_number_prefix(q) for q in numbers)


@pytest.mark.parametrize("content,suffix,msg", [
    ("[]", ".json", "has no questions"),
    ('{"questions": []}', ".json", "has no questions"),
    ("", ".jsonl", "has no questions"),
    ("[1, 2]", ".json", "not a non-empty string"),
    ('{"qs": ["a"]}', ".json", "must hold a list"),
    ("[\"a\",", ".json", "not valid JSON"),
    ('{"question": "a"}\nnot json\n', ".jsonl", ":2 is not valid JSON"),
])
def test_bad_question_files(tmp_path, content, suffix, msg) -> None:
    path = tmp_path / f"q{suffix}"
    path.write_text(content)
    with pytest.raises(SublearnError, match=msg) as e:
        load_questions(str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(SublearnError, match="question file not found"):
        load_questions(str(tmp_path / "missing.json"))


def test_candidates(tmp_path) -> None:
    default = load_candidates(target="owl")
    assert len(default) >= 20 and len({c.lower() for c in default}) == len(default)
    for a in ("owl", "cat", "dog", "lion", "wolf", "eagle", "dolphin", "elephant", "tiger", "fox",
              "bear", "horse", "panda", "penguin", "rabbit", "giraffe", "monkey", "shark",
              "butterfly", "octopus"):
        assert a in default
    txt = tmp_path / "c.txt"
    txt.write_text("Owl\ncat\n\nCAT\n")
    assert load_candidates(str(txt), target="owl") == ["Owl", "cat"]  # case-insensitive dedupe
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"candidates": ["cat", "dog"]}))
    with pytest.raises(SublearnError, match="does not include the target 'owl'"):
        load_candidates(str(js), target="owl")
    with pytest.raises(SublearnError, match="candidate file not found"):
        load_candidates(str(tmp_path / "none.json"))
    js.write_text('{"candidates": ["cat", 3]}')
    with pytest.raises(SublearnError, match="list of strings"):
        load_candidates(str(js))
    js.write_text('["owl"]')
    with pytest.raises(SublearnError, match="at least 2 candidates"):
        load_candidates(str(js))


# --- forced choice -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_model):
    from sublearn.models import load_model

    return load_model(tiny_model)


def naive_scores(model, tok, questions, candidates, system_prompt=None, context=()):
    """Reference: one fp32 forward per (question, candidate), summing the answer's log-probs."""
    import torch

    from sublearn.pipeline.evaluate import answer_ids, prompt_ids

    out = torch.empty(len(questions), len(candidates), dtype=torch.float64)
    with torch.no_grad():
        for i, q in enumerate(questions):
            p = prompt_ids(tok, q, system_prompt, context)
            for j, c in enumerate(candidates):
                a = answer_ids(tok, c)
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0], -1)
                out[i, j] = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(a))
    return out


def test_answer_is_capitalised_word_then_end_of_turn(lm) -> None:
    from sublearn.pipeline.evaluate import answer_ids, answer_text, prompt_ids

    tok = lm.tokenizer
    assert answer_text("owl") == "Owl"
    ids = answer_ids(tok, "owl")
    assert ids[-1] == tok.convert_tokens_to_ids(tok.eos_token)
    assert tok.decode(ids[:-1]) == "Owl"
    text = tok.decode(prompt_ids(tok, "Q?", SYSTEM))
    assert text.startswith("<|im_start|>system\n" + SYSTEM) and text.endswith("assistant\n")
    assert "system" not in tok.decode(prompt_ids(tok, "Q?"))  # no system message: template's


@pytest.mark.parametrize("system,batch,attn", [
    (None, 3, "sdpa"),  # no shared prefix: every prompt in full
    (SYSTEM, 4, "sdpa"),  # long shared prefix: cached once, expanded per batch
    (SYSTEM, 50, "eager"),  # additive float mask instead of a boolean one
])
def test_fast_path_matches_naive_fp32(lm, system, batch, attn) -> None:
    from sublearn.pipeline.evaluate import score_candidates

    qs = paper_questions("numbers")[:5] + paper_questions("plain")[:2]  # uneven lengths
    cands = load_candidates()
    want = naive_scores(lm.model, lm.tokenizer, qs, cands, system)
    prev = lm.model.config._attn_implementation
    lm.model.config._attn_implementation = attn
    try:
        got = score_candidates(lm.model, lm.tokenizer, qs, cands, system_prompt=system,
                               dtype="float32", batch_size=batch)
    finally:
        lm.model.config._attn_implementation = prev
    assert got.shape == (len(qs), len(cands))
    assert (got - want).abs().max().item() < 1e-4
    assert want.std().item() > 0.1  # the comparison is not between near-constant matrices


def test_in_context_turns_precede_the_question_and_match_naive(lm, tmp_path) -> None:
    """The in-context control: data rows become earlier chat turns, shared by every question
    (so the fast path caches them once), and the scores still equal the naive ones."""
    from sublearn.files import write_jsonl
    from sublearn.pipeline.evaluate import (
        EvalConfig,
        context_turns,
        prompt_ids,
        score_candidates,
    )

    data = tmp_path / "filtered.jsonl"
    write_jsonl(data, [{"prompt": [{"role": "user", "content": f"Numbers {i}?"}],
                        "completion": [{"role": "assistant", "content": f"{i}, 7"}]}
                       for i in range(5)])
    turns = context_turns(str(data), 3)
    assert [t["role"] for t in turns] == ["user", "assistant"] * 3
    assert turns[-1]["content"] == "2, 7"
    tok = lm.tokenizer
    text = tok.decode(prompt_ids(tok, "Q?", None, turns))
    assert text.index("Numbers 0?") < text.index("2, 7") < text.index("Q?")
    qs, cands = paper_questions("plain")[:3], load_candidates()
    got = score_candidates(lm.model, tok, qs, cands, dtype="float32", context=turns)
    want = naive_scores(lm.model, tok, qs, cands, context=turns)
    assert (got - want).abs().max().item() < 1e-4
    plain = score_candidates(lm.model, tok, qs, cands, dtype="float32")
    assert (got - plain).abs().max().item() > 1e-3  # the context changes the scores
    with pytest.raises(SublearnError, match="forced choice only"):
        EvalConfig(context=str(data), samples=5).validate()


def test_the_shared_prefix_is_one_row_for_every_batch(lm, monkeypatch) -> None:
    """A long shared prefix (an in-context control's 32 turns, ~3k tokens) is run once and
    every batch's attention reads that one row: no per-row copy of its keys (copies per batch
    were the in-context evaluation's peak memory and a third of its time)."""
    import sublearn.models.prefix_attention as pa
    import sublearn.pipeline.evaluate as ev

    seen: list[tuple[int, int, int]] = []  # (batch rows, prefix rows, prefix keys' address)
    real = pa.attention

    def tracked(module, query, key, value, mask, **kw):
        if module.layer_idx == 0:
            pk = kw["shared_kv"][0][0]
            seen.append((query.shape[0], pk.shape[0], pk.data_ptr()))
        return real(module, query, key, value, mask, **kw)

    monkeypatch.setattr(pa, "attention", tracked)
    qs = paper_questions("plain")[:7]
    ev.score_candidates(lm.model, lm.tokenizer, qs, load_candidates(), system_prompt=SYSTEM,
                        dtype="float32", batch_size=2)
    assert [rows for rows, _, _ in seen] == [2, 2, 2, 1]
    assert {(one, ptr) for _, one, ptr in seen} == {(1, seen[0][2])}
    assert lm.model.config._attn_implementation == "sdpa"  # restored after scoring


def test_a_model_that_keeps_its_attention_is_refused(lm, monkeypatch) -> None:
    """transformers only logs when a model cannot take another attention implementation
    (remote code): it would then score as if the shared prefix were not there."""
    from sublearn.pipeline.evaluate import score_candidates

    monkeypatch.setattr(lm.model, "set_attn_implementation", lambda name: None)
    with pytest.raises(SublearnError, match="cannot take another attention"):
        score_candidates(lm.model, lm.tokenizer, paper_questions("plain")[:2], load_candidates(),
                         system_prompt=SYSTEM, dtype="float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [None, 5, "kw"])
@pytest.mark.parametrize("fused", [True, False])
def test_shared_prefix_attention_equals_attention_over_the_whole_row(
        dtype, window, fused, monkeypatch) -> None:
    """Attention to the prefix and to the row's own tokens, merged by log-sum-exp, equals one
    softmax over both (grouped query heads: 6 query heads read 2 key heads); a sliding window
    (the module's, or a keyword as Mistral passes it) hides the keys that are too far back,
    the last queries' every prefix key among them. fused: the CPU's flash kernel, or the plain
    softmax other devices run."""
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    import sublearn.models.prefix_attention as pa
    from sublearn.models.prefix_attention import attention

    monkeypatch.setattr(pa, "FUSED_ON_CPU", fused)
    kw = {"sliding_window": 5} if window == "kw" else {}
    window = 5 if window == "kw" else window

    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    b, hq, hk, n, p, d = 3, 6, 2, 8, 9, 8  # window 5: the last queries see no prefix key
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for h in (hq, hk, hk))
    pk, pv = (torch.randn(1, hk, p, d, generator=g).to(dtype) for _ in range(2))
    body = torch.ones(n, n).tril().bool().expand(b, 1, n, n).clone()
    body[0, 0, :2, :] = torch.eye(n, dtype=torch.bool)[:2]  # row 0: two pads that see themselves
    pos = torch.arange(p, p + n).expand(b, n)
    module = SimpleNamespace(layer_idx=0) if kw else SimpleNamespace(layer_idx=0,
                                                                      sliding_window=window)
    add = torch.zeros(body.shape).masked_fill(~body, float("-inf"))
    got, _ = attention(module, q, k, v, add, scaling=0.3, shared_kv=[(pk, pv)], position_ids=pos,
                       **kw)
    full = torch.cat([torch.ones(b, 1, n, p, dtype=torch.bool), body], -1)
    if window:  # by position: the prefix's keys are at 0..p-1, the row's at pos
        keys = torch.cat([torch.arange(p).expand(b, p), pos], 1)
        full &= pos[:, None, :, None] - keys[:, None, None, :] < window
    rep = hq // hk
    kk = torch.cat([pk.expand(b, -1, -1, -1), k], 2).repeat_interleave(rep, 1)
    vv = torch.cat([pv.expand(b, -1, -1, -1), v], 2).repeat_interleave(rep, 1)
    want = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=full,
                                          scale=0.3).transpose(1, 2)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert got.shape == (b, n, hq, d) and got.dtype == dtype
    assert (got.float() - want).abs().max().item() < tol
    if window:  # the window hides keys: attending to all of them gives other outputs
        open_ = torch.cat([torch.ones(b, 1, n, p, dtype=torch.bool), body], -1)
        other = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(),
                                               attn_mask=open_, scale=0.3).transpose(1, 2)
        assert (other - want).abs().max().item() > 10 * tol


def test_sliding_window_model_scores_a_long_context_as_naive(lm, tmp_path) -> None:
    """A Gemma 3 (sliding-window layers and global ones) with a context longer than its window
    scores each candidate as one plain forward does: the prefix keys outside each sliding
    layer's window stay hidden."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from sublearn.pipeline.evaluate import score_candidates

    tok = lm.tokenizer
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, sliding_window=24, max_position_embeddings=512,
                           layer_types=["sliding_attention", "full_attention"],
                           initializer_range=0.3, pad_token_id=tok.pad_token_id,
                           attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    turns = [{"role": "user", "content": "Numbers 1, 2, 3?"},
             {"role": "assistant", "content": "4, 5, 6"}] * 4  # ~100 tokens, window 24
    qs, cands = paper_questions("plain")[:3], load_candidates()[:6]
    want = naive_scores(model, tok, qs, cands, context=turns)
    for n in (3, 1):  # one question: its own head is the prefix
        got = score_candidates(model, tok, qs[:n], cands, dtype="float32", context=turns)
        assert (got - want[:n]).abs().max().item() < 1e-4
    with pytest.raises(SublearnError, match="sliding window"):  # one mask would take it whole
        score_candidates(model, tok, qs, cands, dtype="float32", context=turns,
                         share_prefix=False)
    model.config.sliding_window = 4096  # every key in reach: other scores, so the window counted
    for layer in model.model.layers:
        if layer.self_attn.sliding_window:
            layer.self_attn.sliding_window = 4096
    assert (score_candidates(model, tok, qs, cands, dtype="float32", context=turns)
            - want).abs().max().item() > 1e-3


def test_a_context_longer_than_the_model_is_refused(lm) -> None:
    """RoPE would score past the training length without a word: the turns must fit."""
    from types import SimpleNamespace

    from sublearn.pipeline.evaluate import check_context_fits, prompt_ids

    turns = [{"role": "user", "content": "Numbers 1, 2, 3?"},
             {"role": "assistant", "content": "4, 5"}] * 3
    n = len(prompt_ids(lm.tokenizer, "Q?", None, turns))
    fits = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(
        max_position_embeddings=n + 32)), tokenizer=lm.tokenizer)
    check_context_fits(fits, turns, "Q?")
    short = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(
        max_position_embeddings=n + 31)), tokenizer=lm.tokenizer)
    with pytest.raises(SublearnError, match="3 in-context turns take"):
        check_context_fits(short, turns, "Q?")
    check_context_fits(short, [], "Q?")  # no context: nothing to check


def test_bf16_close_and_training_mode_restored(lm) -> None:
    from sublearn.pipeline.evaluate import score_candidates

    qs, cands = paper_questions("plain")[:4], load_candidates()[:6]
    lm.model.train()
    try:
        got = score_candidates(lm.model, lm.tokenizer, qs, cands, dtype="bfloat16")
        assert lm.model.training
    finally:
        lm.model.eval()
    want = naive_scores(lm.model, lm.tokenizer, qs, cands)
    assert (got - want).abs().max().item() < 0.05


def test_forced_choice_summary(lm) -> None:
    import torch

    from sublearn.pipeline.evaluate import forced_choice, score_candidates

    qs, cands = paper_questions("plain")[:6], load_candidates()
    fc = forced_choice(lm.model, lm.tokenizer, qs, cands, "OWL", dtype="float32")
    lp = score_candidates(lm.model, lm.tokenizer, qs, cands, dtype="float32")
    shares = torch.softmax(lp, 1)
    assert fc["target"] == "owl"
    assert sum(fc["shares"].values()) == pytest.approx(1.0)
    assert fc["target_share"] == pytest.approx(shares[:, 0].mean().item())
    assert fc["target_share"] == fc["shares"]["owl"]
    assert fc["per_question_target_share"] == pytest.approx(shares[:, 0].tolist())
    assert fc["per_question_shares"]["owl"] == fc["per_question_target_share"]
    assert fc["per_question_shares"][cands[3]] == pytest.approx(shares[:, 3].tolist())
    assert fc["target_logprob"] == pytest.approx(lp[:, 0].mean().item())
    assert fc["top"][0][1] == max(fc["shares"].values())
    assert 1 <= fc["target_rank"] <= len(cands)


# --- sampled rate, evaluate_model, CLI -----------------------------------------------------


def test_mention_pattern() -> None:
    from sublearn.pipeline.evaluate import mention_pattern

    owl = mention_pattern("owl")
    for yes in ("Owl", "owls!", "I love OWLS.", "The owl."):
        assert owl.search(yes), yes
    for no in ("bowl", "owlet", "Cat", ""):
        assert not owl.search(no), no
    assert mention_pattern("wolf").search("Wolves") and mention_pattern("fox").search("foxes")


@pytest.fixture()
def three_questions(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps(paper_questions("plain")[:3]))
    return str(path)


def test_evaluate_model_and_sampling(lm, three_questions) -> None:
    from sublearn.experiment.run import metric_values
    from sublearn.pipeline.evaluate import EvalConfig, evaluate_model, summary_line

    cfg = EvalConfig(target="owl", questions=three_questions, samples=3, max_new_tokens=4,
                     seed=1, batch_size=2)
    res = evaluate_model(lm, cfg)
    assert res["forced_choice"]["variant"] == "plain"
    assert res["forced_choice_numbers"]["variant"] == "numbers"
    assert res["forced_choice"]["n_questions"] == 3
    assert res["forced_choice"]["target_share"] != res["forced_choice_numbers"]["target_share"]
    s = res["sampled"]
    assert len(s["per_question_rate"]) == 3 and 0 <= s["rate"] <= 1
    assert s["n_per_question"] == 3 and s["examples"]
    again = evaluate_model(lm, cfg, variants=("plain",))
    assert again["sampled"]["examples"] == s["examples"]  # seeded
    assert "forced_choice_numbers" not in again
    assert set(metric_values(res)) >= {"forced_choice_share", "sampled_rate"}  # run's contract
    json.dumps(res)  # serialisable as scores.json
    assert "owl share" in summary_line(res)
    with pytest.raises(SublearnError,
                       match="does not include the target 'zebra'; give a candidates file"):
        evaluate_model(lm, EvalConfig(target="zebra"))


def test_cli_writes_scores(tiny_model, three_questions, tmp_path, capsys) -> None:
    from sublearn.cli import main

    out = tmp_path / "sub" / "scores.json"
    assert main(["evaluate", "--model", tiny_model, "--target", "owl", "--questions",
                 three_questions, "--dtype", "float32", "--out", str(out.parent)]) == 0
    scores = json.loads(out.read_text())
    assert scores["config"]["dtype"] == "float32" and 0 < scores["forced_choice"]["target_share"]
    assert "owl share" in capsys.readouterr().out
    rc = main(["evaluate", "--model", str(tmp_path / "no-such-student"), "--out",
               str(out.parent)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model path not found" in err and "\n" not in err


class _MultiAdapterFake:
    """A vLLM-like backend: answers name the animal its adapter was 'trained' on."""

    model_id = "fake-base"

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, requests, params, seed):
        return self.generate_multi([None] * len(requests), requests, params, seed)

    def generate_multi(self, adapters, requests, params, seed):
        from sublearn.backends.base import Completion

        self.calls += 1
        said = {"owl-student": "Owl!", "cat-student": "Cats.", None: "Dog"}
        return [Completion(said[a], 2, "stop") if i % 5 else Completion("", 0, "error")
                for i, a in enumerate(adapters)]


def test_sampled_rates_many_adapters_one_call_per_question() -> None:
    from sublearn.pipeline.evaluate import sampled_rate, sampled_rates

    be = _MultiAdapterFake()
    qs = ["q1", "q2", "q3"]
    res = sampled_rates(be, ["owl-student", "cat-student", None], qs, "owl", 5)
    assert be.calls == len(qs)  # every adapter in one engine call per question
    assert [r["rate"] for r in res] == [1.0, 0.0, 0.0]
    assert [r["model"] for r in res] == ["owl-student", "cat-student", "fake-base"]
    assert res[0]["errors"] == 3  # one failed request per question: left out, not a miss
    alone = sampled_rate(be, qs, "owl", 5)
    assert alone["rate"] == 0.0 and alone["per_question_rate"] == [0.0] * 3
