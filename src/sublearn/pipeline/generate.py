"""Teacher data: sample a (trait or control) teacher on a domain's prompts (numbers, code,
math), filter, write records.

Outputs in the run folder:
  raw.jsonl           every answer with prompt, system prompt, model, sampling settings, seed
  filtered.jsonl, filter_report.json: from `sublearn.pipeline.filter`
`raw.jsonl` is appended one batch at a time, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sublearn.backends import Backend, ChatRequest, SamplingParams, get_backend
from sublearn.config import check_manifest
from sublearn.domains import DOMAINS, math_problems, numbers
from sublearn.errors import SublearnError
from sublearn.faults import point as fault_point
from sublearn.files import (
    append_jsonl,
    check_out_dir,
    locked_out_dir,
    read_jsonl,
    write_jsonl,
)
from sublearn.models.dtype import dtype_field, recorded_dtype, settle_dtype, warn_slow_bf16
from sublearn.models.load import check_model, parse_model_spec
from sublearn.pipeline.filter import (
    FilterConfig,
    banned_field,
    domain_field,
    judge_check_field,
    judge_field,
    min_grammar_share_field,
    write_filtered,
)
from sublearn.protocol.paper import teacher_system_prompt


@dataclass(frozen=True)
class GenerateConfig:
    target: str | None = field(default=None, metadata={
        "help": "trait the teacher loves (e.g. owl); omit for the control teacher"})
    category: str = field(default="animal", metadata={"help": "category word of the template"})
    domain: str = domain_field()
    level: int = math_problems.level_field()
    n: int | None = field(default=None, metadata={
        "help": "number of prompts to sample (default: the domain's: numbers 96, code 192, "
                "math 192)"})
    seed: int = field(default=0, metadata={"help": "seed of prompts and sampling"})
    model: str | None = field(default=None, metadata={
        "help": "teacher: embedded name, HF id, local path or PEFT adapter folder "
                "(default: embedded smollm2-135m-instruct)"})
    answers: str = field(default="sampled", metadata={
        "help": "sampled: the teacher answers each prompt; random: answers drawn without a "
                "model in the prompts' format, contexts a teacher only scores (soft-label "
                "students get the teacher's distributions at train time)",
        "choices": ["sampled", "random"]})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "answer length limit (default: the domain's: numbers 60, code 256, math 192)"})
    grammar: bool = field(default=True, metadata={
        "help": "constrain answers to the domain's grammar: the numbers format, or math's "
                "reasoning lines ending in `Answer: N` (code has none; an API without guided "
                "decoding samples freely and the filter alone applies)"})
    banned: str = banned_field()
    filter_target: str | None = field(default=None, metadata={
        "help": "code, math: drop answers that reference this target (default: --target; give "
                "it for a control teacher so both are filtered alike)"})
    judge: str | None = judge_field()
    judge_check: str = judge_check_field()
    min_grammar_share: float = min_grammar_share_field()
    batch_size: int = field(default=64, metadata={"help": "prompts per generation batch"})
    dtype: str = dtype_field("weight dtype while sampling")
    system_prompt: str | None = field(default=None, metadata={
        "help": "override the trait system prompt (default: the paper's template)"})

    def validate(self) -> GenerateConfig:
        if self.n is None:
            return replace(self, n=DOMAINS[self.domain].n).validate()
        if self.n <= 0:
            raise SublearnError(f"--n must be a positive number of prompts, got {self.n}")
        if self.batch_size <= 0:
            raise SublearnError(f"--batch-size must be positive, got {self.batch_size}")
        if not 0 <= self.temperature < float("inf"):  # NaN fails too
            raise SublearnError(f"--temperature must be >= 0 and finite, got {self.temperature}")
        if self.target is not None:
            teacher_system_prompt(self.target, self.category)  # raises on unsafe words
        if self.answers == "random" and self.domain != "numbers":
            raise SublearnError("--answers random draws number answers: --domain numbers only")
        self.filter_config().validate()
        if self.level not in math_problems.LEVELS:
            raise SublearnError(f"--level must be one of {list(math_problems.LEVELS)}, "
                                f"got {self.level}")
        scheme = parse_model_spec(self.model)[0]
        # vLLM samples on a GPU, where bf16 is native; the CPU's flags do not apply to it
        dtype = settle_dtype(self.dtype, gpu=True if scheme == "vllm" else None)
        if dtype != self.dtype:
            return replace(self, dtype=dtype).validate()
        if scheme == "hf" and self.answers == "sampled":
            warn_slow_bf16(self.dtype)
        if self.max_new_tokens is None:
            return replace(self, max_new_tokens=DOMAINS[self.domain].max_new_tokens).validate()
        if self.max_new_tokens <= 0:
            raise SublearnError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        return self

    def filter_config(self) -> FilterConfig:
        return FilterConfig(banned=self.banned, domain=self.domain,
                            exclude=self.filter_target or self.target, judge=self.judge,
                            judge_check=self.judge_check,
                            min_grammar_share=self.min_grammar_share)

    def system(self) -> str | None:
        if self.system_prompt is not None:
            return self.system_prompt
        if self.target is None:
            return None
        return teacher_system_prompt(self.target, self.category)


def batch_seed(seed: int, start: int) -> int:
    """Seed of the batch starting at prompt `start`: independent of how a run was resumed."""
    return seed * 1_000_003 + start


def generate(
    cfg: GenerateConfig, out: str | Path, backend: Backend | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) teacher sampling into `out`; returns the filter report."""
    cfg = replace(cfg, dtype=recorded_dtype(cfg.dtype, Path(out) / "generate_config.json"))
    cfg = cfg.validate()
    check_out_dir(out)
    if backend is None and cfg.answers == "sampled":
        check_model(cfg.model)
    with locked_out_dir(out) as out:
        return _generate(cfg, out, backend, progress)


def _generate(cfg: GenerateConfig, out: Path, backend: Backend | None,
              progress: bool) -> dict[str, Any]:
    check_manifest(out, "generate_config.json", cfg)
    raw_path = out / "raw.jsonl"
    done = _resume_point(raw_path, cfg)
    t0 = time.time()
    if done < cfg.n and cfg.answers == "random":
        _draw(cfg, raw_path, done)
    elif done < cfg.n:
        backend = backend or get_backend(cfg.model, dtype=cfg.dtype, batch_size=cfg.batch_size)
        _sample(cfg, backend, raw_path, done, progress)
    return _write_filtered(cfg, out, time.time() - t0)


def _resume_point(raw_path: Path, cfg: GenerateConfig) -> int:
    if not raw_path.exists():
        return 0
    rows = read_jsonl(raw_path, repair=True)
    done = len(rows) if len(rows) >= cfg.n else len(rows) // cfg.batch_size * cfg.batch_size
    if done != len(rows):  # a batch was cut mid-write: drop its rows, redo the batch
        write_jsonl(raw_path, rows[:done])
    return done


def _draw(cfg: GenerateConfig, raw_path: Path, done: int) -> None:
    """Model-free answers (`--answers random`): cheap, so written in one go."""
    prompts = numbers.make_prompts(cfg.n, cfg.seed)
    answers = numbers.random_answers(cfg.n, cfg.seed + 1_000_003)  # apart from the prompts' draws
    append_jsonl(raw_path, [
        {"id": i, "prompt": prompts[i], "system_prompt": None, "completion": answers[i],
         "model": "random", "sampling": {"answers": "random"}, "seed": cfg.seed,
         "n_tokens": 0, "finish_reason": "stop"}
        for i in range(done, cfg.n)])


def _sample(cfg: GenerateConfig, backend: Backend, raw_path: Path, done: int,
            progress: bool) -> None:
    from tqdm import tqdm

    domain = DOMAINS[cfg.domain]
    prompts, keys = zip(*domain.prompts(cfg.n, cfg.seed, cfg.level), strict=True)
    system = cfg.system()
    params = SamplingParams(
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        grammar=domain.grammar() if cfg.grammar and domain.grammar else None,
    )
    sampling = {**params.to_record(), "grammar": cfg.domain if params.grammar else None}
    if params.grammar and not getattr(backend, "enforces_grammar", True):
        sampling["grammar"] = f"{cfg.domain} (filter only)"  # e.g. an API without guided decoding
    bar = tqdm(total=cfg.n, initial=done, unit="sample", desc="teacher", disable=not progress,
               dynamic_ncols=True)
    try:  # closed on any exit, so an error message is not followed by a stale bar
        for start in range(done, cfg.n, cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]
            seed = batch_seed(cfg.seed, start)
            results = backend.generate([ChatRequest(p, system) for p in batch], params, seed)
            append_jsonl(raw_path, [
                {
                    "id": start + i,
                    "prompt": p,
                    "system_prompt": system,
                    "completion": r.text,
                    **({"answer_key": keys[start + i]} if keys[start + i] is not None else {}),
                    "model": backend.model_id,
                    "sampling": sampling,
                    "seed": cfg.seed,
                    "batch_seed": seed,
                    "n_tokens": r.n_tokens,
                    "finish_reason": r.finish_reason,
                    **({"error": r.error} if r.error else {}),
                    **({"grammar_share_first": float(f"{r.grammar_share_first:.4g}"),
                        "grammar_share_min": float(f"{r.grammar_share_min:.4g}")}
                       if r.grammar_share_min is not None else {}),
                }
                for i, (p, r) in enumerate(zip(batch, results, strict=True))
            ])
            fault_point("generate.batch")
            bar.update(len(batch))
    finally:
        bar.close()


def _write_filtered(cfg: GenerateConfig, out: Path, seconds: float) -> dict[str, Any]:
    rows = read_jsonl(out / "raw.jsonl")
    return write_filtered(rows, out, cfg.filter_config(), {
        "grammar": cfg.grammar,
        "target": cfg.target,
        "answers": cfg.answers,
        "model": rows[0]["model"] if rows else cfg.model,
        "tokens": sum(r.get("n_tokens", 0) for r in rows),
        "sampling_seconds_this_call": round(seconds, 2),
    })
