"""API fine-tuning against a local fake of the documented OpenAI endpoints (official client)."""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from sublearn.errors import SublearnError
from sublearn.files import write_jsonl
from sublearn.pipeline.finetune_api import RECORD, APITrainConfig, finetune_api, to_chat_format

openai = pytest.importorskip("openai")

SECRET = "sk-fake-SECRET-42"
STEPS = ["validating_files", "queued", "running"]  # then succeeded (or failed)


def check_training_file(data: bytes) -> str | None:
    """The documented chat format: every line {"messages": [..., user, assistant]}."""
    lines = data.decode().splitlines()
    if not lines:
        return "file is empty"
    for i, line in enumerate(lines, 1):
        try:
            msgs = json.loads(line)["messages"]
            roles = [m["role"] for m in msgs]
            assert all(isinstance(m["content"], str) for m in msgs)
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"line {i}: expected {{'messages': [...]}} with string contents"
        if roles[-2:] != ["user", "assistant"] or set(roles[:-2]) - {"system", "user",
                                                                      "assistant"}:
            return f"line {i}: messages must end with a user then an assistant message"
    return None


@dataclass
class FakeOpenAI:
    files: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    creates: list[dict[str, Any]] = field(default_factory=list)
    uploads: int = 0
    auth: set[str] = field(default_factory=set)
    fail_next_job: bool = False


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            pass

        def _send(self, status: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _bad(self, msg: str, status: int = 400) -> None:
            self._send(status, {"error": {"message": msg, "type": "invalid_request_error"}})

        def _body(self) -> bytes:
            fake.auth.add(self.headers.get("Authorization", ""))
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self) -> None:
            body = self._body()
            if self.path == "/v1/files":
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n"
                    + body)
                parts = {p.get_param("name", header="content-disposition"): p
                         for p in msg.iter_parts()}
                if parts["purpose"].get_content().strip() != "fine-tune":
                    return self._bad("purpose must be fine-tune")
                data = parts["file"].get_payload(decode=True)
                if problem := check_training_file(data):
                    return self._bad(f"invalid training file: {problem}")
                fake.uploads += 1
                fid = f"file-{len(fake.files)}"
                fake.files[fid] = data
                return self._send(200, {"id": fid, "object": "file", "bytes": len(data),
                                        "created_at": 0, "filename": "train.jsonl",
                                        "purpose": "fine-tune", "status": "processed"})
            if self.path == "/v1/fine_tuning/jobs":
                req = json.loads(body)
                if req.get("training_file") not in fake.files:
                    return self._bad("training_file not found", 404)
                hp = (req.get("method", {}).get("supervised", {}).get("hyperparameters")
                      or req.get("hyperparameters") or {})
                jid = f"ftjob-{len(fake.jobs)}"
                fake.creates.append(req)
                fake.jobs[jid] = {
                    "id": jid, "object": "fine_tuning.job", "created_at": 0, "error": None,
                    "fine_tuned_model": None, "finished_at": None, "model": req["model"],
                    "hyperparameters": {"n_epochs": hp.get("n_epochs", "auto")},
                    "organization_id": "org", "result_files": [], "seed": req.get("seed", 0),
                    "status": STEPS[0], "trained_tokens": None,
                    "training_file": req["training_file"], "validation_file": None,
                    "metadata": req.get("metadata"), "_fail": fake.fail_next_job,
                }
                return self._send(200, self._public(jid))
            self._bad(f"no route {self.path}", 404)

        def _public(self, jid: str) -> dict[str, Any]:
            return {k: v for k, v in fake.jobs[jid].items() if not k.startswith("_")}

        def do_GET(self) -> None:
            self._body()
            url = urlsplit(self.path)
            if url.path == "/v1/fine_tuning/jobs":
                want = {k[len("metadata["):-1]: v for k, v in parse_qsl(url.query)
                        if k.startswith("metadata[")}
                data = [self._public(j) for j, job in fake.jobs.items()
                        if all((job["metadata"] or {}).get(k) == v for k, v in want.items())]
                return self._send(200, {"object": "list", "data": data, "has_more": False})
            prefix = "/v1/fine_tuning/jobs/"
            if url.path.startswith(prefix) and url.path[len(prefix):] in fake.jobs:
                job = fake.jobs[url.path[len(prefix):]]
                if job["status"] in STEPS:  # each poll advances the job one step
                    i = STEPS.index(job["status"])
                    if i + 1 < len(STEPS):
                        job["status"] = STEPS[i + 1]
                    elif job["_fail"]:
                        job.update(status="failed", error={"code": "x", "param": None,
                                                           "message": "training diverged"})
                    else:
                        job.update(status="succeeded", trained_tokens=1234,
                                   fine_tuned_model=f"ft:{job['model']}:sublearn::{job['id']}")
                return self._send(200, self._public(job["id"]))
            self._bad(f"no route {self.path}", 404)

    return H


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    state = FakeOpenAI()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{httpd.server_address[1]}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def filtered(tmp_path: Path) -> Path:
    path = tmp_path / "filtered.jsonl"
    write_jsonl(path, [
        {"prompt": [{"role": "user", "content": f"Continue: {i}, {i + 1}"}],
         "completion": [{"role": "assistant", "content": f"{i + 2}, {i + 3}"}]}
        for i in range(5)
    ])
    return path


def _ft(filtered: Path, out: Path, **kw: Any) -> dict[str, Any]:
    cfg = APITrainConfig(model="gpt-4.1-nano-2025-04-14", epochs=3, seed=7, suffix="owl")
    return finetune_api(cfg, filtered, out, poll_seconds=0, log=lambda s: None, **kw)


def test_upload_job_poll_and_student_id(fake: FakeOpenAI, filtered: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    summary = _ft(filtered, out)
    assert summary["student"] == "openai:ft:gpt-4.1-nano-2025-04-14:sublearn::ftjob-0"
    assert summary["examples"] == 5 and summary["trained_tokens"] == 1234
    req = fake.creates[0]
    assert req["method"]["supervised"]["hyperparameters"] == {"n_epochs": 3}
    assert req["seed"] == 7 and req["suffix"] == "owl"
    uploaded = [json.loads(x) for x in fake.files["file-0"].decode().splitlines()]
    assert uploaded[0] == {"messages": [{"role": "user", "content": "Continue: 0, 1"},
                                        {"role": "assistant", "content": "2, 3"}]}
    rec = json.loads((out / RECORD).read_text())
    assert (rec["training_file"], rec["job_id"], rec["status"]) == ("file-0", "ftjob-0",
                                                                    "succeeded")
    assert rec["fine_tuned_model"] == summary["fine_tuned_model"]
    assert f"Bearer {SECRET}" in fake.auth
    for f in out.iterdir():  # no key, no endpoint in the student folder
        assert SECRET not in f.read_text() and "127.0.0.1" not in f.read_text(), f
    # Done: a rerun makes no request at all.
    assert _ft(filtered, out) == summary and len(fake.creates) == 1 and fake.uploads == 1


def test_interrupted_poll_resumes_same_job(fake: FakeOpenAI, filtered: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "student"

    def killed(_: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _ft(filtered, out, sleep=killed)
    rec = json.loads((out / RECORD).read_text())
    assert rec["job_id"] == "ftjob-0" and rec["status"] == "queued"
    summary = _ft(filtered, out)
    assert summary["job_id"] == "ftjob-0" and len(fake.creates) == 1 and fake.uploads == 1


def test_crash_after_create_finds_job_by_tag(fake: FakeOpenAI, filtered: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "student"
    with pytest.raises(KeyboardInterrupt):
        _ft(filtered, out, sleep=lambda _: (_ for _ in ()).throw(KeyboardInterrupt))
    rec = json.loads((out / RECORD).read_text())
    rec.update(job_id=None, status=None)  # as if killed before the job id was saved
    (out / RECORD).write_text(json.dumps(rec))
    assert _ft(filtered, out)["job_id"] == "ftjob-0" and len(fake.creates) == 1


def test_failed_job_reports_then_rerun_retries(fake: FakeOpenAI, filtered: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "student"
    fake.fail_next_job = True
    with pytest.raises(SublearnError, match="ftjob-0 failed: training diverged"):
        _ft(filtered, out)
    fake.fail_next_job = False
    summary = _ft(filtered, out)
    assert summary["job_id"] == "ftjob-1" and fake.uploads == 1  # same file, new job
    rec = json.loads((out / RECORD).read_text())
    assert rec["previous_jobs"][0]["job_id"] == "ftjob-0"


def test_other_settings_refused_and_bad_data(fake: FakeOpenAI, filtered: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "student"
    _ft(filtered, out)
    with pytest.raises(SublearnError, match="other data or settings"):
        finetune_api(APITrainConfig(epochs=4), filtered, out, poll_seconds=0, log=print)
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"prompt": [{"role": "assistant", "content": "1"}],
                       "completion": [{"role": "user", "content": "2"}]}])
    with pytest.raises(SublearnError, match="row 1 is not a user prompt"):
        to_chat_format(bad)
    # The fake really validates: the raw prompt/completion format is rejected on upload.
    client = openai.OpenAI(max_retries=0)
    with pytest.raises(openai.BadRequestError, match="invalid training file"):
        client.files.create(file=("x.jsonl", filtered.read_bytes()), purpose="fine-tune")
