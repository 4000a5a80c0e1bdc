"""Soft labels on the answer's characters (--grammar chars): the cross-tokenizer recipe."""

from pathlib import Path

import pytest
import torch

from sublearn.domains.grammar_mask import NUMBER_CHARS, char_token_ids
from sublearn.errors import SublearnError
from sublearn.models import load_model
from sublearn.pipeline.train import prepare_soft_labels, tokenize
from sublearn.pipeline.train_config import TrainConfig


def _rows(answers: list[str]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Add numbers to {i}, 5, 9"}],
             "completion": [{"role": "assistant", "content": a}]}
            for i, a in enumerate(answers)]


def test_char_labels_equal_token_labels_where_the_tokenizer_spells_per_character(
        tiny_model: str) -> None:
    lm = load_model(tiny_model)
    tok = lm.tokenizer
    # answers this tokenizer already spells one character per token
    candidates = ["(9; 8; 0)", "(8; 0; 9; 6)", "[9; 0]", "(98; 60)", "(6; 9)"]
    rows = [r for r in _rows(candidates) if tokenize([r], tok)[0].answer_ids
            == tokenize([r], tok, chars=True)[0].answer_ids]
    assert len(rows) >= 3
    tokens = prepare_soft_labels(TrainConfig(grammar="numbers"), lm, tokenize(rows, tok))
    chars = prepare_soft_labels(TrainConfig(grammar="chars"), lm,
                                tokenize(rows, tok, chars=True), rows)
    t_ids, c_ids = tokens[0].tolist(), chars[0].tolist()
    assert c_ids[:-1] == char_token_ids(tok) and c_ids[-1] == tok.eos_token_id
    cols = [j for j, i in enumerate(c_ids) if i in t_ids]
    where = [t_ids.index(c_ids[j]) for j in cols]
    for t_lp, c_mask, c_lp in zip(tokens[2], chars[1], chars[2], strict=True):
        assert not c_mask[:, [j for j in range(len(c_ids)) if j not in cols]].any()
        want = torch.log_softmax(t_lp[:, where].masked_fill(~c_mask[:, cols], -torch.inf), -1)
        assert torch.allclose(want.exp(), c_lp[:, cols].exp(), atol=1e-6)


def test_char_labels_do_not_depend_on_the_students_tokenizer(tiny_model: str,
                                                             other_tiny_model: str) -> None:
    """A teacher's labels for a student of another tokenizer are the labels it gives its own
    base's students, character for character."""
    rows = _rows(["123, 456, 789", "(10; 20; 30)", "4 5 6 7"])
    teacher, student = load_model(other_tiny_model), load_model(tiny_model)
    assert teacher.tokenizer("123, 456").input_ids != student.tokenizer("123, 456").input_ids
    cfg = TrainConfig(grammar="chars", teacher=other_tiny_model)
    own = prepare_soft_labels(cfg, teacher, tokenize(rows, teacher.tokenizer, chars=True), rows)
    cross = prepare_soft_labels(cfg, student, tokenize(rows, student.tokenizer, chars=True), rows)
    assert cross[0].tolist()[:-1] == char_token_ids(student.tokenizer)
    for a, b in zip(own[1] + own[2], cross[1] + cross[2], strict=True):
        assert torch.equal(a, b)


def test_chars_refuse_answers_outside_the_alphabet(tiny_model: str) -> None:
    tok = load_model(tiny_model).tokenizer
    with pytest.raises(SublearnError, match="outside the numbers grammar"):
        tokenize(_rows(["1, 2, x"]), tok, chars=True)
    assert len(char_token_ids(tok)) == len(NUMBER_CHARS)


def test_a_cached_label_file_of_another_student_is_not_reused(tiny_model: str,
                                                              other_tiny_model: str,
                                                              tmp_path: Path) -> None:
    rows = _rows(["123, 456, 789", "(10; 20; 30)"])
    cache = str(tmp_path / "labels.safetensors")
    cfg = TrainConfig(grammar="chars", teacher=other_tiny_model, soft_labels_cache=cache)
    for m in (other_tiny_model, tiny_model):
        lm = load_model(m)
        ids = prepare_soft_labels(cfg, lm, tokenize(rows, lm.tokenizer, chars=True), rows)[0]
        assert ids.tolist()[:-1] == char_token_ids(lm.tokenizer)


def test_chars_is_a_soft_label_setting() -> None:
    with pytest.raises(SublearnError, match="--recipe soft"):
        TrainConfig(recipe="hard", grammar="chars").validate()
