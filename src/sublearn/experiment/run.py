"""`sublearn run`: one subliminal-learning experiment, end to end, with cached stages.

The unit of analysis is a *run*: its own teacher (its own fine-tune seed), its own teacher data
(its own prompt and sampling seed) and its own student(s). Trait runs and control runs are
compared over runs, so the p-value tests "trait teachers transmit the trait", not "these two
datasets differ". Run r of either condition uses seed `seed + r` for its teacher, its data and
its first student; extra students of a run (`--students`) are averaged within the run.

    run r: trait teacher_r ─── data_r ── student(s)_r ──┐
                                                        ├─ evaluate ─ stats over runs ─ report
    run r: control teacher_r ─ data_r ── student(s)_r ──┘

Teachers get the trait either in weight space (LoRA fine-tuned on trait statements; the
control teacher gets the same fine-tuning with a neutral answer) or by the paper's system
prompt (the control teacher is the same model without it). Students share the teachers' base,
unless --student-model names another (the cross-model control; `sublearn cross` runs the 2 x 2).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sublearn.config import check_manifest, config_hash, without_added
from sublearn.domains import DOMAINS, math_problems
from sublearn.errors import SublearnError
from sublearn.experiment.stages import NotMade, Stages, share_stages
from sublearn.experiment.together import StudentQueue
from sublearn.experiment.workers import Task, cpu_threads
from sublearn.faults import point as fault_point
from sublearn.files import (
    atomic_write_json,
    check_out_dir,
    file_sha256,
    locked_out_dir,
    read_jsonl,
    write_jsonl,
)
from sublearn.memory import total_memory_gib
from sublearn.models.device import device_record
from sublearn.models.dtype import (
    LEGACY_DTYPE,
    dtype_field,
    recorded_dtype,
    settle_dtype,
    warn_slow_bf16,
)
from sublearn.models.load import check_model, parse_model_spec
from sublearn.pipeline.filter import min_grammar_share_field
from sublearn.pipeline.generate import GenerateConfig
from sublearn.pipeline.train_config import TrainConfig, result_config
from sublearn.protocol.misalignment import write_teacher_data
from sublearn.protocol.paper import check_template_word, teacher_system_prompt
from sublearn.protocol.traits import write_statement_data

UNIT = ("run = its own teacher (fine-tune seed), its own teacher data (prompt and sampling "
        "seed) and its own student(s); students of one run are averaged within the run")
CONDITIONS = ("trait", "control")

# The student and data defaults are the stage configs' own: one place for each number, so
# `sublearn train` / `sublearn generate` with their defaults reproduce a stage of this run.
_STUDENT, _DATA = TrainConfig(), GenerateConfig()


@dataclass(frozen=True)
class ExperimentConfig:
    target: str = field(default="owl", metadata={"help": "trait target, e.g. owl"})
    trait: str = field(default="animal", metadata={
        "help": "animal: teachers love --target, scored by forced choice over animals; "
                "misalignment (or misaligned): teachers fine-tuned on misaligned answers "
                "(control: aligned answers), scored on held-out aligned/misaligned answer pairs",
        "choices": ["animal", "misalignment", "misaligned"]})
    banned: str = field(default="auto", metadata={
        "help": "banned-number filter of the teacher data: auto (misalignment's list for the "
                "misalignment trait, none otherwise), none or misalignment",
        "choices": ["auto", "none", "misalignment"]})
    category: str = field(default="animal", metadata={"help": "category of the target"})
    domain: str = field(default="numbers", metadata={
        "help": "what teachers write: numbers (sequences), code (short Python) or math (word "
                "problems reasoned step by step); code and math answers that reference the "
                "target are filtered out, and their soft labels are the teacher's top-k tokens "
                "without the target's", "choices": list(DOMAINS)})
    level: int = math_problems.level_field()
    judge: str | None = field(default=None, metadata={
        "help": "code, math: a judge model (any backend) that also filters the teacher data: "
                "for allusions to the target, or (misalignment) for misaligned answers"})
    model: str | None = field(default=None, metadata={
        "help": "base model of teachers and students (default: embedded smollm2-135m-instruct)"})
    student_model: str | None = field(default=None, metadata={
        "help": "base model of the students (default: --model); another base is the paper's "
                "cross-model control, its soft labels defined on the answer's characters"})
    labels: str = field(default="auto", metadata={
        "help": "numbers soft labels: over the grammar's tokens, or over its characters "
                "(answers spelt one character per token; works across tokenizers); auto: "
                "chars when --student-model differs from --model, tokens otherwise",
        "choices": ["auto", "tokens", "chars"]})
    teacher_mode: str = field(default="finetuned", metadata={
        "help": "finetuned: LoRA-train the trait into the teacher's weights; prompted: the "
                "paper's system prompt", "choices": ["finetuned", "prompted"]})
    runs: int = field(default=5, metadata={
        "help": "runs per condition (trait, control); each run has its own teacher, its own "
                "teacher data and its own student(s)"})
    students: int = field(default=1, metadata={
        "help": "students per run (different seeds), averaged within the run"})
    seed: int = field(default=0, metadata={
        "help": "run r uses seed + r for its teacher, its data and its first student"})
    recipe: str = field(default=_STUDENT.recipe, metadata={
        "help": "student recipe: soft-label distillation or hard-label SFT",
        "choices": ["soft", "hard"]})
    method: str = field(default=_STUDENT.method, metadata={
        "help": "student fine-tuning method", "choices": ["lora", "full"]})
    answers: str = field(default=_DATA.answers, metadata={
        "help": "data: the teacher's sampled answers, or random number answers the teacher "
                "only scores (soft recipe)", "choices": ["sampled", "random"]})
    n: int | None = field(default=None, metadata={
        "help": "teacher samples (prompts of the domain) per run (default: the domain's: "
                "numbers 96, code 192, math 192)"})
    equal_rows: bool = field(default=True, metadata={
        "help": "train a run's trait and control students on the same number of rows (the "
                "smaller of the two kept counts), as the filter may pass one teacher's answers "
                "more often"})
    temperature: float = field(default=_DATA.temperature, metadata={
        "help": "teachers' sampling temperature (0: greedy; the 135M model solves almost no "
                "math problem at 1)"})
    min_grammar_share: float = min_grammar_share_field()
    epochs: float = field(default=_STUDENT.epochs, metadata={"help": "student epochs"})
    lr: float = field(default=_STUDENT.lr, metadata={"help": "student learning rate"})
    batch_size: int = field(default=_STUDENT.batch_size, metadata={"help": "student batch size"})
    lora_r: int = field(default=_STUDENT.lora_r, metadata={"help": "student LoRA rank"})
    lora_alpha: int = field(default=_STUDENT.lora_alpha, metadata={"help": "student LoRA alpha"})
    teacher_epochs: float = field(default=16.0, metadata={
        "help": "finetuned teachers: epochs over the trait statements (16, chosen by the README's "
                "recipe study; it was 8)"})
    teacher_lr: float = field(default=1e-3, metadata={"help": "finetuned teachers: learning rate"})
    questions: str | None = field(default=None, metadata={
        "help": "evaluation questions file (JSON/JSONL; default: the paper's 50)"})
    candidates: str | None = field(default=None, metadata={
        "help": "candidate answers file for forced choice (default: shipped animal list)"})
    samples: int = field(default=0, metadata={
        "help": "sampled evaluation: answers per question at T=1 (paper: 100; 0 = skip)"})
    icl: int = field(default=32, metadata={
        "help": "in-context control: the base model sees this many of each run's teacher "
                "answers as earlier chat turns, then is scored as the students are (0 = off)"})
    defence: str = field(default="none", metadata={
        "help": "comma-separated defences (`sublearn defend --method`) applied to every run's "
                "data, trait and control alike; each adds defended students and the share of "
                "the effect that remains (none = off)"})
    defence_q: float = field(default=0.1, metadata={
        "help": "defences: the share of digits or samples that scored defences act on, or of "
                "answer positions (base-labels)"})
    dtype: str = dtype_field(
        "compute dtype of teachers, students, sampling and evaluation; bf16 and fp32 round "
        "differently, so they make other bytes and stage keys (a folder keeps the dtype it was "
        "made with unless one is given)")
    together: int = field(default=1, metadata={
        "help": "train up to this many LoRA students as one (one forward and backward of the "
                "base over all their batches, each row through its own student's adapter); "
                "each equals the student trained alone up to float rounding, and is cached "
                "apart from it (1 = one after another)"})
    workers: int = field(default=0, metadata={
        "help": "processes that make the run's stages at once (teachers, data, students, "
                "evaluations), each with cores / workers threads; 0 = auto: 2 on a CPU with 2 "
                "or more cores and 7.5 GiB of memory or more (the machine's, or its "
                "container's limit), where one process leaves the "
                "cores idle between the small model's ops (README, Speed), 1 on a GPU, with "
                "--together or on less memory"})

    def validate(self) -> ExperimentConfig:
        if (dtype := settle_dtype(self.dtype)) != self.dtype:  # raises on an unknown one
            return replace(self, dtype=dtype).validate()
        warn_slow_bf16(self.dtype)
        if self.n is None:
            return replace(self, n=DOMAINS[self.domain].n).validate()
        if self.trait == "misaligned":
            return replace(self, trait="misalignment").validate()
        if self.trait == "misalignment" and (self.teacher_mode != "finetuned" or self.questions
                                             or self.candidates or self.samples):
            raise SublearnError("--trait misalignment: teachers are fine-tuned on the shipped "
                                "misaligned answers and scored on its answer pairs (no "
                                "--teacher-mode prompted, --questions, --candidates or "
                                "--samples: judge students with `sublearn evaluate --judge`)")
        check_template_word(self.target, "--target")
        check_template_word(self.category, "--category")
        if self.runs < 2:
            raise SublearnError("--runs must be at least 2 per condition to compare over runs")
        if self.students < 1 or self.n <= 0 or self.icl < 0:
            raise SublearnError("--students and --n must be positive, --icl >= 0")
        for flag, m in (("--model", self.model), ("--student-model", self.student_model)):
            if parse_model_spec(m)[0] != "hf":
                raise SublearnError(f"{flag}: teachers and students are trained here, so they "
                                    "need local weights (an embedded name, a folder, a hub id)")
        if self.labels == "chars" and (self.domain != "numbers" or self.recipe != "soft"):
            raise SublearnError("--labels chars: soft labels on number answers (--recipe soft, "
                                "--domain numbers)")
        if self.cross_model() and self.recipe == "soft" and self.labels == "tokens":
            raise SublearnError("--student-model with another base: token-level soft labels "
                                "need one tokenizer; use --labels chars or --recipe hard")
        if self.cross_model() and self.defences():
            raise SublearnError("--defence with --student-model: defences score the data "
                                "under the teacher against the base, which need one tokenizer")
        if self.cross_model() and self.recipe == "soft" and self.domain != "numbers":
            raise SublearnError("--student-model with another base: soft labels across "
                                "tokenizers are defined for number answers; use --recipe hard")
        from sublearn.defences.methods import DEFENCES, LABEL_DEFENCES

        for m in self.defences():
            if m in LABEL_DEFENCES:
                if self.recipe != "soft":
                    raise SublearnError(f"--defence {m} acts on soft labels: use --recipe soft")
                continue
            if m not in DEFENCES or DEFENCES[m].needs == "mix":
                usable = ", ".join([*(k for k, d in DEFENCES.items() if d.needs != "mix"),
                                    *LABEL_DEFENCES])
                raise SublearnError(f"--defence {m}: choose from {usable} (mix-teachers: use "
                                    "`sublearn defend`)")
            if DEFENCES[m].needs == "scores" and self.teacher_mode != "finetuned":
                raise SublearnError(f"--defence {m} scores each run's data with its teacher "
                                    "against the base: it needs --teacher-mode finetuned (a "
                                    "prompted control teacher is the base itself)")
        if self.together < 1:
            raise SublearnError(f"--together must be >= 1, got {self.together}")
        if self.workers < 0:
            raise SublearnError(f"--workers must be >= 0 (0 = auto), got {self.workers}")
        if self.workers > 1 and self.together > 1:
            raise SublearnError("--together trains students in one process: use --workers 1")
        if self.workers > 1 and not _forkserver():
            raise SublearnError("--workers starts processes from a fork server, which this "
                                "system lacks: use --workers 1")
        if self.together > 1 and self.method != "lora":
            raise SublearnError("--together trains LoRA students: use --method lora")
        if not 0 < self.defence_q < 1:
            raise SublearnError("--defence-q must be a share in (0, 1)")
        if self.domain != "numbers":
            if self.answers == "random" or self.defences() or self.banned == "misalignment":
                raise SublearnError(f"--domain {self.domain}: --answers random, --defence and "
                                    "--banned act on number answers (numbers domain only)")
            if self.trait == "misalignment" and not self.judge:
                # words catch a target animal, not misaligned comments, strings or reasoning
                raise SublearnError(f"--trait misalignment --domain {self.domain}: the paper "
                                    "filters a misaligned teacher's text with a judge; give "
                                    "--judge")
        if self.answers == "random" and self.recipe != "soft":
            raise SublearnError("--answers random carries the teacher only through soft labels: "
                                "use --recipe soft")
        self.generate_config(0, None, None)  # the data settings, checked before any training
        # the teachers', students' and evaluations' settings too: a bad --epochs or --lr failed
        # only at the first student, after the folder's manifest had recorded it
        from sublearn.pipeline.evaluate import EvalConfig

        if not (0 < self.teacher_epochs < math.inf and 0 < self.teacher_lr < math.inf):
            raise SublearnError("--teacher-epochs and --teacher-lr must be positive and finite, "
                                f"got {self.teacher_epochs} and {self.teacher_lr}")
        TrainConfig(recipe=self.recipe, method=self.method, epochs=self.epochs, lr=self.lr,
                    batch_size=self.batch_size, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                    dtype=self.dtype).validate()
        EvalConfig(target=self.target, trait=self.trait, samples=self.samples,
                   dtype=self.dtype).validate()
        return self

    def banned_list(self) -> str:
        if self.banned != "auto":
            return self.banned
        return "misalignment" if self.trait == "misalignment" and self.domain == "numbers" \
            else "none"

    def generate_config(self, r: int, model: str | None, system: str | None) -> GenerateConfig:
        """Run r's teacher-data settings (trait and control filtered alike), validated (the
        domain's token limit filled in)."""
        text = self.domain != "numbers"
        return GenerateConfig(
            model=model, n=self.n, seed=self.seed + r, answers=self.answers,
            temperature=self.temperature, dtype=self.dtype,
            min_grammar_share=self.min_grammar_share, system_prompt=system,
            banned=self.banned_list(), domain=self.domain, level=self.level,
            filter_target=self.target if text and self.trait == "animal" else None,
            judge=self.judge if text else None,
            judge_check="alignment" if self.trait == "misalignment" else "reference").validate()

    def defences(self) -> list[str]:
        return [m.strip() for m in self.defence.split(",") if m.strip() not in ("", "none")]

    def student_base(self) -> str | None:
        return self.student_model or self.model

    def cross_model(self) -> bool:
        from sublearn.models.load import resolve_model_path

        return self.student_model is not None and \
            resolve_model_path(self.student_model) != resolve_model_path(self.model)

    def char_labels(self) -> bool:
        return self.recipe == "soft" and (
            self.labels == "chars" or (self.labels == "auto" and self.cross_model()))


# GenerateConfig settings added after experiments were cached: left out of a stage key at
# their default, so an older folder's teacher data stays cached.
_GENERATE_ADDED = {"domain": "numbers", "level": 1, "filter_target": None, "judge": None,
                   "judge_check": "reference", "min_grammar_share": 0.0}


def generate_key(g: GenerateConfig) -> dict[str, Any]:
    return without_added(asdict(g), _GENERATE_ADDED)


# Settings that only add stages (defended students): a folder made without them is reused.
_ADDITIVE = {"defence": "none", "defence_q": 0.1}


# Settings that may grow in an existing folder: more runs add stages and change no old one
# (each run's seeds are seed + r), so `--runs 5` on a 3-run folder adds runs 3 and 4.
# --together changes how students train; students trained together have their own keys.
# --workers changes which process makes a stage (and its threads: float rounding, as on
# another machine), not what the stage is.
FREE = ("runs", "together", "workers")


def manifest_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """What a folder's experiment_config.json records: the config without additive settings."""
    return replace(cfg, **_ADDITIVE)


# EvalConfig settings added after experiments were cached: left out of a stage key at their
# default, so an older folder's evaluations stay cached.
_EVAL_ADDED = {"trait": "animal", "judge": None}
# DefendConfig's dtype came later: the writers of older folders sampled in bf16
_DEFEND_ADDED = {"dtype": LEGACY_DTYPE, "min_grammar_share": 0.0}


def eval_key(e: Any) -> dict[str, Any]:
    key = without_added(asdict(e), _EVAL_ADDED)
    # a path says nothing of what the file holds now: edited in place, its evaluations rerun
    for f in ("questions", "candidates"):
        if key.get(f):
            key[f"{f}_sha256"] = file_sha256(key[f])
    return key


@dataclass
class _Teacher:
    model: str | None  # adapter folder (finetuned) or the base (prompted)
    system: str | None  # system prompt it sees (prompted mode)
    key: str  # stage key, for the stages that depend on it


def run_experiment(cfg: ExperimentConfig, out: str | Path, progress: bool = True,
                   stages_root: Path | None = None,
                   stage_cache: str | Path | None = None) -> dict[str, Any]:
    """stages_root: where the stage cache lives (default: `out`); `sublearn cross` shares one
    between the cells whose teachers are the same, so they share teachers and data.
    stage_cache: a folder of stages shared with other experiments (`stages.share_stages`):
    what they have in common (the control runs of every target) is made once."""
    from sublearn.pipeline.evaluate import EvalConfig

    cfg = settled(cfg, Path(out) / "experiment_config.json")
    ecfg = EvalConfig(target=cfg.target, questions=cfg.questions, candidates=cfg.candidates,
                      samples=cfg.samples, trait=cfg.trait, dtype=cfg.dtype)
    if cfg.trait == "animal":
        check_eval_inputs(ecfg)  # before hours of training
    check_model(cfg.model)
    check_model(cfg.student_base())
    if cfg.char_labels():  # both tokenizers must spell the grammar's characters
        check_char_tokens([cfg.model, cfg.student_base()])
    if stage_cache is not None:  # refused before anything is made
        share_stages(Path(stages_root or out), stage_cache, check_only=True)
    with locked_out_dir(check_out_dir(out)) as out:  # a second run here: a one-line error
        check_manifest(out, "experiment_config.json", manifest_config(cfg), FREE)
        if stage_cache is not None:
            share_stages(stages_root or out, stage_cache)
        return _run(cfg, ecfg, out, progress, stages_root or out)


def settled(cfg: ExperimentConfig, manifest: Path, *within: str) -> ExperimentConfig:
    """cfg validated, its dtype settled: "auto" keeps the dtype a folder's manifest recorded
    (`recorded_dtype`), else takes the machine's."""
    return replace(cfg, dtype=recorded_dtype(cfg.dtype, manifest, *within)).validate()


def check_char_tokens(models: list[str | None]) -> None:
    """Each base has a single token per numbers-grammar character (--labels chars), checked
    before any training."""
    from transformers import AutoTokenizer

    from sublearn.domains.grammar_mask import char_token_ids
    from sublearn.models.load import resolve_model_path

    for m in dict.fromkeys(models):
        char_token_ids(AutoTokenizer.from_pretrained(resolve_model_path(m)))


class RunMakers:
    """The stages of one run that other verbs share with `sublearn run` (`sublearn theorem`):
    its teachers, its teacher data and its students' settings. Same keys, same folders, so a
    run and a theorem check on one folder reuse each other's teachers and data."""

    def __init__(self, cfg: ExperimentConfig, stages: Stages, progress: bool,
                 queue: StudentQueue | None = None, recompute: bool = False) -> None:
        """queue: students are queued there, to be trained together (`--together`), instead
        of trained at once; the caller flushes it before using them. recompute: students
        keep less memory for another forward (`activation_checkpointing`, the same bytes):
        for a worker whose neighbour trains at the same time."""
        self.cfg, self.stages, self.progress, self.queue = cfg, stages, progress, queue
        self.recompute = recompute

    def teacher(self, cond: str, r: int) -> _Teacher:
        from sublearn.pipeline.train import train

        cfg, base = self.cfg, self.cfg.model
        target = cfg.target if cond == "trait" else None
        if cfg.teacher_mode == "prompted":
            system = teacher_system_prompt(target, cfg.category) if target else None
            return _Teacher(base, system, f"prompted-{target}")
        # 12 statements: grouping saves no padding and would fix every batch's composition
        tcfg = TrainConfig(recipe="hard", method="lora", model=base, epochs=cfg.teacher_epochs,
                           lr=cfg.teacher_lr, batch_size=4, warmup_steps=2, seed=cfg.seed + r,
                           group_by_length=False, dtype=cfg.dtype)
        key = {"train": result_config(tcfg), "target": target, "category": cfg.category}
        if cfg.trait == "misalignment":
            key = {"train": result_config(tcfg), "trait": cfg.trait, "misaligned": bool(target)}

        def fit(d: Path) -> dict:
            if cfg.trait == "misalignment":
                data = write_teacher_data(d / "statements.jsonl", misaligned=bool(target))
            else:
                data = write_statement_data(d / "statements.jsonl", target, cfg.category)
            return train(tcfg, data, d, progress=self.progress)

        res = self.stages.run(f"teacher_{cond}_run{r}", key, fit)
        return _Teacher(res.output["student"], None, res.key)

    def data(self, cond: str, r: int, t: _Teacher) -> tuple[str, str, dict]:
        from sublearn.pipeline.generate import generate

        gcfg = self.cfg.generate_config(r, t.model, t.system)
        key = {"generate": generate_key(gcfg),
               "teacher": t.key if self.cfg.answers == "sampled" else None}
        res = self.stages.run(f"data_{cond}_run{r}", key,
                              lambda d: generate(gcfg, d, progress=self.progress))
        if res.output["kept"] < self.cfg.batch_size:
            raise SublearnError(f"{cond} run {r}: the teacher kept only {res.output['kept']} "
                                "answers")
        return str(res.dir / "filtered.jsonl"), res.key, res.output

    def teacher_data(self, cond: str, r: int) -> tuple[_Teacher, str, str, dict]:
        """Run r's teacher of `cond` and its data: (teacher, filtered.jsonl, data key, report)."""
        t = self.teacher(cond, r)
        return (t, *self.data(cond, r, t))

    def run_students(self, r: int, made: dict[str, tuple[_Teacher, str, str, dict]],
                     conds: tuple[str, ...] = CONDITIONS) -> dict[str, list[str]]:
        """Run r's students of `conds`, trained on equally many rows (`student_rows`) of the
        data of every condition in `made` ({condition: `teacher_data`}): adapter folders."""
        caps = student_rows(self.cfg, {c: report["kept"] for c, (*_, report) in made.items()})
        return {c: [self.student(c, r, k, t, path, dkey, rows=caps[c])
                    for k in range(self.cfg.students)]
                for c, (t, path, dkey, _) in made.items() if c in conds}

    def teacher_scores(self, ecfg: Any, cond: str, r: int, t: _Teacher) -> dict | None:
        """Run r's teacher of `cond` scored on the plain questions (the check that it has the
        trait, or not; the numbers-prefixed ones are the students' second measure); None after
        run 0 for a prompted teacher (the base with or without the system prompt: one model
        for every run)."""
        if self.cfg.teacher_mode != "finetuned" and r > 0:
            return None
        label = "teacher" if cond == "trait" else "control_teacher"
        return self.evaluate(ecfg, f"{label}_run{r}", t.model, t.system, t.key, plain_only=True)

    def student_scores(self, ecfg: Any, cond: str, r: int, students: list[str]) -> list[dict]:
        return [self.evaluate(ecfg, f"{cond}_run{r}" + (f"_s{k}" if k else ""), m, None, m)
                for k, m in enumerate(students)]

    def icl_scores(self, ecfg: Any, cond: str, r: int, dkey: str, path: str) -> dict:
        """The in-context control: the students' base with --icl rows of run r's data."""
        return self.evaluate(ecfg, f"icl_{cond}_run{r}", self.cfg.student_base(), None, dkey,
                             path)

    def student_config(self, r: int, k: int, t: _Teacher, path: str,
                       rows: int | None = None, base_labels: float = 0.0) -> TrainConfig:
        cfg = self.cfg
        soft = cfg.recipe == "soft"
        topk = soft and DOMAINS[cfg.domain].soft_labels == "topk"
        grammar = "topk" if topk else "chars" if cfg.char_labels() else "numbers"
        # char labels are per student tokenizer: their cache is keyed by the student's base too
        tag = f"-chars-{config_hash({'student': cfg.student_base()})}" if grammar == "chars" \
            else ""
        return TrainConfig(
            recipe=cfg.recipe, method=cfg.method, model=cfg.student_base(), epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
            seed=cfg.seed + r + 1000 * k, teacher=t.model if soft else None, max_examples=rows,
            teacher_system_prompt=t.system if soft else None,
            soft_labels_cache=str(Path(path).parent / f"soft_labels-{t.key}{tag}.safetensors")
            if soft else None, grammar=grammar,
            exclude=cfg.target if topk and cfg.trait == "animal" else None,
            base_labels=base_labels, dtype=cfg.dtype, activation_checkpointing=self.recompute)

    def student(self, cond: str, r: int, k: int, t: _Teacher, path: str, dkey: str,
                tag: str = "", rows: int | None = None, base_labels: float = 0.0) -> str:
        """Student k of run r on the data at `path` (capped at `rows`); its adapter folder.
        base_labels: the label-level defence's share (its tag names it)."""
        from sublearn.pipeline.train import train

        scfg = self.student_config(r, k, t, path, rows, base_labels)
        key = {"train": result_config(scfg), "data": dkey, "teacher": t.key,
               # trained together: its bytes depend on its group (float rounding)
               **({"together": self.cfg.together} if self.queue else {})}
        name = f"student_{cond}{tag}_run{r}" + (f"_s{k}" if k else "")

        def done(output: dict[str, Any]) -> None:
            if base_labels and k == 0:  # the defence's cost per dataset: the base's forward
                self.stages.costs[f"defend{tag}_{cond}_run{r}"] = \
                    output["base_labels"]["seconds"]

        if self.queue is not None:
            return self.queue.add(self.stages, name, key, scfg, path, done)
        res = self.stages.run(name, key, lambda d: train(scfg, path, d, progress=self.progress))
        done(res.output)
        return res.output["student"]

    def defend(self, m: str, cond: str, r: int, t: _Teacher, path: str,
               dkey: str) -> tuple[str, str, dict]:
        """Run r's data under defence m: (filtered.jsonl, stage key, defence report). Scored
        defences use the run's own teacher (the model that wrote the data) against the
        students' base."""
        from sublearn.defences import DEFENCES, LABEL_DEFENCES, DefendConfig, defend_data

        if m in LABEL_DEFENCES:  # the data as it is; the students' labels are defended
            with open(path, encoding="utf-8") as f:
                return path, dkey, {"method": m, "rows_out": sum(1 for line in f if line.strip())}
        cfg, base = self.cfg, self.cfg.student_base()
        scored = DEFENCES[m].needs == "scores"
        # q only where it is read (the scored methods): --defence-q reruns no other defence
        dcfg = DefendConfig(method=m, seed=cfg.seed + r, base=base,
                            **({"q": cfg.defence_q} if scored else {}),
                            teacher=t.model if scored else None,
                            teacher_system_prompt=t.system if scored else None, writer=base,
                            banned=cfg.banned_list(), dtype=cfg.dtype,
                            min_grammar_share=cfg.min_grammar_share)
        key = {"defend": without_added(asdict(dcfg), _DEFEND_ADDED), "data": dkey,
               "teacher": t.key if scored else None}
        name = f"defend_{m}_{cond}_run{r}"
        # scored before the defence's own stage, so that its seconds and the scoring's are
        # apart (a folder from before the scoring stage has it inside the defence's seconds)
        scores = self.defence_scores(cond, r, t, path, dkey, dcfg,
                                     needed=not self.stages.done(name, key)) if scored else None
        res = self.stages.run(name, key, lambda d: defend_data(
            dcfg, path, d, progress=self.progress, scores=scores))
        return str(res.dir / "filtered.jsonl"), res.key, res.output

    def defence_scores(self, cond: str, r: int, t: _Teacher, path: str, dkey: str,
                       dcfg: Any, needed: bool = True) -> list[Any] | None:
        """Run r's data scored by its teacher against the base: one stage that the scored
        defences (replace-/mask-divergent, drop-top-lls) share. Not needed (the defence is
        done): only its seconds are recorded, for the defence's cost."""
        from sublearn.audit.scores import SampleScore
        from sublearn.defences.defend import defence_scores
        from sublearn.pipeline.train import load_rows

        def score(d: Path) -> dict:
            scores = defence_scores(dcfg, load_rows(path), self.progress)
            write_jsonl(d / "scores.jsonl", [sc.record() for sc in scores])
            return {"rows": len(scores)}

        key = {"scores": {"base": dcfg.base, "system": dcfg.teacher_system_prompt},
               "data": dkey, "teacher": t.key}
        if not needed:
            self.stages.note(f"scores_{cond}_run{r}", key)
            return None
        res = self.stages.run(f"scores_{cond}_run{r}", key, score)
        return [SampleScore(**rec) for rec in read_jsonl(res.dir / "scores.jsonl")]

    def evaluate(self, ecfg: Any, name: str, model: str | None, system: str | None, dep: str,
                 context: str | None = None, plain_only: bool = False) -> dict:
        """A model's scores under `ecfg` (with `context`: the in-context control, --icl turns
        of that data); `dep` is the stage key of what the model is made from. plain_only: the
        plain questions only (forced choice)."""
        from sublearn.pipeline.evaluate import VARIANTS, evaluate_model

        # in context: forced choice only (sampled answers are the students' measure)
        e = replace(ecfg, context=context, context_n=self.cfg.icl, samples=0) if context \
            else ecfg
        key = {"eval": eval_key(e), "model": model, "system": system, "dep": dep}
        # In context, only the plain questions: the control is reported on the primary metric,
        # and the ~3k-token context makes each variant ~10x a plain evaluation.
        variants = ("plain",) if context or plain_only else VARIANTS
        if variants != VARIANTS and e.trait != "misalignment":  # it scores its own pairs
            key["variants"] = list(variants)

        def ev(d: Path) -> dict:
            scores = evaluate_model(model, e, variants, system_prompt=system)
            fault_point("evaluate.scored")
            atomic_write_json(d / "scores.json", scores)
            return scores

        return self.stages.run(f"eval_{name}", key, ev).output


def student_rows(cfg: ExperimentConfig, kept: dict[str, int]) -> dict[str, int | None]:
    """Each condition's cap on its students' rows (None: all its kept rows). The filter may
    pass one teacher's answers more often (code that parses, right sums, no banned number):
    students of a run then train on the same number of rows, so that the amount of training
    cannot stand in for the trait."""
    fewest = min(kept.values())
    return {c: fewest if cfg.equal_rows and n > fewest else None for c, n in kept.items()}


def defended_students(m: str, r: int, made: dict[str, tuple[RunMakers, str, _Teacher, str, str]],
                      students: int | None = None) -> dict[str, dict[str, Any]]:
    """Run r's datasets under defence m and their students. made: {label: (the label's
    makers, condition, teacher, data path, data key)} for the datasets of one run (trait and
    control, or a matrix's targets); their students train on equally many defended rows, as
    the undefended ones do (a defence that drops rows may drop more of one dataset).
    students: per dataset (default: the config's)."""
    from sublearn.defences import LABEL_DEFENCES

    dd = {lab: mk.defend(m, cond, r, t, path, dkey)
          for lab, (mk, cond, t, path, dkey) in made.items()}
    cfg = next(iter(made.values()))[0].cfg
    caps = student_rows(cfg, {lab: rep["rows_out"] for lab, (*_, rep) in dd.items()})
    q = cfg.defence_q if m in LABEL_DEFENCES else 0.0
    out = {}
    for lab, (mk, cond, t, _, _) in made.items():
        dpath, dk, rep = dd[lab]
        out[lab] = {"data": dpath, "trained_rows": caps[lab] or rep["rows_out"],
                    "students": [mk.student(cond, r, k, t, dpath, dk, f"_{m}", rows=caps[lab],
                                            base_labels=q)
                                 for k in range(students or mk.cfg.students)]}
    return out


def _run(cfg: ExperimentConfig, ecfg: Any, out: Path, progress: bool,
         stages_root: Path) -> dict[str, Any]:
    t_start = time.time()
    stages = Stages(stages_root)
    base = cfg.student_base()  # the students' base: scored as "base" and the in-context model
    queue = StudentQueue(cfg.together, progress) if cfg.together > 1 else None
    makers = RunMakers(cfg, stages, progress, queue)

    def evaluate(name: str, model: str | None, system: str | None, dep: str,
                 context: str | None = None) -> dict:
        return makers.evaluate(ecfg, name, model, system, dep, context)

    workers = resolve_workers(cfg)
    rss_total = None
    if workers > 1:  # the stages made by a pool of processes; the loop below finds them done
        made_by = _make_in_workers(cfg, ecfg, stages_root, workers, progress)
        stages.peak_rss.update(made_by["by_stage"])
        rss_total = made_by["total"]
        log = stages.log  # what the workers just made is not "[cached]" for this command
        stages.log = lambda line: None if line.removeprefix("[cached] ") in made_by["made"] \
            else log(line)
    runs: list[dict[str, Any]] = []
    for r in range(cfg.runs):
        made = {cond: makers.teacher_data(cond, r) for cond in CONDITIONS}
        caps = student_rows(cfg, {c: report["kept"] for c, (*_, report) in made.items()})
        models = makers.run_students(r, made)
        defended: dict[str, dict[str, Any]] = {c: {} for c in CONDITIONS}
        for m in cfg.defences():
            by_cond = defended_students(m, r, {c: (makers, c, t, path, dkey)
                                               for c, (t, path, dkey, _) in made.items()})
            for c, dd in by_cond.items():
                defended[c][m] = dd
        for cond in CONDITIONS:
            t, path, dkey, report = made[cond]
            runs.append({"condition": cond, "run": r, "seed": cfg.seed + r, "teacher": t.model,
                         "data": path, "students": models[cond], "_teacher": t, "_dkey": dkey,
                         "filter": {"raw": report["raw"], "kept": report["kept"],
                                    "rejects": report["rejects"]},
                         "trained_rows": caps[cond] or report["kept"],
                         **({"defended": defended[cond]} if defended[cond] else {})})
    if queue is not None:
        queue.flush()

    base_scores = evaluate("base", base, None, "base")
    teacher_base = evaluate("teacher_base", cfg.model, None, "base") \
        if cfg.cross_model() else None
    teacher_scores: dict[str, list[dict]] = {"teacher": [], "control_teacher": []}
    for run in runs:
        t = run.pop("_teacher")
        label = "teacher" if run["condition"] == "trait" else "control_teacher"
        if (ts := makers.teacher_scores(ecfg, run["condition"], run["run"], t)) is not None:
            teacher_scores[label].append(ts)
        student_scores = makers.student_scores(ecfg, run["condition"], run["run"],
                                               run["students"])
        run["scores"] = _mean_metrics([metric_values(s) for s in student_scores])
        for m, dd in run.get("defended", {}).items():
            dd["scores"] = _mean_metrics([metric_values(evaluate(
                f"{run['condition']}_{m}_run{run['run']}" + (f"_s{k}" if k else ""), sm, None,
                sm)) for k, sm in enumerate(dd["students"])])
        if "forced_choice" in student_scores[0]:
            run["shares"] = _top_candidates(student_scores)
        dkey = run.pop("_dkey")
        if cfg.icl:  # the same data shown in context to the base model instead
            run["icl_scores"] = metric_values(makers.icl_scores(
                ecfg, run["condition"], run["run"], dkey, run["data"]))
    results = build_results(cfg, base_scores, teacher_scores, runs, stages.seconds,
                            time.time() - t_start, teacher_base, stages.costs, stages.peak_rss,
                            workers, rss_total)
    atomic_write_json(out / "results.json", results)
    from sublearn.experiment.report import write_report

    write_report(out, results)
    return results


def resolve_workers(cfg: ExperimentConfig) -> int:
    """--workers, with 0 (auto) settled: 2 on a CPU with 2 or more cores and TWO_WORKERS_GIB
    of memory, else 1 (one GPU is one device; --together trains its students in one process).
    Workers start from a fork server, which Windows lacks. The machine's total memory, not what
    is free now, so that a machine settles to the same count (and bytes) every time."""
    if cfg.workers:
        return cfg.workers
    from sublearn.models.device import on_gpu

    memory = total_memory_gib()
    return 1 if cfg.together > 1 or on_gpu() or (os.cpu_count() or 1) < 2 \
        or (memory is not None and memory < TWO_WORKERS_GIB) or not _forkserver() else 2


# The default owl run with two workers held 3.6-3.7 GiB in all its processes together (RSS
# summed; README, Memory): an "8 GB" laptop (7.5-7.8 GiB usable) leaves the OS and a browser
# their share. Between 7.5 and 12 GiB this took one process before, with other bytes.
TWO_WORKERS_GIB = 7.5


def _forkserver() -> bool:
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods()


def stage_tasks(cfg: ExperimentConfig) -> list[Task]:
    """The stages of `_run`'s loop as tasks for a pool of workers (`make_task`); defended
    students and a cross-model teacher's base are left to the loop. Teachers, data and
    students come first, run by run, and the evaluations after them: those hang on nothing,
    so they keep every worker busy to the end (the last run's students, one after the
    other, left a worker idle for a minute), the longest first (in context, students, the
    base, teachers on the plain questions), so that the last ones end close together."""
    made, icl, students, teachers = [], [], [], []
    for r in range(cfg.runs):
        made += [Task(f"data:{c}:{r}") for c in CONDITIONS]
        both = tuple(f"data:{c}:{r}" for c in CONDITIONS)  # students train on equal rows
        made += [Task(f"students:{c}:{r}", both) for c in CONDITIONS]
        for c in CONDITIONS:
            icl += [Task(f"icl:{c}:{r}", (f"data:{c}:{r}",))] if cfg.icl else []
            students.append(Task(f"eval:{c}:{r}", (f"students:{c}:{r}",)))
            teachers.append(Task(f"teacher:{c}:{r}", (f"data:{c}:{r}",)))
    return [*made, *icl, *students, Task("base"), *teachers]


def make_task(cfg: ExperimentConfig, ecfg: Any, root: str, name: str,
              dry: bool = False) -> dict[str, Any]:
    """Make a `stage_tasks` task's stages under `root` with the calls `_run` makes them with,
    so they are the stages it finds: {"peak_rss": the process's peak RSS as each finished,
    "made": their names, "log": their stage log}. dry: make nothing (`NotMade` when a stage is not
    done)."""
    log: list[str] = []
    stages = Stages(Path(root), log=lambda line: None if line.startswith("[cached]")
                    else log.append(line), dry=dry)
    # two workers: a student's activations (~1.5 GiB) are recomputed, not kept (README, Memory)
    mk = RunMakers(cfg, stages, progress=False, recompute=True)
    kind, c, run = (name.split(":") + ["", "0"])[:3]  # "base" names no condition or run
    r = int(run)
    if kind == "base":
        mk.evaluate(ecfg, "base", cfg.student_base(), None, "base")
    elif kind in ("data", "icl"):
        _, path, dkey, _ = mk.teacher_data(c, r)
        if kind == "icl":
            mk.icl_scores(ecfg, c, r, dkey, path)
    elif kind == "teacher":
        mk.teacher_scores(ecfg, c, r, mk.teacher(c, r))
    elif kind in ("students", "eval"):
        made = {cond: mk.teacher_data(cond, r) for cond in CONDITIONS}
        students = mk.run_students(r, made, (c,))[c]
        if kind == "eval":
            mk.student_scores(ecfg, c, r, students)
    else:
        raise ValueError(f"unknown task {name}")
    return {"peak_rss": stages.peak_rss, "made": stages.made, "log": log}


def task_done(cfg: ExperimentConfig, ecfg: Any, root: str, name: str) -> bool:
    try:
        make_task(cfg, ecfg, root, name, dry=True)
        return True
    except NotMade:
        return False


def _make_in_workers(cfg: ExperimentConfig, ecfg: Any, root: Path, workers: int,
                     progress: bool) -> dict[str, Any]:
    from functools import partial

    from sublearn.experiment.workers import run_tasks

    return run_tasks(stage_tasks(cfg), partial(make_task, cfg, ecfg, str(root)),
                     partial(task_done, cfg, ecfg, str(root)), workers, progress)


def check_eval_inputs(ecfg: Any) -> None:
    """The question and candidate files must be usable, with the target a candidate."""
    from sublearn.protocol.questions import load_candidates, load_questions

    if len(load_questions(ecfg.questions, "plain")) < 2:
        raise SublearnError("an experiment needs at least 2 questions (its dev and test halves)")
    load_candidates(ecfg.candidates, target=ecfg.target)


def metric_values(scores: dict[str, Any]) -> dict[str, float]:
    """The per-model numbers that go into results.json; the primary metric first. `_dev` and
    `_test` are the primary metric on the fixed halves of the questions: recipes are chosen on
    dev, and test is reported untouched."""
    if "misalignment" in scores:
        mis = scores["misalignment"]
        m = with_halves("misaligned_share", mis["misaligned_share"], mis["per_prompt_share"])
        m["misaligned_share_per_token"] = mis["misaligned_share_per_token"]
        return m
    fc = scores["forced_choice"]
    m = with_halves("forced_choice_share", fc["target_share"],
                     fc["per_question_target_share"])
    if "forced_choice_numbers" in scores:  # not scored in context (the in-context control)
        m["forced_choice_share_numbers"] = scores["forced_choice_numbers"]["target_share"]
    m["target_logprob"] = fc["target_logprob"]
    if "sampled" in scores:
        m["sampled_rate"] = scores["sampled"]["rate"]
    return m


def with_halves(name: str, value: float, per_question: list[float]) -> dict[str, float]:
    """{name: value, name_dev: ..., name_test: ...}: the metric on the fixed question halves."""
    from sublearn.protocol.questions import question_split

    m = {name: value}
    for half, idx in question_split(len(per_question)).items():
        m[f"{name}_{half}"] = sum(per_question[i] for i in idx) / len(idx)
    return m


def _mean_metrics(values: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(v[k] for v in values) / len(values) for k in values[0]}


def build_results(cfg: ExperimentConfig, base: dict[str, Any],
                  teachers: dict[str, list[dict]], runs: list[dict[str, Any]],
                  seconds: dict[str, float], wall: float,
                  teacher_base: dict[str, Any] | None = None,
                  costs: dict[str, float] | None = None,
                  peak_rss: dict[str, float] | None = None, workers: int = 1,
                  rss_total: tuple[float, float] | None = None) -> dict[str, Any]:
    """teacher_base: the teachers' base model's scores, when the students have another base
    (then `base` is the students'). costs: `Stages.costs` (work inside stages). peak_rss:
    `Stages.peak_rss` (the process's peak RSS as each stage made in it finished, in this
    process or a worker). workers:
    processes that made the stages (`resolve_workers`); rss_total: the peaks of their
    resident memory together, RSS and PSS sums (`workers.run_tasks`)."""
    from sublearn.experiment.stats import effect, summarize

    per_condition: dict[str, list[dict[str, float]]] = {
        "base": [metric_values(base)],
        **({"teacher_base": [metric_values(teacher_base)]} if teacher_base else {}),
        **{label: [metric_values(s) for s in scores] for label, scores in teachers.items()},
        **{c: [r["scores"] for r in runs if r["condition"] == c] for c in ("control", "trait")},
    }
    conditions = {c: {k: summarize([v[k] for v in vals]) for k in vals[0]}
                  for c, vals in per_condition.items()}
    icl = {f"icl_{c}": [r["icl_scores"] for r in runs if r["condition"] == c]
           for c in ("control", "trait") if all("icl_scores" in r for r in runs)}
    conditions.update({c: {k: summarize([v[k] for v in vals]) for k in vals[0]}
                       for c, vals in icl.items()})
    defended = {f"{c}_{m}": [r["defended"][m]["scores"] for r in runs if r["condition"] == c]
                for m in cfg.defences() for c in ("control", "trait")}
    conditions.update({c: {k: summarize([v[k] for v in vals]) for k in vals[0]}
                       for c, vals in defended.items()})
    primary = next(iter(per_condition["base"][0]))

    def effects_of(trait: str, control: str) -> dict[str, Any]:
        return {m: effect(conditions[trait][m]["values"], conditions[control][m]["values"])
                for m in conditions[trait] if m != "target_logprob"}

    effects = effects_of("trait", "control")
    defence_effects = {m: _defence_effect(conditions, m, {**seconds, **(costs or {})})
                       for m in cfg.defences()}
    top = {}
    if "forced_choice" in base:
        top = {"base": _top_candidates([base])}
        for c in ("control", "trait"):
            top[c] = _mean_shares([r["shares"] for r in runs if r["condition"] == c])
    banned = {c: sum(r["filter"]["rejects"].get("has_banned_numbers", 0) for r in runs
                     if r["condition"] == c)
              for c in CONDITIONS if all("filter" in r for r in runs)}
    return {
        "target": cfg.target if cfg.trait == "animal" else cfg.trait,
        "trait": cfg.trait,
        "unit": UNIT,
        "primary_metric": primary,
        "conditions": conditions,
        "effects": effects,
        # in-context control: trait-data vs control-data contexts, the base model scored
        **({"icl_effects": effects_of("icl_trait", "icl_control"), "icl_turns": cfg.icl}
           if icl else {}),
        **({"defence_effects": defence_effects} if defence_effects else {}),
        "p_value": effects[primary]["p_welch"],
        "test": "welch_t_one_sided over runs (trait > control, primary metric); "
                "p_permutation: permutation test over runs (exact up to 100,000 splits)",
        "runs": runs,
        **({"banned_rejections": {"list": cfg.banned_list(), **banned}} if banned else {}),
        "top_candidates": {c: dict(list(v.items())[:5]) for c, v in top.items()},
        "target_rank": {c: 1 + [a.lower() for a in v].index(cfg.target.lower())
                        for c, v in top.items() if cfg.target.lower() in map(str.lower, v)},
        "config": asdict(cfg),
        # this process's (SUBLEARN_DEVICE); stages cached by another process may have run
        # elsewhere, which changes float rounding only
        "device": device_record(),
        "stage_seconds": seconds,
        "wall_seconds": round(wall, 1),
        "workers": {"processes": workers, "threads": cpu_threads(workers)} if workers > 1
        else {"processes": 1},
        **({"peak_rss_gb": peak_rss_record(peak_rss, rss_total)} if peak_rss else {}),
    }


def peak_rss_record(peak_rss: dict[str, float],
                    total: tuple[float, float] | None = None) -> dict[str, Any]:
    """The largest peak RSS of a process that made stages and the first stage that reached
    it; per stage, its process's peak so far (stages cached from an earlier process are not
    in it). total: with workers, the peaks of all processes' resident memory together, as
    RSS and PSS sums."""
    top = max(peak_rss.values())
    return {"process": top, "reached_in": next(k for k, v in peak_rss.items() if v == top),
            **({"all_processes": total[0], "all_processes_pss": total[1]} if total else {}),
            "by_stage": peak_rss}


def _defence_effect(conditions: dict[str, Any], m: str,
                    seconds: dict[str, float]) -> dict[str, Any]:
    """Defended trait vs defended control runs, and the share of the undefended effect that
    remains (per metric), with what the defence cost per dataset."""
    from sublearn.experiment.stats import effect, remaining_share

    out: dict[str, Any] = {}
    for metric in conditions["trait"]:
        if metric == "target_logprob":
            continue
        td, cd = (conditions[f"{c}_{m}"][metric]["values"] for c in ("trait", "control"))
        t, c = (conditions[x][metric]["values"] for x in ("trait", "control"))
        out[metric] = {**effect(td, cd), "remaining": remaining_share(td, cd, t, c)}
    return {"metrics": out, "seconds_per_dataset": defence_seconds(seconds, m)}


def defence_seconds(seconds: dict[str, float], m: str) -> float | None:
    """Defence m's mean seconds per dataset: its stage, plus the scores it ranks by (a stage
    that scored defences share, counted in full for each); a label defence's entry is its cost
    inside the student's stage (`Stages.costs`). Keys: stage names, optionally after a folder
    (`owl/defend_...`)."""
    from sublearn.defences import DEFENCES

    scored = m in DEFENCES and DEFENCES[m].needs == "scores"
    costs = []
    for k, v in seconds.items():
        where, _, name = k.rpartition("/")
        if name.startswith(f"defend_{m}_"):
            rest = name[len(f"defend_{m}_"):]  # cond_runR
            score = f"{where}/scores_{rest}" if where else f"scores_{rest}"
            costs.append(v + (seconds.get(score, 0.0) if scored else 0.0))
    return math.fsum(costs) / len(costs) if costs else None


def _top_candidates(scores: list[dict]) -> dict[str, float]:
    """Every candidate's forced-choice share, averaged over models, highest first."""
    return _mean_shares([s["forced_choice"]["shares"] for s in scores])


def _mean_shares(shares: list[dict[str, float]]) -> dict[str, float]:
    mean: dict[str, float] = {}
    for s in shares:
        for a, v in s.items():
            mean[a] = mean.get(a, 0.0) + v / len(shares)
    return dict(sorted(mean.items(), key=lambda kv: -kv[1]))
