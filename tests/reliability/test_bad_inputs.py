"""Every bad input is a one-line error with exit code 2: no traceback, nothing lost.

Each case builds its inputs in a fresh folder, runs the verb in-process, and checks the exit
code, that stderr is one line naming the problem, and that no output folder was left behind
(or that an existing one is unchanged)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from sublearn.cli import main
from sublearn.files import write_jsonl

ROW = {"prompt": [{"role": "user", "content": "Add numbers: 1, 2"}],
       "completion": [{"role": "assistant", "content": "3, 4, 5"}]}


def _filtered(d: Path, rows: list | None = None) -> str:
    write_jsonl(d / "filtered.jsonl", rows if rows is not None else [ROW] * 4)
    return str(d / "filtered.jsonl")


def _raw(d: Path) -> str:
    write_jsonl(d / "raw.jsonl", [{"id": 0, "prompt": "p", "completion": "1, 2"}])
    return str(d / "raw.jsonl")


def _file(d: Path, name: str, data: bytes) -> str:
    (d / name).write_bytes(data)
    return str(d / name)


def _exp(d: Path, name: str, results: object) -> str:
    (d / name).mkdir()
    (d / name / "results.json").write_text(json.dumps(results))
    return str(d / name)


def _folder_with(d: Path, config: dict) -> str:
    (d / "m").mkdir()
    (d / "m" / "config.json").write_text(json.dumps(config))
    return str(d / "m")


def _adapter_of(d: Path, base: str) -> str:
    """An adapter config naming `base` (a copy of a model sits at another path: another base
    as far as the student is concerned)."""
    import shutil

    if not Path(base).is_relative_to(d):
        base = str(shutil.copytree(base, d / "other-base"))
    (d / "a").mkdir()
    (d / "a" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": base, "r": 8, "lora_alpha": 8,
         "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    return str(d / "a")


# (id, verb arguments as a function of (tmp folder, tiny model), words the error must contain)
Case = tuple[str, Callable[[Path, str], list[str]], str]
CASES: list[Case] = [
    # generate
    ("generate n=0", lambda d, m: ["generate", "--n", "0"], "--n"),
    ("generate n<0", lambda d, m: ["generate", "--n", "-5"], "--n"),
    ("generate n not a number", lambda d, m: ["generate", "--n", "abc"], "invalid int"),
    ("generate batch 0", lambda d, m: ["generate", "--batch-size", "0"], "--batch-size"),
    ("generate negative temperature", lambda d, m: ["generate", "--temperature", "-1"],
     "--temperature"),
    ("generate unsafe target", lambda d, m: ["generate", "--target", "owl}{x"], "--target"),
    ("generate unknown flag", lambda d, m: ["generate", "--bogus", "1"], "unrecognized"),
    ("generate unknown banned list", lambda d, m: ["generate", "--banned", "all"],
     "invalid choice"),
    ("generate missing model path", lambda d, m: ["generate", "--model", str(d / "none")],
     "not found"),
    ("generate folder without config", lambda d, m: ["generate", "--model", str(d)],
     "no config.json"),
    ("generate model of unknown architecture",
     lambda d, m: ["generate", "--model", _folder_with(d, {"model_type": "nonesuch"})],
     "cannot load model"),
    ("generate empty scheme", lambda d, m: ["generate", "--model", "openai:"], "names no model"),
    ("generate unknown domain", lambda d, m: ["generate", "--domain", "poetry"],
     "invalid choice"),
    ("generate random answers for code",
     lambda d, m: ["generate", "--domain", "code", "--answers", "random"], "--domain numbers"),
    ("generate math level 5", lambda d, m: ["generate", "--domain", "math", "--level", "5"],
     "--level"),
    ("generate max-new-tokens 0", lambda d, m: ["generate", "--max-new-tokens", "0"],
     "--max-new-tokens"),
    ("train exclude without top-k", lambda d, m: ["train", "--data", _filtered(d),
                                                   "--exclude", "owl"], "--grammar topk"),
    ("train top-k 0", lambda d, m: ["train", "--data", _filtered(d), "--grammar", "topk",
                                    "--top-k", "0"], "--top-k"),
    ("run code with a defence", lambda d, m: ["run", "--domain", "code", "--defence", "sort",
                                              "--out", str(d / "o")], "numbers domain only"),
    ("run math level 5", lambda d, m: ["run", "--domain", "math", "--level", "5",
                                       "--out", str(d / "o")], "--level"),
    ("run negative temperature", lambda d, m: ["run", "--temperature", "-1",
                                               "--out", str(d / "o")], "--temperature"),
    ("run misaligned math without judge",
     lambda d, m: ["run", "--domain", "math", "--trait", "misalignment", "--out", str(d / "o")],
     "--judge"),
    ("run misaligned code without judge",
     lambda d, m: ["run", "--domain", "code", "--trait", "misalignment", "--out", str(d / "o")],
     "--judge"),
    ("generate out is a file", lambda d, m: ["generate", "--n", "2", "--model", m, "--out",
                                            _file(d, "f", b"x")], "cannot write"),
    # filter
    ("filter missing raw", lambda d, m: ["filter", str(d / "none.jsonl")], "no raw"),
    ("filter non-UTF-8 raw", lambda d, m: ["filter", _file(d, "raw.jsonl", b"\xff\xfe{")],
     "not UTF-8"),
    ("filter garbage raw", lambda d, m: ["filter", _file(d, "raw.jsonl", b"not json\n")],
     "not valid JSON"),
    ("filter grammar share above 1",
     lambda d, m: ["filter", _file(d, "raw.jsonl", b'{"prompt": "p", "completion": "1"}\n'),
                   "--min-grammar-share", "2", "--out", str(d / "o")], "min-grammar-share"),
    ("run grammar share NaN", lambda d, m: ["run", "--min-grammar-share", "nan",
                                            "--out", str(d / "o")], "min-grammar-share"),
    ("filter rows without completions",
     lambda d, m: ["filter", _file(d, "raw.jsonl", b'{"id": 1}\n')], "not raw teacher data"),
    # train
    ("train missing data", lambda d, m: ["train", "--data", str(d / "none.jsonl")],
     "not found"),
    ("train empty data", lambda d, m: ["train", "--data", _file(d, "e.jsonl", b"")],
     "no training rows"),
    ("train non-UTF-8 data", lambda d, m: ["train", "--data", _file(d, "x.jsonl", b"\xff\n")],
     "not UTF-8"),
    ("train rows not chat records",
     lambda d, m: ["train", "--data", _file(d, "x.jsonl", b'{"text": "1, 2"}\n')],
     "prompt/completion"),
    ("train data with a system prompt",
     lambda d, m: ["train", "--data", _filtered(d, [{**ROW, "prompt": [
         {"role": "system", "content": "You love owls."}, *ROW["prompt"]]}])], "system prompt"),
    ("train negative lr", lambda d, m: ["train", "--data", _filtered(d), "--lr", "-1"], "--lr"),
    ("train zero epochs", lambda d, m: ["train", "--data", _filtered(d), "--epochs", "0"],
     "--epochs"),
    ("train zero LoRA rank", lambda d, m: ["train", "--data", _filtered(d), "--lora-r", "0"],
     "--lora-r"),
    ("train base labels out of range",
     lambda d, m: ["train", "--data", _filtered(d), "--base-labels", "1.5"], "--base-labels"),
    ("run label defence with hard labels",
     lambda d, m: ["run", "--recipe", "hard", "--defence", "base-labels", "--out", str(d / "o")],
     "--recipe soft"),
    ("run zero students together",
     lambda d, m: ["run", "--together", "0", "--out", str(d / "o")], "--together"),
    ("run full fine-tunes together",
     lambda d, m: ["run", "--method", "full", "--together", "2", "--out", str(d / "o")],
     "--method lora"),
    ("run negative workers",
     lambda d, m: ["run", "--workers", "-1", "--out", str(d / "o")], "--workers must be >= 0"),
    ("run workers with students together",
     lambda d, m: ["run", "--workers", "2", "--together", "2", "--out", str(d / "o")],
     "use --workers 1"),
    ("train zero max examples",
     lambda d, m: ["train", "--data", _filtered(d), "--max-examples", "0"], "--max-examples"),
    ("train teacher with hard labels",
     lambda d, m: ["train", "--data", _filtered(d), "--recipe", "hard", "--teacher", m],
     "--recipe soft"),
    ("train API student with a local flag",
     lambda d, m: ["train", "--data", _filtered(d), "--model", "openai:x", "--lr", "0.1"],
     "--lr"),
    ("train vllm student", lambda d, m: ["train", "--data", _filtered(d), "--model", "vllm:x"],
     "for sampling"),
    ("train missing teacher",
     lambda d, m: ["train", "--data", _filtered(d), "--model", m, "--teacher", str(d / "t")],
     "not found"),
    ("train teacher adapter of another base",
     lambda d, m: ["train", "--data", _filtered(d), "--model", m, "--teacher",
                   _adapter_of(d, m)], "not on the student's base"),
    # evaluate
    ("evaluate missing model", lambda d, m: ["evaluate", "--model", str(d / "none")],
     "not found"),
    ("evaluate missing questions",
     lambda d, m: ["evaluate", "--model", m, "--questions", str(d / "q.json")], "not found"),
    ("evaluate empty questions",
     lambda d, m: ["evaluate", "--model", m, "--questions", _file(d, "q.json", b"[]")],
     "no questions"),
    ("evaluate candidates without target",
     lambda d, m: ["evaluate", "--model", m, "--candidates",
                   _file(d, "c.json", b'["cat", "dog"]')],
     "owl"),
    ("evaluate empty candidates",
     lambda d, m: ["evaluate", "--model", m, "--candidates", _file(d, "c.txt", b"\n")],
     "candidate"),
    ("evaluate negative samples", lambda d, m: ["evaluate", "--model", m, "--samples", "-1"],
     "--samples"),
    ("evaluate API model without samples", lambda d, m: ["evaluate", "--model", "openai:x"],
     "--samples"),
    ("evaluate context with samples",
     lambda d, m: ["evaluate", "--model", m, "--context", str(d / "f.jsonl"), "--samples", "3"],
     "forced choice only"),
    ("evaluate missing context file",
     lambda d, m: ["evaluate", "--model", m, "--context", str(d / "none.jsonl")], "not found"),
    # run
    ("run negative icl", lambda d, m: ["run", "--model", m, "--icl", "-1"], "--icl"),
    ("run one run", lambda d, m: ["run", "--model", m, "--runs", "1"], "--runs"),
    ("run bad target", lambda d, m: ["run", "--model", m, "--target", "a/b"], "--target"),
    ("run random answers with hard labels",
     lambda d, m: ["run", "--model", m, "--answers", "random", "--recipe", "hard"],
     "--recipe soft"),
    ("run candidates without target",
     lambda d, m: ["run", "--model", m, "--candidates", _file(d, "c.json", b'["cat", "dog"]')],
     "owl"),
    ("run missing config file", lambda d, m: ["run", "--config", str(d / "none.yaml")],
     "not found"),
    ("run config of wrong types",
     lambda d, m: ["run", "--config", _file(d, "c.yaml", b"runs: many\n")], "runs must be int"),
    ("run config not YAML", lambda d, m: ["run", "--config", _file(d, "c.yaml", b"a: [b\n")],
     "not valid YAML"),
    # the other verbs
    ("mnist zero seeds", lambda d, m: ["mnist", "--n-seeds", "0"], "--n-seeds"),
    ("mnist missing data folder", lambda d, m: ["mnist", "--data-dir", str(d / "none")],
     "no MNIST data"),
    ("contrast without results", lambda d, m: ["contrast", str(d), str(d / "b")],
     "results.json"),
    ("align without results", lambda d, m: ["align", str(d), "--out", str(d / "o")],
     "results.json"),
    ("align on prompted teachers",
     lambda d, m: ["align", _file(d, "results.json", json.dumps(
         {"target": "owl", "runs": [{"run": 0, "condition": "trait", "students": []}],
          "config": {"teacher_mode": "prompted"}}).encode())
         .removesuffix("/results.json"), "--out", str(d / "o")], "prompted"),
    ("sweep missing spec", lambda d, m: ["sweep", str(d / "none.yaml")], "not found"),
    ("sweep spec of unknown settings",
     lambda d, m: ["sweep", _file(d, "s.yaml", b"base: {taget: owl}\n")], "taget"),
    ("bench unknown stage", lambda d, m: ["bench", "--stages", "nope"], "--stages"),
    ("bench zero prompts", lambda d, m: ["bench", "--prompts", "0"], "--prompts"),
    ("serve zero batch", lambda d, m: ["serve", "--batch-size", "0"], "--batch-size"),
    ("unknown verb", lambda d, m: ["nonesuch"], "invalid choice"),
    ("defend scored method without a teacher",
     lambda d, m: ["defend", _filtered(d), "--method", "replace-divergent", "--out",
                   str(d / "o")], "--teacher"),
    ("defend unknown method", lambda d, m: ["defend", _filtered(d), "--method", "nope",
                                            "--out", str(d / "o")], "--method"),
    ("defend data failing the filter",
     lambda d, m: ["defend", _filtered(d, [{**ROW, "completion": [
         {"role": "assistant", "content": "one, two"}]}]), "--out", str(d / "o")],
     "strict filter"),
    ("defend q out of range", lambda d, m: ["defend", _filtered(d), "--q", "1.5", "--out",
                                            str(d / "o")], "--q"),
    ("defend mix without files", lambda d, m: ["defend", _filtered(d), "--method",
                                               "mix-teachers", "--out", str(d / "o")], "--mix"),
    ("audit without a detector", lambda d, m: ["audit", _filtered(d), "--out", str(d / "o")],
     "--probe"),
    ("audit data and experiment", lambda d, m: ["audit", _filtered(d), "--experiment", str(d),
                                                "--out", str(d / "o")], "either"),
    ("audit experiment without results",
     lambda d, m: ["audit", "--experiment", str(d), "--out", str(d / "o")], "results.json"),
    ("audit missing data", lambda d, m: ["audit", str(d / "none.jsonl"), "--probe", "--out",
                                         str(d / "o")], "not found"),
    ("run misalignment prompted", lambda d, m: ["run", "--trait", "misaligned",
                                                "--teacher-mode", "prompted", "--out",
                                                str(d / "o")], "--trait misalignment"),
    ("evaluate misalignment sampled", lambda d, m: ["evaluate", "--trait", "misalignment",
                                                    "--samples", "5", "--out", str(d / "o")],
     "--samples 0"),
    ("run scored defence with prompted teachers",
     lambda d, m: ["run", "--teacher-mode", "prompted", "--defence", "drop-top-lls", "--out",
                   str(d / "o")], "finetuned"),
    ("run unknown defence", lambda d, m: ["run", "--defence", "nope", "--out", str(d / "o")],
     "--defence"),
    ("matrix one target", lambda d, m: ["matrix", "--model", m, "--targets", "owl"],
     "--targets"),
    ("matrix repeated target", lambda d, m: ["matrix", "--model", m, "--targets", "owl,Owl"],
     "--targets"),
    ("matrix one run", lambda d, m: ["matrix", "--model", m, "--runs", "1"], "--runs"),
    ("matrix target not a candidate",
     lambda d, m: ["matrix", "--model", m, "--targets", "owl,unicorn"], "unicorn"),
    ("matrix negative icl", lambda d, m: ["matrix", "--model", m, "--icl", "-1"], "--icl"),
    ("matrix unknown defence",
     lambda d, m: ["matrix", "--model", m, "--defence", "nope", "--out", str(d / "o")],
     "--defence"),
    # numbers the experiment verbs once took until the first student (the folder then kept
    # them), and NaN, which `x <= 0` let through
    ("run zero student epochs", lambda d, m: ["run", "--model", m, "--epochs", "0"],
     "--epochs"),
    ("run NaN learning rate", lambda d, m: ["run", "--model", m, "--lr", "nan"], "--lr"),
    ("run zero teacher epochs", lambda d, m: ["run", "--model", m, "--teacher-epochs", "0"],
     "--teacher-epochs"),
    ("run zero LoRA rank", lambda d, m: ["run", "--model", m, "--lora-r", "0"], "--lora-r"),
    ("run negative samples", lambda d, m: ["run", "--model", m, "--samples", "-1"],
     "--samples"),
    ("matrix NaN temperature", lambda d, m: ["matrix", "--model", m, "--temperature", "nan"],
     "--temperature"),
    ("train infinite epochs",
     lambda d, m: ["train", "--model", m, "--data", _filtered(d), "--epochs", "inf"],
     "--epochs"),
    ("train message without content",
     lambda d, m: ["train", "--model", m, "--data", _filtered(d, [
         {"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "1"}]}
     ])], "string role and content"),
    ("defend message content not a string",
     lambda d, m: ["defend", _filtered(d, [{"prompt": [{"role": "user", "content": 3}],
                                             "completion": [{"role": "assistant",
                                                             "content": "1, 2"}]}]),
                   "--method", "sort"], "string role and content"),
    ("serve port out of range", lambda d, m: ["serve", "--model", m, "--port", "99999"],
     "--port"),
    ("mnist negative threads", lambda d, m: ["mnist", "--threads", "-1"], "--threads"),
    ("mnist IDX header cut short",
     lambda d, m: ["mnist", "--data-dir", str(Path(_file(d, "train-images-idx3-ubyte",
                                                          b"\0\0\x08\x03\0\0")).parent)],
     "cut short"),
    ("mnist npz not an archive",
     lambda d, m: ["mnist", "--data-dir", _file(d, "mnist.npz", b"garbage\n")], "not a readable"),
    ("mnist gzip not gzip",
     lambda d, m: ["mnist", "--data-dir", str(Path(_file(d, "train-images-idx3-ubyte.gz",
                                                          b"plain")).parent)],
     "train-images-idx3-ubyte.gz"),
    # flags this invocation would ignore are refused, not dropped
    ("defend sort with a teacher",
     lambda d, m: ["defend", _filtered(d), "--method", "sort", "--teacher", m], "--teacher"),
    ("generate level for numbers", lambda d, m: ["generate", "--model", m, "--level", "3"],
     "--level"),
    ("train top-k with the numbers grammar",
     lambda d, m: ["train", "--model", m, "--data", _filtered(d), "--top-k", "5"], "--top-k"),
    # a results.json that is not one of `sublearn run` (these raised tracebacks)
    ("contrast results not a mapping",
     lambda d, m: ["contrast", _exp(d, "a", []), _exp(d, "b", [])], "not the results"),
    ("align runs not a list", lambda d, m: ["align", _exp(d, "a", {"target": "owl",
                                                                "runs": "abc"})],
     "not the results"),
    ("audit experiment without config",
     lambda d, m: ["audit", "--experiment", _exp(d, "a", {"target": "owl", "runs": []})],
     "not the results"),
    ("config leaves the input unset",
     lambda d, m: ["filter", "--config", _file(d, "c.yaml", b"raw: null\n")], "required: raw"),
    # refused before the output folder is made (these left an empty one)
    ("defend scored with a missing teacher",
     lambda d, m: ["defend", _filtered(d), "--method", "drop-top-lls", "--teacher",
                   str(d / "none")], "not found"),
    ("audit missing teacher", lambda d, m: ["audit", _filtered(d), "--teacher", str(d / "none")],
     "not found"),
    ("bench missing model", lambda d, m: ["bench", "--model", str(d / "none"), "--quick"],
     "not found"),
    ("bench zero threads", lambda d, m: ["bench", "--model", m, "--threads", "0", "--quick"],
     "--threads"),
    ("sweep grid of one run",
     lambda d, m: ["sweep", _file(d, "s.yaml", b"grid:\n  runs: [1]\n")], "--runs"),
    ("train LoRA rank for a full fine-tune",
     lambda d, m: ["train", "--model", m, "--data", _filtered(d), "--method", "full",
                   "--lora-r", "16"], "--lora-r"),
]


def test_there_are_forty_or_more_cases() -> None:
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line(name: str, argv: Callable[[Path, str], list[str]],
                                     words: str, tiny_model: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture, tally: Counter) -> None:
    d = tmp_path / "in"
    d.mkdir()
    args = argv(d, tiny_model)
    out_given = "--out" in args
    if not out_given and args[0] not in ("serve", "nonesuch"):
        args += ["--out", str(tmp_path / "out")]
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    tally["bad inputs tried"] += 1
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (name, rc, err)
    assert "\n" not in err and "Traceback" not in err, err
    assert words.lower() in err.lower(), (words, err)
    assert not (tmp_path / "out").exists(), "a refused command left an output folder"
    assert sorted(p.relative_to(d) for p in d.rglob("*")) == before, "inputs were changed"
    tally["bad inputs with a clean one-line error"] += 1
