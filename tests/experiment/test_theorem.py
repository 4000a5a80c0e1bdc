"""`sublearn theorem` on a tiny random model (schema, not the science) and its cosine."""

import json
import math
from pathlib import Path

import torch

from sublearn.cli import main
from sublearn.experiment.theorem import cosines


def test_cosines_match_a_flat_computation() -> None:
    g = torch.Generator().manual_seed(0)
    a = {f"model.layers.{i}.mlp.w": torch.randn(3, 4, generator=g) for i in range(2)}
    a["model.embed_tokens.weight"] = torch.randn(5, generator=g)
    b = {"model.layers.1.mlp.w": torch.randn(3, 4, generator=g)}  # zero elsewhere
    flat_a = torch.cat([a[n].flatten() for n in sorted(a)])
    flat_b = torch.cat([b.get(n, torch.zeros_like(a[n])).flatten() for n in sorted(a)])
    want = float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))
    got = cosines(a, b)
    assert math.isclose(got["all"], want, rel_tol=1e-6)
    la, lb = a["model.layers.1.mlp.w"].flatten(), b["model.layers.1.mlp.w"].flatten()
    assert math.isclose(got["per_layer"]["layer01"], float(la @ lb / (la.norm() * lb.norm())),
                        rel_tol=1e-6)
    assert set(got["per_layer"]) == {"layer01"}  # b has no weight in layer 0 or "other"


def test_theorem_writes_cosines_per_run(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    assert main(["theorem", "--model", tiny_model, "--target", "owl", "--n", "8", "--runs", "2",
                 "--epochs", "1", "--batch-size", "4", "--teacher-epochs", "1",
                 "--icl", "0", "--min-grammar-share", "0", "--out", str(out)]) == 0
    res = json.loads((out / "theorem.json").read_text())
    assert [r["run"] for r in res["runs"]] == [0, 1]
    for recipe in ("soft", "hard"):
        for m in ("trait_data__trait_teacher", "control_data__control_teacher",
                  "trait_data__control_teacher", "paired"):
            v = res[recipe][m]
            assert len(v["values"]) == 2 and all(-1 <= x <= 1 for x in v["values"])
            assert 0 <= v["p_sign"] <= 1 and set(v["per_layer_mean"]) == {"layer00", "layer01"}
    assert "## soft labels" in (out / "theorem.md").read_text()
    # the teachers and data are `sublearn run`'s stages: the same folder reuses them
    stages = sorted(p.name.rsplit("-", 1)[0] for p in (out / "stages").iterdir())
    assert stages.count("teacher_trait_run0") == 1 and "theorem_run1" in stages
    assert main(["theorem", "--model", tiny_model, "--target", "owl", "--n", "8", "--runs",
                 "2", "--epochs", "1", "--batch-size", "4", "--teacher-epochs", "1",
                 "--icl", "0", "--min-grammar-share", "0", "--out", str(out)]) == 0
    assert json.loads((out / "theorem.json").read_text())["runs"] == res["runs"]
