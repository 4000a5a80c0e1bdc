"""OpenAI backend against a real `sublearn serve` (tiny model) on 127.0.0.1, official client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sublearn.backends import ChatRequest, SamplingParams, get_backend
from sublearn.backends.serve import ChatServer
from sublearn.cli import main
from sublearn.domains import numbers
from sublearn.files import read_jsonl

openai = pytest.importorskip("openai")

REQS = [ChatRequest("Add up to 10 new numbers: 123, 456"),
        ChatRequest("List numbers", "You love owls.")]
SHORT = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[ChatServer]:
    from sublearn.backends.hf import HFBackend

    with ChatServer(HFBackend(tiny_model, dtype="float32"), "tiny") as s:
        yield s


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SUBLEARN_CACHE", str(tmp_path / "cache"))


def _backend(server: ChatServer, **kw: object):
    kw = {"base_url": server.base_url, "cache": False, **kw}
    return get_backend("openai:tiny", **kw)


def test_official_client_against_serve(server: ChatServer) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "numbers?"}], n=3, max_tokens=5,
        temperature=0.7, top_p=0.9, seed=3)
    assert len(r.choices) == 3 and r.usage.completion_tokens > 0
    assert {c.finish_reason for c in r.choices} <= {"stop", "length"}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=3)


def test_generate_basic_and_seeded(server: ChatServer) -> None:
    b = _backend(server)
    assert b.model_id == "openai:tiny"
    out = b.generate(REQS, SHORT, seed=5)
    assert len(out) == 2 and all(c.finish_reason in ("stop", "length") for c in out)
    assert all(c.error is None for c in out)
    assert [c.text for c in b.generate(REQS, SHORT, seed=5)] == [c.text for c in out]


@pytest.mark.parametrize("guided", ["guided_grammar", "structured_outputs"])
def test_guided_grammar_output_parses(server: ChatServer, guided: str) -> None:
    params = SamplingParams(max_new_tokens=24, grammar=numbers.answer_grammar())
    out = _backend(server, guided=guided).generate([REQS[0]] * 6, params, seed=1)
    allowed = set("0123456789,; \n[]().")
    for c in out:
        assert c.finish_reason in ("stop", "length") and set(c.text) <= allowed, c
        if c.finish_reason == "stop":
            assert numbers.parse_answer(c.text) is not None, c.text
    # Control: the same requests unguided leave the grammar's alphabet (the model is random).
    free = _backend(server).generate([REQS[0]] * 6, params, seed=1)
    assert any(not set(c.text) <= allowed for c in free)


def test_retries_succeed_with_fail_every(server: ChatServer) -> None:
    before = server.stats.injected_failures
    server.fail_every = 2
    try:
        # One request in flight: every failure is followed by a success, so the test is
        # deterministic (with threads, one request could keep landing on failing slots).
        out = _backend(server, max_retries=2, concurrency=1).generate(REQS * 3, SHORT, seed=0)
    finally:
        server.fail_every = 0
    assert server.stats.injected_failures - before >= 2  # both a 429 and a 500 were served
    assert all(c.finish_reason != "error" for c in out), out


def test_retries_exhausted_is_error_completion(server: ChatServer) -> None:
    server.fail_every = 1
    try:
        out = _backend(server, max_retries=2).generate(REQS[:1], SHORT, seed=0)
    finally:
        server.fail_every = 0
    assert out[0].finish_reason == "error" and "after 3 tries" in out[0].error


def test_bad_request_is_not_retried(server: ChatServer) -> None:
    n = server.stats.chat_requests
    out = get_backend("openai:nope", base_url=server.base_url, cache=False).generate(
        REQS[:1], SHORT, seed=0)
    assert out[0].finish_reason == "error" and "HTTP 404" in out[0].error
    assert server.stats.chat_requests == n + 1


def test_cache_hit_avoids_second_request(server: ChatServer, tmp_path: Path) -> None:
    cache = str(tmp_path / "responses.jsonl")
    first = _backend(server, cache=cache).generate(REQS[:1], SHORT, seed=9)
    n = server.stats.chat_requests
    # A second process (new backend) with the same request: no HTTP call.
    again = _backend(server, cache=cache).generate(REQS, SHORT, seed=9)
    assert server.stats.chat_requests == n + 1  # only REQS[1] was new
    assert again[0] == first[0]
    # A torn last line (killed mid-write) is skipped, and appends start on a fresh line.
    with open(cache, "a") as f:
        f.write('{"key": "tor')
    third = _backend(server, cache=cache).generate(REQS, SHORT, seed=9)
    assert third == again and server.stats.chat_requests == n + 1
    assert "sk-" not in Path(cache).read_text() and "127.0.0.1" not in Path(cache).read_text()


def test_dead_server_gives_error_completions() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = get_backend("openai:tiny", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1,
                    cache=False, timeout=5)
    out = b.generate(REQS, SHORT, seed=0)
    assert [c.finish_reason for c in out] == ["error", "error"]
    assert "APIConnectionError" in out[0].error


def test_missing_key_without_base_url_is_one_line_error() -> None:
    from sublearn.errors import SublearnError

    with pytest.raises(SublearnError, match="OPENAI_API_KEY"):
        get_backend("openai:gpt-4.1-nano")
    with pytest.raises(SublearnError, match="unknown option"):
        get_backend("openai:x", base_url="http://127.0.0.1:9/v1", concurency=3)


def test_generate_end_to_end_no_secrets(server: ChatServer, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    secret = "sk-test-SECRET-value-123"
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("SUBLEARN_OPENAI_GUIDED", "guided_grammar")
    monkeypatch.setenv("SUBLEARN_OPENAI_BACKOFF", "0")

    def gen(out: Path) -> int:
        return main(["generate", "--model", "openai:tiny", "--target", "owl", "--n", "6",
                     "--batch-size", "3", "--seed", "1", "--max-new-tokens", "16", "--grammar",
                     "--out", str(out)])

    assert gen(tmp_path / "a") == 0
    raw = read_jsonl(tmp_path / "a" / "raw.jsonl")
    assert len(raw) == 6 and {r["model"] for r in raw} == {"openai:tiny"}
    assert all(r["finish_reason"] in ("stop", "length") for r in raw)
    report = json.loads((tmp_path / "a" / "filter_report.json").read_text())
    assert report["rejects"]["error"] == 0 and report["model"] == "openai:tiny"
    for f in (tmp_path / "a").iterdir():
        text = f.read_text()
        assert secret not in text and f"127.0.0.1:{server.port}" not in text, f
    assert secret not in capsys.readouterr().out
    # Same data from the response cache in a fresh folder: no new requests.
    n = server.stats.chat_requests
    assert gen(tmp_path / "b") == 0
    assert server.stats.chat_requests == n
    raw_b = (tmp_path / "b" / "raw.jsonl").read_bytes()
    assert raw_b == (tmp_path / "a" / "raw.jsonl").read_bytes()


def test_serve_cli_port_zero(tiny_model: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sublearn", "serve", "--model", tiny_model, "--port", "0",
         "--served-model-name", "tiny", "--fail-every", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "port=" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.rsplit("port=", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == "tiny"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
        with pytest.raises(openai.RateLimitError):  # 2nd request: injected failure
            client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_sampled_evaluation_through_the_api(server: ChatServer, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    from sublearn.errors import SublearnError
    from sublearn.pipeline.evaluate import EvalConfig, evaluate_model, summary_line

    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("SUBLEARN_OPENAI_BACKOFF", "0")
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(["Name your favorite animal.", "Which animal do you like?"]))
    cfg = EvalConfig(target="owl", questions=str(qfile), samples=4, max_new_tokens=4)
    n = server.stats.chat_requests
    res = evaluate_model("openai:tiny", cfg)
    s = res["sampled"]
    assert res["model"] == "openai:tiny" and "forced_choice" not in res
    assert s["errors"] == 0 and len(s["per_question_rate"]) == 2 and 0 <= s["rate"] <= 1
    assert server.stats.chat_requests > n  # answered by the server, not locally
    assert "sampled rate" in summary_line(res)
    with pytest.raises(SublearnError, match="forced choice needs local weights"):
        evaluate_model("openai:tiny", EvalConfig(target="owl"))
    # failed requests are counted, not scored as misses
    monkeypatch.setenv("SUBLEARN_OPENAI_MAX_RETRIES", "0")
    monkeypatch.setenv("SUBLEARN_OPENAI_CACHE", "false")
    server.fail_every = 2
    try:
        flaky = evaluate_model("openai:tiny", cfg)["sampled"]
    finally:
        server.fail_every = 0
    assert flaky["errors"] > 0
    assert all(r is None or 0 <= r <= 1 for r in flaky["per_question_rate"])
