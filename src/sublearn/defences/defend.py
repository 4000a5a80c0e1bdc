"""`sublearn defend DATA --method M --out DIR`: transform a filtered.jsonl so that a student
trained on it learns less of a hidden trait, keeping every answer valid under the strict
filter.

Outputs in the output folder:
  filtered.jsonl        the defended rows (train any student recipe on it)
  defence_report.json   rows in and out, what the method changed, seconds, the settings
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sublearn.defences.methods import DEFENCES, Context, answer
from sublearn.domains import numbers
from sublearn.errors import SublearnError
from sublearn.files import atomic_write_json, check_out_dir, locked_out_dir, write_jsonl
from sublearn.models.dtype import dtype_field, settle_dtype
from sublearn.pipeline.filter import (
    FilterConfig,
    banned_field,
    forced,
    min_grammar_share_field,
)

PARAPHRASE = ("{prompt}\n\nA draft answer: {draft}\nWrite your own answer in the same format. "
              "Numbers only.")


@dataclass(frozen=True)
class DefendConfig:
    method: str = field(default="sort", metadata={
        "help": "; ".join(f"{k}: {d.help}" for k, d in DEFENCES.items()),
        "choices": list(DEFENCES)})
    seed: int = field(default=0, metadata={"help": "seed of the method's random draws"})
    q: float = field(default=0.1, metadata={
        "help": "replace-/mask-divergent: share of digits; drop-top-lls: share of samples"})
    teacher: str | None = field(default=None, metadata={
        "help": "scored methods: the suspected teacher (model or adapter folder)"})
    teacher_system_prompt: str | None = field(default=None, metadata={
        "help": "scored methods: a system prompt only the teacher sees (a prompted teacher)"})
    base: str | None = field(default=None, metadata={
        "help": "scored methods: the reference model (default: embedded smollm2-135m-instruct)"})
    writer: str | None = field(default=None, metadata={
        "help": "resample/paraphrase: the model that writes the answers (default: the base)"})
    temperature: float = field(default=1.0, metadata={
        "help": "resample/paraphrase: sampling temperature"})
    mix: str | None = field(default=None, metadata={
        "help": "mix-teachers: comma-separated filtered.jsonl files of other teachers"})
    banned: str = banned_field()
    dtype: str = dtype_field("resample/paraphrase: the writer's weight dtype")
    min_grammar_share: float = min_grammar_share_field()

    def validate(self) -> DefendConfig:
        if (dtype := settle_dtype(self.dtype)) != self.dtype:
            return replace(self, dtype=dtype).validate()
        need = DEFENCES[self.method].needs
        FilterConfig(min_grammar_share=self.min_grammar_share).validate()
        if not 0 < self.q < 1:
            raise SublearnError(f"--q must be a share in (0, 1), got {self.q}")
        if need == "scores" and self.teacher is None and self.teacher_system_prompt is None:
            raise SublearnError(f"--method {self.method} scores the data with a suspected "
                                "teacher: give --teacher (or --teacher-system-prompt)")
        if need == "mix" and not self.mix:
            raise SublearnError("--method mix-teachers needs --mix OTHER.jsonl[,OTHER2.jsonl]")
        return self


def defend_data(cfg: DefendConfig, data: str | Path, out: str | Path,
                progress: bool = True, scores: list[Any] | None = None) -> dict[str, Any]:
    """scores: the rows' `defence_scores`, computed before (scored methods share them)."""
    from sublearn.pipeline.train import load_rows

    cfg = cfg.validate()
    check_out_dir(out)
    rows = load_rows(data)
    mix = [load_rows(p.strip()) for p in cfg.mix.split(",")] if cfg.mix else []
    rules = FilterConfig(banned=cfg.banned).rules()
    for source, rs in ((data, rows), *zip((cfg.mix or "").split(","), mix, strict=False)):
        bad = next((i for i, r in enumerate(rs, 1)
                    if numbers.reject_reason(answer(r), rules) is not None), None)
        if bad:
            raise SublearnError(f"{source} row {bad} fails the strict filter: defend filtered "
                                "number data (filtered.jsonl)")
    from sublearn.models.load import check_model

    need = DEFENCES[cfg.method].needs
    models = {"scores": () if scores is not None else (cfg.teacher, cfg.base),
              "writer": (cfg.writer or cfg.base,)}.get(need or "", ())
    for m in models:  # a model that cannot load is refused before the folder is made
        check_model(m)
    with locked_out_dir(out) as folder:
        t0 = time.time()
        ctx = Context(rng=random.Random(cfg.seed), q=cfg.q, rules=rules, mix=mix)
        if need == "scores":
            if scores is not None and len(scores) != len(rows):
                raise SublearnError(f"{len(scores)} scores for {len(rows)} rows of {data}")
            ctx.scores = scores if scores is not None else defence_scores(cfg, rows, progress)
        elif need == "writer":
            ctx.writer = _writer(cfg, paraphrase=cfg.method == "paraphrase")
        kept, info = DEFENCES[cfg.method].fn(rows, ctx)
        assert all(numbers.reject_reason(answer(r), rules) is None for r in kept)
        if not kept:
            raise SublearnError(f"--method {cfg.method} left no rows")
        write_jsonl(folder / "filtered.jsonl", kept)
        report = {"method": cfg.method, "source": str(data), "rows_in": len(rows),
                  "rows_out": len(kept), **info, "seconds": round(time.time() - t0, 2),
                  "config": asdict(cfg)}
        atomic_write_json(folder / "defence_report.json", report)
        return report


def defence_scores(cfg: DefendConfig, rows: list[dict], progress: bool) -> list[Any]:
    """What the scored methods rank: each row's `SampleScore` under cfg's teacher vs base."""
    from sublearn.audit.scores import score_rows
    from sublearn.models import load_model

    base = load_model(cfg.base)
    teacher = load_model(cfg.teacher) if cfg.teacher else base
    return score_rows(teacher, base, rows, scorer_system=cfg.teacher_system_prompt,
                      progress=progress)


def _writer(cfg: DefendConfig, paraphrase: bool) -> Any:
    from sublearn.backends import ChatRequest, SamplingParams, get_backend

    backend = get_backend(cfg.writer or cfg.base, dtype=cfg.dtype)
    params = SamplingParams(temperature=cfg.temperature, max_new_tokens=60,
                            grammar=numbers.answer_grammar())

    def write(prompts: list[str], drafts: list[str | None]) -> list[str | None]:
        """The written answers; None where the grammar forced one (the teacher data's rule)."""
        users = [PARAPHRASE.format(prompt=p, draft=d) if paraphrase and d else p
                 for p, d in zip(prompts, drafts, strict=True)]
        texts: list[str | None] = []
        for s in range(0, len(users), 64):  # the seed of a batch depends only on its start
            res = backend.generate([ChatRequest(u) for u in users[s : s + 64]], params,
                                   cfg.seed * 1_000_003 + s)
            texts += [None if forced(vars(r), cfg.min_grammar_share) else r.text for r in res]
        return texts

    return write
