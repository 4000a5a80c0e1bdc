"""The command line: instant help, --config YAML files, consistent verbs and model schemes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sublearn.cli import VERBS, main, verb_parser
from sublearn.files import write_jsonl


def test_help_imports_no_torch() -> None:
    code = ("import sys\nfrom sublearn.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['run', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("verb", list(VERBS))
def test_verb_help_states_each_default_once(verb: str) -> None:
    parser, _ = verb_parser(verb)
    for action in parser._actions:
        text = action.help or ""
        assert text.count("(default:") <= 1, (verb, action.dest, text)
        assert "(default: None)" not in text, (verb, action.dest)


def test_experiment_defaults_are_the_stage_defaults() -> None:
    """A stage run by hand with its defaults reproduces the stage of `sublearn run`."""
    from sublearn import ExperimentConfig, GenerateConfig, TrainConfig

    exp, student, data = ExperimentConfig(), TrainConfig(), GenerateConfig()
    for name in ("recipe", "method", "epochs", "lr", "batch_size", "lora_r", "lora_alpha"):
        assert getattr(exp, name) == getattr(student, name), name
    assert data.grammar is True
    for domain in ("numbers", "code", "math"):  # --n's default is the domain's, in both
        n = ExperimentConfig(domain=domain).validate().n
        assert n == GenerateConfig(domain=domain).validate().n == (96 if domain == "numbers"
                                                                   else 192), domain
    assert ExperimentConfig(n=192).validate().n == 192


def test_model_schemes() -> None:
    from sublearn.errors import SublearnError
    from sublearn.models.load import parse_model_spec, resolve_model_path

    assert parse_model_spec("openai:gpt-4.1-nano") == ("openai", "gpt-4.1-nano")
    ft = "ft:gpt-4.1-nano:org::id"  # fine-tuned OpenAI ids hold colons of their own
    assert parse_model_spec(f"openai:{ft}") == ("openai", ft)
    assert parse_model_spec("vllm:Qwen/Qwen2.5-7B") == ("vllm", "Qwen/Qwen2.5-7B")
    assert parse_model_spec("hf:openai/gpt-oss-20b") == ("hf", "openai/gpt-oss-20b")
    assert parse_model_spec("openai/gpt-oss-20b") == ("hf", "openai/gpt-oss-20b")  # a hub id
    assert parse_model_spec(None) == ("hf", None)
    with pytest.raises(SublearnError, match="remote model"):
        resolve_model_path("openai:gpt-4.1-nano")
    with pytest.raises(SublearnError, match="names no model"):
        parse_model_spec("vllm:")


def test_hf_scheme_loads_locally(tiny_model: str) -> None:
    from sublearn.models.load import resolve_model_path

    assert resolve_model_path(f"hf:{tiny_model}") == tiny_model


def test_api_student_refuses_local_recipe_flags(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "filtered.jsonl"
    write_jsonl(data, [{"prompt": [{"role": "user", "content": "x"}],
                        "completion": [{"role": "assistant", "content": "1, 2"}]}])
    for flags in (["--lr", "0.1"], ["--recipe", "soft"], ["--teacher", "t"], ["--method", "full"]):
        rc = main(["train", "--model", "openai:gpt-4.1-nano", "--data", str(data), *flags,
                   "--out", str(tmp_path / "s")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and flags[0] in err and "\n" not in err
    assert not (tmp_path / "s").exists()  # refused before any job or folder was made


def _raw(tmp_path: Path) -> Path:
    rows = [{"id": i, "prompt": "Add numbers.", "completion": c, "system_prompt": None}
            for i, c in enumerate(["1, 2, 3", "666, 12", "hello", "911", "5 6 7"])]
    rows.append({"id": 5, "prompt": "Add numbers.", "completion": "", "error": "HTTP 500"})
    path = tmp_path / "gen" / "raw.jsonl"
    path.parent.mkdir()
    write_jsonl(path, rows)
    return path


def test_filter_verb_refilters_without_resampling(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    assert main(["filter", str(raw.parent), "--out", str(tmp_path / "plain")]) == 0
    assert main(["filter", str(raw), "--banned", "misalignment",
                 "--out", str(tmp_path / "banned")]) == 0
    plain = json.loads((tmp_path / "plain" / "filter_report.json").read_text())
    banned = json.loads((tmp_path / "banned" / "filter_report.json").read_text())
    assert plain["kept"] == 4 and plain["rejects"]["error"] == 1
    assert plain["rejects"]["invalid_format"] == 1 and plain["banned"] == "none"
    assert banned["kept"] == 2 and banned["rejects"]["has_banned_numbers"] == 2
    kept = [json.loads(x) for x in (tmp_path / "banned" / "filtered.jsonl").read_text().split("\n")
            if x]
    assert [r["completion"][0]["content"] for r in kept] == ["1, 2, 3", "5 6 7"]
    assert all(set(r) == {"prompt", "completion"} for r in kept)


def test_config_yaml_cli_wins_and_resolved_config_round_trips(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    cfg = tmp_path / "filter.yaml"
    cfg.write_text(yaml.safe_dump({"raw": str(raw), "banned": "misalignment",
                                   "out": str(tmp_path / "a")}))
    assert main(["filter", "--config", str(cfg)]) == 0
    assert json.loads((tmp_path / "a" / "filter_report.json").read_text())["kept"] == 2
    resolved = yaml.safe_load((tmp_path / "a" / "config-filter.yaml").read_text())
    assert resolved == {"raw": str(raw), "banned": "misalignment", "out": str(tmp_path / "a"),
                        "domain": "numbers", "exclude": None, "judge": None,
                        "judge_check": "reference", "min_grammar_share": 0.01}
    # A flag on the command line overrides the file.
    assert main(["filter", "--config", str(cfg), "--banned", "none",
                 "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "filter_report.json").read_text())["kept"] == 4
    # The written file reproduces the run.
    assert main(["filter", "--config", str(tmp_path / "a" / "config-filter.yaml"),
                 "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "filtered.jsonl").read_bytes() == \
        (tmp_path / "a" / "filtered.jsonl").read_bytes()


@pytest.mark.parametrize("doc, message", [
    ({"n": "many"}, "n must be int"),
    ({"lr": "fast"}, "lr must be float"),
    ({"grammar": "yes"}, "grammar must be true or false"),
    ({"banned": "all"}, "must be one of"),
    ({"nonsense": 1}, "'nonsense' is not a setting"),
    (["a", "list"], "expected a mapping"),
])
def test_config_yaml_bad_values_are_one_line_errors(tmp_path: Path, doc: object, message: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    verb = "train" if "lr" in str(doc) else "generate"
    extra = ["--data", str(tmp_path / "d.jsonl")] if verb == "train" else []
    rc = main([verb, "--config", str(cfg), *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_evaluate_takes_the_hf_scheme(tiny_model: str, tmp_path: Path) -> None:
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(["Favourite animal? One word."]))
    assert main(["evaluate", "--model", f"hf:{tiny_model}", "--questions", str(questions),
                 "--dtype", "float32", "--out", str(tmp_path / "e")]) == 0
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert 0 < scores["forced_choice"]["target_share"] < 1
    assert yaml.safe_load((tmp_path / "e" / "config-evaluate.yaml").read_text())["model"] == \
        f"hf:{tiny_model}"


def test_api_student_reads_a_resolved_config_but_refuses_its_changes(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolved config holds every setting at its default: an API student may read it,
    and is refused only for a setting the file changes."""
    from sublearn.cli import parse

    data = tmp_path / "filtered.jsonl"
    write_jsonl(data, [{"prompt": [{"role": "user", "content": "x"}],
                        "completion": [{"role": "assistant", "content": "1, 2"}]}])
    base = vars(parse("train", ["--data", str(data), "--out", str(tmp_path / "s")])[0])
    resolved = {k: v for k, v in base.items() if not k.startswith("_") and k not in
                ("verb", "config")}
    calls = []
    monkeypatch.setattr("sublearn.pipeline.finetune_api.finetune_api",
                        lambda api, d, out: calls.append(api) or {"job": "fake"})
    cfg = tmp_path / "config-train.yaml"
    cfg.write_text(yaml.safe_dump({**resolved, "model": "openai:gpt-4.1-nano"}))
    assert main(["train", "--config", str(cfg)]) == 0 and calls[0].model == "gpt-4.1-nano"
    # a file resolved before dtype "auto" holds the then default; dtype means nothing to an API
    cfg.write_text(yaml.safe_dump({**resolved, "model": "openai:gpt-4.1-nano",
                                   "dtype": "bfloat16"}))
    assert main(["train", "--config", str(cfg)]) == 0 and len(calls) == 2
    cfg.write_text(yaml.safe_dump({**resolved, "model": "openai:gpt-4.1-nano", "lr": 0.5}))
    assert main(["train", "--config", str(cfg)]) == 2
    assert "--lr" in capsys.readouterr().err


def test_every_verb_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    # `mnist --help` once raised: a bare % in a help text is an argparse format error
    for verb in VERBS:
        assert main([verb, "--help"]) == 0, verb
        assert f"sublearn {verb}" in capsys.readouterr().out


def test_config_yaml_takes_exponent_floats(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads `1e-3` as text; the flag `--lr 1e-3` takes it, so the file does
    import argparse

    from sublearn.config import apply_yaml_defaults

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nepochs: 2\n")
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=1.0)
    apply_yaml_defaults(p, cfg)
    args = p.parse_args([])
    assert args.lr == 0.001 and args.epochs == 2.0


def test_an_unreadable_input_gets_no_resume_advice(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # resuming helps work that was interrupted, not an input that cannot be read
    assert main(["sweep", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Is a directory" in err and "resume" not in err and err.count("\n") == 1
