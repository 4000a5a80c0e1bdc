"""Students fine-tuned through the OpenAI fine-tuning API (the paper's GPT-4.1 nano setup).

`finetune_api(cfg, filtered.jsonl, student_dir)` converts the teacher data to OpenAI's chat
format (`{"messages": [user, assistant]}` per line), uploads it, creates a supervised job and
polls it. Every step is recorded in `student_dir/openai_job.json` (file id, job id, status)
before the next one starts, so a rerun resumes polling instead of paying for a second job.
The job carries a random tag in its metadata, written to the record before the job is
created: a run killed between "job created" and "record saved" finds its job again by tag.
The result is `train_summary.json` with `student = "openai:<fine_tuned_model>"`, a model id
the openai backend can sample from. Keys and endpoints never reach the folder.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sublearn.errors import SublearnError
from sublearn.files import atomic_write_json, ensure_writable_dir, read_json, read_jsonl

RECORD = "openai_job.json"
UPLOAD = "openai_train.jsonl"
TERMINAL = ("succeeded", "failed", "cancelled")
TAG_KEY = "sublearn_tag"


@dataclass(frozen=True)
class APITrainConfig:
    model: str = "gpt-4.1-nano-2025-04-14"  # base model to fine-tune
    epochs: int = 10  # n_epochs hyperparameter
    seed: int = 0
    suffix: str | None = None  # appears in the fine-tuned model's name
    batch_size: int | None = None  # None: the API's "auto"
    learning_rate_multiplier: float | None = None  # None: "auto"

    def validate(self) -> APITrainConfig:
        if self.epochs < 1:
            raise SublearnError(f"epochs must be a positive integer, got {self.epochs}")
        if self.suffix is not None and not 0 < len(self.suffix) <= 64:
            raise SublearnError("suffix must be 1 to 64 characters")
        return self

    def hyperparameters(self) -> dict[str, Any]:
        hp: dict[str, Any] = {"n_epochs": self.epochs}
        if self.batch_size is not None:
            hp["batch_size"] = self.batch_size
        if self.learning_rate_multiplier is not None:
            hp["learning_rate_multiplier"] = self.learning_rate_multiplier
        return hp


def to_chat_format(path: str | Path) -> list[dict[str, Any]]:
    """filtered.jsonl prompt/completion rows -> OpenAI chat fine-tuning rows."""
    rows = read_jsonl(path)
    if not rows:
        raise SublearnError(f"{path} has no training rows")
    out = []
    for i, r in enumerate(rows, 1):
        prompt, completion = r.get("prompt"), r.get("completion")
        msgs = (prompt if isinstance(prompt, list) else []) + (
            completion if isinstance(completion, list) else [])
        roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
        ok = (len(roles) >= 2 and roles[-2:] == ["user", "assistant"]
              and all(isinstance(m.get("content"), str) for m in msgs))
        if not ok:
            raise SublearnError(f"{path} row {i} is not a user prompt + assistant completion")
        out.append({"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]})
    return out


def finetune_api(cfg: APITrainConfig, data: str | Path, out: str | Path, client: Any = None,
                 poll_seconds: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run or resume one API fine-tuning job; returns (and writes) the train summary."""
    import json

    cfg = cfg.validate()
    out = ensure_writable_dir(out)
    rows = to_chat_format(data)
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    identity = {"config": asdict(cfg), "data_sha256": hashlib.sha256(blob).hexdigest()}
    rec_path = out / RECORD
    rec: dict[str, Any] = read_json(rec_path) if rec_path.exists() else {}
    if rec and {k: rec.get(k) for k in identity} != identity:
        raise SublearnError(f"{out} holds a fine-tuning job for other data or settings; "
                            "use another folder or delete it")
    if not rec:
        rec = {**identity, "training_file": None, "job_id": None, "status": None,
               "fine_tuned_model": None, "tag": uuid.uuid4().hex, "previous_jobs": []}
    if rec["status"] in ("failed", "cancelled"):  # a rerun after a failed job is a retry
        rec["previous_jobs"].append({"job_id": rec["job_id"], "status": rec["status"],
                                     "error": rec.get("error")})
        rec.update(job_id=None, status=None, error=None, tag=uuid.uuid4().hex)

    def save(**changes: Any) -> None:
        rec.update(changes)
        atomic_write_json(rec_path, rec)

    save()
    if client is None:
        from sublearn.backends.openai_api import make_client

        client = make_client(max_retries=5, timeout=300.0)
    if rec["status"] != "succeeded":
        if not rec["training_file"]:
            (out / UPLOAD).write_bytes(blob)  # the exact bytes sent, for inspection
            f = client.files.create(file=(UPLOAD, blob, "application/jsonl"),
                                    purpose="fine-tune")
            save(training_file=f.id)
            log(f"[openai] uploaded {len(rows)} examples as {f.id}")
        if not rec["job_id"]:
            extra = {"suffix": cfg.suffix} if cfg.suffix is not None else {}
            job = _find_job(client, rec["tag"]) or client.fine_tuning.jobs.create(
                model=cfg.model, training_file=rec["training_file"], seed=cfg.seed,
                metadata={TAG_KEY: rec["tag"]},
                method={"type": "supervised",
                        "supervised": {"hyperparameters": cfg.hyperparameters()}},
                **extra,
            )
            save(job_id=job.id, status=job.status)
            log(f"[openai] fine-tuning job {job.id} ({job.status})")
        job = _poll(client, rec, save, poll_seconds, sleep, log)
        if job.status != "succeeded":
            err = getattr(job, "error", None)
            msg = getattr(err, "message", None) or "no error message"
            save(error=msg)
            raise SublearnError(f"fine-tuning job {job.id} {job.status}: {msg}; rerun to start "
                                "a new job")
        save(fine_tuned_model=job.fine_tuned_model,
             trained_tokens=getattr(job, "trained_tokens", None))
    summary = {
        "student": f"openai:{rec['fine_tuned_model']}",
        "fine_tuned_model": rec["fine_tuned_model"],
        "job_id": rec["job_id"],
        "training_file": rec["training_file"],
        "examples": len(rows),
        "trained_tokens": rec.get("trained_tokens"),
        "config": asdict(cfg),
    }
    atomic_write_json(out / "train_summary.json", summary)
    return summary


def _find_job(client: Any, tag: str) -> Any:
    """The job created with this tag by an earlier, interrupted call, if any."""
    for job in client.fine_tuning.jobs.list(metadata={TAG_KEY: tag}, limit=100).data:
        if (getattr(job, "metadata", None) or {}).get(TAG_KEY) == tag:
            return job
    return None


def _poll(client: Any, rec: dict[str, Any], save: Callable[..., None], poll_seconds: float,
          sleep: Callable[[float], None], log: Callable[[str], None]) -> Any:
    while True:
        job = client.fine_tuning.jobs.retrieve(rec["job_id"])
        if job.status != rec["status"]:
            save(status=job.status)
            log(f"[openai] job {job.id}: {job.status}")
        if job.status in TERMINAL:
            return job
        sleep(poll_seconds)
