"""What every generation backend takes and returns. New engines (vLLM, OpenAI-compatible APIs)
implement `Backend` and register in `sublearn.backends`; stages never import an engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # EBNF grammar the answer must match (None = unconstrained sampling).
    grammar: str | None = None

    def to_record(self) -> dict:
        d = asdict(self)
        d["grammar"] = "numbers" if self.grammar else None
        return d


@dataclass(frozen=True)
class ChatRequest:
    user: str
    system: str | None = None  # None = the model's default (no trait prompt)

    def messages(self) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system is not None else []
        return msgs + [{"role": "user", "content": self.user}]


@dataclass
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    # With a grammar enforced by masking (HFBackend): the share of the teacher's next-token
    # probability the grammar allowed at the first step, and the smallest over later steps.
    grammar_share_first: float | None = None
    grammar_share_min: float | None = None


class Backend(Protocol):
    """A model that answers chat requests. `seed` makes one call reproducible."""

    model_id: str

    def generate(
        self, requests: list[ChatRequest], params: SamplingParams, seed: int
    ) -> list[Completion]: ...
