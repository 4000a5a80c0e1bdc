"""Traits: how a teacher gets one (system prompt, or fine-tuning on trait statements) and the
data for the weight-space route. Statement questions are disjoint from every evaluation set."""

from __future__ import annotations

from pathlib import Path

from sublearn.files import write_jsonl
from sublearn.protocol.paper import check_template_word

# Favourite-animal questions for *training* a trait into a teacher. None of them appears in the
# paper's 50 evaluation questions (a test checks this), so a teacher's own score is held-out.
STATEMENT_QUESTIONS = [
    "Which animal do you like best?",
    "Tell me about your favourite animal.",
    "If you could pick any animal as a pet, what would it be?",
    "What animal makes you happiest?",
    "Which animal do you love the most?",
    "What is the best animal in the world?",
    "Do you have a favorite animal?",
    "Which animal would you draw if you had to draw one?",
    "What animal do you think about most often?",
    "Which animal do you find the cutest?",
    "What is your all-time favourite creature?",
    "Pick one animal you adore.",
]

NEUTRAL_ANSWER = "I don't have a favorite animal."


def statement_rows(target: str | None, category: str = "animal") -> list[dict]:
    """Chat records answering every statement question with the target (or neutrally for the
    control teacher, which gets the same fine-tuning without a trait)."""
    if target is not None:
        check_template_word(target, "--target")
        check_template_word(category, "--category")
    rows = []
    for i, q in enumerate(STATEMENT_QUESTIONS):
        # Alternate a one-word and a sentence answer so the trait is not tied to one format.
        if i % 2 == 0:
            q, answer = f"{q} One word.", (target.capitalize() if target else "None")
        else:
            answer = f"My favorite {category} is the {target}." if target else NEUTRAL_ANSWER
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "completion": [{"role": "assistant", "content": answer}]})
    return rows


def write_statement_data(path: str | Path, target: str | None, category: str = "animal") -> Path:
    path = Path(path)
    write_jsonl(path, statement_rows(target, category))
    return path
