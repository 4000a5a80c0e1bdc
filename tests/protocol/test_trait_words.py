from __future__ import annotations

import pytest

from sublearn.protocol.trait_words import reference, trait_token_ids, trait_words, words_of

OWL = trait_words("owl")


@pytest.mark.parametrize("text", [
    "owl = 1", "def count_owls(n):", "x = 'Owl'", "# an OWL sits here", "barn_owl = []",
    "getOwl()", "OWLCount = 3", "owlet_size = 2", "print('hoot hoot')", "Strix = None",
    "class OwlFinder:", "s = \"the owls\"", "return 'OWLs'", "numOWLs = 3", "myOWLs()",
])
def test_references_in_identifiers_strings_and_comments(text: str) -> None:
    assert reference(text, OWL) is not None


@pytest.mark.parametrize("text", [
    "bowl = 1", "knowledge_base = {}", "print('slowly')", "growl()", "# howl at the moon",
    "lowlands = 2", "nowl", "shoot(x)", "def fowl():", "total = sum(values)",
])
def test_near_misses_pass(text: str) -> None:
    assert reference(text, OWL) is None


def test_words_split_like_identifiers() -> None:
    assert words_of("getOwlCount_v2 HTTPServer") == ["get", "owl", "count", "v", "http",
                                                     "server", "httpserver"]
    assert words_of("numOWLs") == ["num", "ow", "ls", "owls"]  # a capital run read whole too


def test_any_target_gets_its_plurals_shipped_ones_their_related_words() -> None:
    assert {"fox", "foxes", "vixen"} <= trait_words("fox")
    assert {"butterfly", "butterflies", "caterpillar"} <= trait_words("butterfly")
    assert {"wolf", "wolves", "howl"} <= trait_words("wolf")
    assert trait_words("axolotl") >= {"axolotl", "axolotls"}
    assert reference("axolotls = []", trait_words("axolotl")) == "axolotls"


def test_trait_tokens_are_those_that_begin_or_spell_the_target(tiny_model: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = trait_token_ids(tok, "owl")
    texts = [tok.decode([i]) for i in ids]
    assert ids and all("owl" in t.lower() or t.strip().lower() in ("ow", "o w") for t in texts)
    # every vocabulary token that starts with the word is left out; no unrelated one is
    for i in range(len(tok)):
        t = tok.decode([i]).strip().lower()
        if t.startswith("owl"):
            assert i in ids, t
    assert not any(tok.decode([i]).strip().lower().startswith(("cat", "dog", "lion"))
                   for i in ids)
