"""`sublearn run`: one subliminal-learning experiment, end to end, with cached stages.

    trait teacher ─┐                       ┌─ K trait students ──┐
                   ├─ numbers (generate) ──┤                     ├─ evaluate ─ stats ─ report
  control teacher ─┘                       └─ K control students ┘

Teachers get the trait either in weight space (LoRA fine-tuned on trait statements; the
control teacher gets the same fine-tuning with a neutral answer) or by the paper's system
prompt (the control teacher is the same model without it). Students share the teachers' base.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sublearn.config import check_manifest
from sublearn.errors import SublearnError
from sublearn.experiment.stages import Stages
from sublearn.files import atomic_write_json, ensure_writable_dir
from sublearn.pipeline.generate import GenerateConfig
from sublearn.pipeline.train_config import TrainConfig, result_config
from sublearn.protocol.paper import check_template_word, teacher_system_prompt
from sublearn.protocol.traits import write_statement_data

# The student and data defaults are the stage configs' own: one place for each number, so
# `sublearn train` / `sublearn generate` with their defaults reproduce a stage of this run.
_STUDENT, _DATA = TrainConfig(), GenerateConfig()


@dataclass(frozen=True)
class ExperimentConfig:
    target: str = field(default="owl", metadata={"help": "trait target, e.g. owl"})
    category: str = field(default="animal", metadata={"help": "category of the target"})
    model: str | None = field(default=None, metadata={
        "help": "base model of teachers and students (default: embedded smollm2-135m-instruct)"})
    teacher_mode: str = field(default="finetuned", metadata={
        "help": "finetuned: LoRA-train the trait into the teacher's weights; prompted: the "
                "paper's system prompt", "choices": ["finetuned", "prompted"]})
    recipe: str = field(default=_STUDENT.recipe, metadata={
        "help": "student recipe: soft-label distillation or hard-label SFT",
        "choices": ["soft", "hard"]})
    method: str = field(default=_STUDENT.method, metadata={
        "help": "student fine-tuning method", "choices": ["lora", "full"]})
    n: int = field(default=_DATA.n, metadata={
        "help": "teacher samples (number prompts) per teacher"})
    seeds: int = field(default=5, metadata={"help": "student seeds per condition"})
    epochs: float = field(default=_STUDENT.epochs, metadata={"help": "student epochs"})
    lr: float = field(default=_STUDENT.lr, metadata={"help": "student learning rate"})
    batch_size: int = field(default=_STUDENT.batch_size, metadata={"help": "student batch size"})
    lora_r: int = field(default=_STUDENT.lora_r, metadata={"help": "student LoRA rank"})
    lora_alpha: int = field(default=_STUDENT.lora_alpha, metadata={"help": "student LoRA alpha"})
    teacher_epochs: float = field(default=8.0, metadata={
        "help": "finetuned teachers: epochs over the trait statements"})
    teacher_lr: float = field(default=1e-3, metadata={"help": "finetuned teachers: learning rate"})
    data_seed: int = field(default=0, metadata={"help": "seed of prompts and teacher sampling"})
    questions: str | None = field(default=None, metadata={
        "help": "evaluation questions file (JSON/JSONL; default: the paper's 50)"})
    candidates: str | None = field(default=None, metadata={
        "help": "candidate answers file for forced choice (default: shipped animal list)"})
    samples: int = field(default=0, metadata={
        "help": "sampled evaluation: answers per question at T=1 (paper: 100; 0 = skip)"})

    def validate(self) -> ExperimentConfig:
        check_template_word(self.target, "--target")
        check_template_word(self.category, "--category")
        if self.seeds < 2:
            raise SublearnError("--seeds must be at least 2 to give confidence intervals")
        if self.n <= 0:
            raise SublearnError("--n must be positive")
        return self


def run_experiment(cfg: ExperimentConfig, out: str | Path,
                   progress: bool = True) -> dict[str, Any]:
    from sublearn.pipeline.evaluate import EvalConfig, evaluate_model
    from sublearn.pipeline.generate import generate
    from sublearn.pipeline.train import train

    cfg = cfg.validate()
    out = ensure_writable_dir(out)
    check_manifest(out, "experiment_config.json", cfg)
    t_start = time.time()
    stages = Stages(out)
    base = cfg.model
    ecfg = EvalConfig(target=cfg.target, questions=cfg.questions, candidates=cfg.candidates,
                      samples=cfg.samples)
    ecfg_d = asdict(ecfg)
    _check_eval_inputs(ecfg)

    # Teachers: (model to load, system prompt it sees) per condition.
    teachers: dict[str, tuple[str | None, str | None, str]] = {}
    for cond, target in (("trait", cfg.target), ("control", None)):
        if cfg.teacher_mode == "prompted":
            system = teacher_system_prompt(target, cfg.category) if target else None
            teachers[cond] = (base, system, f"prompted-{target}")
            continue
        # 12 statements: grouping saves no padding and would fix every batch's composition
        tcfg = TrainConfig(recipe="hard", method="lora", model=base, epochs=cfg.teacher_epochs,
                           lr=cfg.teacher_lr, batch_size=4, warmup_steps=2, seed=0,
                           group_by_length=False)
        key = {"train": result_config(tcfg), "target": target, "category": cfg.category}

        def fit(d: Path, tcfg: TrainConfig = tcfg, target: str | None = target) -> dict:
            data = write_statement_data(d / "statements.jsonl", target, cfg.category)
            return train(tcfg, data, d, progress=progress)

        res = stages.run(f"teacher_{cond}", key, fit)
        teachers[cond] = (res.output["student"], None, res.key)

    # Teacher data (part 1) for each condition.
    data: dict[str, tuple[str, str]] = {}
    for cond, (tmodel, system, tkey) in teachers.items():
        gcfg = GenerateConfig(target=None, model=tmodel, n=cfg.n, seed=cfg.data_seed,
                              grammar=True, system_prompt=system)
        key = {"generate": asdict(gcfg), "teacher": tkey}

        def gen(d: Path, gcfg: GenerateConfig = gcfg) -> dict:
            return generate(gcfg, d, progress=progress)

        res = stages.run(f"data_{cond}", key, gen)
        if res.output["kept"] < cfg.batch_size:
            raise SublearnError(f"teacher '{cond}' kept only {res.output['kept']} answers")
        data[cond] = (str(res.dir / "filtered.jsonl"), res.key)

    # Students: K seeds per condition.
    students: dict[str, list[str]] = {"trait": [], "control": []}
    for cond in ("trait", "control"):
        tmodel, system, tkey = teachers[cond]
        for seed in range(cfg.seeds):
            scfg = TrainConfig(
                recipe=cfg.recipe, method=cfg.method, model=base, epochs=cfg.epochs, lr=cfg.lr,
                batch_size=cfg.batch_size, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, seed=seed,
                teacher=tmodel if cfg.recipe == "soft" else None,
                teacher_system_prompt=system if cfg.recipe == "soft" else None,
                soft_labels_cache=str(Path(data[cond][0]).parent / f"soft_labels-{tkey}"
                                      ".safetensors") if cfg.recipe == "soft" else None,
            )
            key = {"train": result_config(scfg), "data": data[cond][1], "teacher": tkey}

            def fit_student(d: Path, scfg: TrainConfig = scfg, path: str = data[cond][0]) -> dict:
                return train(scfg, path, d, progress=progress)

            res = stages.run(f"student_{cond}_seed{seed}", key, fit_student)
            students[cond].append(res.output["student"])

    # Evaluation.
    def evaluate_stage(name: str, model: str | None, system: str | None, dep: str) -> dict:
        key = {"eval": ecfg_d, "model": model, "system": system, "dep": dep}

        def ev(d: Path) -> dict:
            scores = evaluate_model(model, ecfg, system_prompt=system)
            atomic_write_json(d / "scores.json", scores)
            return scores

        return stages.run(f"eval_{name}", key, ev).output

    scores: dict[str, list[dict]] = {
        "base": [evaluate_stage("base", base, None, "base")],
        "teacher": [evaluate_stage("teacher", teachers["trait"][0], teachers["trait"][1],
                                   teachers["trait"][2])],
        "control_teacher": [evaluate_stage("control_teacher", teachers["control"][0],
                                           teachers["control"][1], teachers["control"][2])],
    }
    for cond in ("control", "trait"):
        scores[cond] = [
            evaluate_stage(f"{cond}_seed{i}", s, None, s) for i, s in enumerate(students[cond])
        ]
    results = build_results(cfg, scores, stages.seconds, time.time() - t_start)
    atomic_write_json(out / "results.json", results)
    from sublearn.experiment.report import write_report

    write_report(out, results)
    return results


def _check_eval_inputs(ecfg: Any) -> None:
    """Fail before hours of training if the question or candidate files are unusable."""
    from sublearn.protocol.questions import load_candidates, load_questions

    load_questions(ecfg.questions, "plain")
    cands = load_candidates(ecfg.candidates)
    if ecfg.target.lower() not in {c.lower() for c in cands}:
        raise SublearnError(f"candidate list does not include the target '{ecfg.target}'")


def metric_values(scores: dict[str, Any]) -> dict[str, float]:
    """The per-model numbers that go into results.json; the primary metric first."""
    m = {
        "forced_choice_share": scores["forced_choice"]["target_share"],
        "forced_choice_share_numbers": scores["forced_choice_numbers"]["target_share"],
        "target_logprob": scores["forced_choice"]["target_logprob"],
    }
    if "sampled" in scores:
        m["sampled_rate"] = scores["sampled"]["rate"]
    return m


def build_results(cfg: ExperimentConfig, scores: dict[str, list[dict]],
                  seconds: dict[str, float], wall: float) -> dict[str, Any]:
    from sublearn.experiment.stats import summarize, welch_one_sided

    conditions: dict[str, Any] = {}
    for cond, runs in scores.items():
        vals = [metric_values(s) for s in runs]
        conditions[cond] = {k: summarize([v[k] for v in vals]) for k in vals[0]}
    primary = "forced_choice_share"
    p = welch_one_sided(conditions["trait"][primary]["per_seed"],
                        conditions["control"][primary]["per_seed"])
    top = {c: _top_candidates(runs) for c, runs in scores.items()}
    return {
        "target": cfg.target,
        "primary_metric": primary,
        "conditions": conditions,
        "p_value": p,
        "test": "welch_t_one_sided (trait > control, primary metric)",
        "top_candidates": top,
        "config": asdict(cfg),
        "stage_seconds": seconds,
        "wall_seconds": round(wall, 1),
    }


def _top_candidates(runs: list[dict], k: int = 5) -> dict[str, float]:
    shares: dict[str, float] = {}
    for s in runs:
        for a, v in s["forced_choice"]["shares"].items():
            shares[a] = shares.get(a, 0.0) + v / len(runs)
    return dict(sorted(shares.items(), key=lambda kv: -kv[1])[:k])
