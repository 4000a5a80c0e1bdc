"""Tests for the MNIST auxiliary-logit experiment (sublearn.mnist.experiment, `sublearn mnist`)."""

from __future__ import annotations

import gzip
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sublearn.cli import main
from sublearn.errors import SublearnError
from sublearn.mnist import experiment as mnist
from sublearn.mnist.experiment import AUX, N_CLASSES, MnistConfig

# threads=1: these tiny steps are overhead-bound, and spare threads only contend on a busy box
TINY = {
    "n_seeds": 2,
    "hidden": 32,
    "batch_size": 64,
    "teacher_steps": 6,
    "student_steps": 4,
    "threads": 1,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def fake_mnist(n_train: int = 50, n_test: int = 20) -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    return {
        "x_train": r.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": r.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": r.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": r.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_fake_idx_dir(folder: Path, gz: bool) -> dict[str, np.ndarray]:
    arrays = fake_mnist()
    for key, name in mnist.IDX_FILES.items():
        write_idx(folder / (name + (".gz" if gz else "")), arrays[key])
    return arrays


# -- model --------------------------------------------------------------------------------


def test_init_shapes_and_scale() -> None:
    params = mnist.init_mlp([64, 256, 256, 13], 4, torch.Generator().manual_seed(0))
    assert [tuple(p.shape) for p in params] == [
        (4, 64, 256), (4, 1, 256), (4, 256, 256), (4, 1, 256), (4, 256, 13), (4, 1, 13),
    ]  # fmt: skip
    for w, b in zip(params[::2], params[1::2], strict=True):
        assert w.std().item() == pytest.approx(1 / math.sqrt(w.shape[1]), rel=0.05)
        assert abs(w.mean().item()) < 0.01 and torch.all(b == 0)
    assert not torch.equal(params[0][0], params[0][1])  # seeds are distinct networks
    x = torch.rand(7, 64) * 2 - 1
    shared, per_seed = mnist.forward(params, x), mnist.forward(params, x.expand(4, 7, 64))
    assert shared.shape == (4, 7, 13) and torch.allclose(shared, per_seed)
    assert torch.allclose(shared[2], mnist.forward([p[2:3] for p in params], x)[0], atol=1e-5)


def test_aux_loss_ignores_class_logits() -> None:
    student = torch.randn(3, 5, N_CLASSES + 3, requires_grad=True)
    teacher = torch.randn(3, 5, N_CLASSES + 3)
    mnist.distill_kl(student, teacher, AUX).sum().backward()
    assert torch.all(student.grad[..., :N_CLASSES] == 0)
    assert torch.any(student.grad[..., N_CLASSES:] != 0)
    # rewriting either side's class logits leaves the aux loss untouched...
    s2, t2 = student.detach().clone(), teacher.clone()
    s2[..., :N_CLASSES] += torch.randn(3, 5, N_CLASSES) * 5
    t2[..., :N_CLASSES] += torch.randn(3, 5, N_CLASSES) * 5
    base = mnist.distill_kl(student.detach(), teacher, AUX)
    assert torch.allclose(mnist.distill_kl(s2, t2, AUX), base)
    # ...while the all-logit loss sees them, and matching logits give zero loss
    assert not torch.allclose(mnist.distill_kl(s2, t2, mnist.ALL), mnist.distill_kl(
        student.detach(), teacher, mnist.ALL))  # fmt: skip
    assert torch.allclose(mnist.distill_kl(teacher, teacher, mnist.ALL), torch.zeros(3))


def test_class_ce_ignores_aux_logits() -> None:
    logits, y = torch.randn(2, 6, N_CLASSES + 3), torch.randint(0, 10, (6,))
    changed = logits.clone()
    changed[..., N_CLASSES:] += 100.0  # would dominate a softmax over all 13 logits
    assert torch.allclose(mnist.class_ce(logits, y), mnist.class_ce(changed, y))
    ref = torch.nn.functional.cross_entropy(logits[1, :, :N_CLASSES], y)
    assert mnist.class_ce(logits, y)[1].item() == pytest.approx(ref.item(), rel=1e-5)


def test_seeds_train_independently() -> None:
    """Vectorised seeds must not share gradients: perturbing seed 1 leaves seed 0 exact."""
    cfg = MnistConfig(**TINY)
    data = mnist.load_data(cfg)
    init = mnist.init_mlp([64, 32, 32, 13], 2, torch.Generator().manual_seed(0))
    other = [p.clone() for p in init]
    other[0][1] += 1.0
    a = mnist.train_teacher(init, data["x_train"], data["y_train"], cfg)
    b = mnist.train_teacher(other, data["x_train"], data["y_train"], cfg)
    assert all(torch.allclose(p[0], q[0]) for p, q in zip(a, b, strict=True))
    assert not torch.allclose(a[0][1], b[0][1])
    students = mnist.distill({"s": (init, AUX)}, a, cfg)["s"]
    assert not all(torch.equal(p, q) for p, q in zip(students, init, strict=True))


def test_config_validation() -> None:
    with pytest.raises(SublearnError, match="n-seeds"):
        MnistConfig(n_seeds=0)
    with pytest.raises(SublearnError, match="test-fraction"):
        MnistConfig(test_fraction=1.5)


# -- data ---------------------------------------------------------------------------------


def test_digits_default_split() -> None:
    data = mnist.load_data(MnistConfig())
    assert data["x_train"].shape == (1437, 64) and data["x_test"].shape == (360, 64)
    assert data["x_train"].min() == -1 and data["x_train"].max() == 1
    assert data["x_train"].dtype == torch.float32 and data["y_train"].dtype == torch.int64
    assert torch.equal(mnist.load_data(MnistConfig())["y_test"], data["y_test"])  # fixed split


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_fake_idx_dir(tmp_path, gz)
    name = mnist.IDX_FILES["x_train"] + (".gz" if gz else "")
    assert np.array_equal(mnist.read_idx(tmp_path / name), arrays["x_train"])
    data = mnist.load_data(MnistConfig(data_dir=str(tmp_path)))
    assert data["name"] == "mnist" and data["x_train"].shape == (50, 784)
    expected = torch.from_numpy(arrays["x_test"].reshape(20, -1) / 127.5 - 1).float()
    assert torch.allclose(data["x_test"], expected, atol=1e-6)
    assert torch.equal(data["y_train"], torch.from_numpy(arrays["y_train"].astype(np.int64)))


def test_npz(tmp_path: Path) -> None:
    arrays = fake_mnist()
    np.savez(tmp_path / "mnist.npz", **arrays)
    for where in (tmp_path, tmp_path / "mnist.npz"):
        data = mnist.load_data(MnistConfig(data_dir=str(where)))
        assert data["x_test"].shape == (20, 784)
        assert torch.equal(data["y_test"], torch.from_numpy(arrays["y_test"].astype(np.int64)))


def test_bad_idx_header(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\0\0\0\x01x")
    with pytest.raises(SublearnError, match="not an IDX file"):
        mnist.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(SublearnError, match="header says"):
        mnist.read_idx(tmp_path / "short")


def test_missing_files_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SublearnError) as err:
        mnist.load_data(MnistConfig(data_dir=str(tmp_path)))
    for name in ["mnist.npz", *mnist.IDX_FILES.values()]:
        assert name in str(err.value)
    rc = main(["mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert rc == 2 and stderr.count("\n") == 1 and "train-images-idx3-ubyte" in stderr


def test_shared_head_student_has_other_hidden_layers_and_the_teachers_head() -> None:
    import torch

    sizes = [64, 8, 8, 13]
    ref = mnist.init_mlp(sizes, 2, mnist.rng(0, mnist.STREAM_REF_INIT))
    cross = mnist.init_mlp(sizes, 2, mnist.rng(0, mnist.STREAM_CROSS_INIT))
    starts = mnist.student_starts(ref, cross)
    assert set(starts) == set(mnist.CONDITIONS) - {"reference", "teacher"}
    init, logits = starts["shared_head_aux"]
    assert logits == mnist.AUX and len(init) == 6
    assert all(a is b for a, b in zip(init[:4], cross[:4], strict=True))  # W1 b1 W2 b2
    assert init[4] is ref[4] and init[5] is ref[5]  # the output head of θ0
    assert not torch.equal(init[0], ref[0])


def test_validation_split_holds_out_training_images_only() -> None:
    test = mnist.load_data(MnistConfig())
    val = mnist.load_data(MnistConfig(eval_split="validation"))
    n = len(test["x_train"])
    assert len(val["x_train"]) + len(val["x_test"]) == n
    assert len(val["x_test"]) == math.ceil(0.2 * n)
    assert "validation" in val["name"]
    train = {tuple(r) for r in test["x_train"].tolist()}
    assert all(tuple(r) in train for r in val["x_test"].tolist())  # training images only


# -- end to end ---------------------------------------------------------------------------


def tiny_args(out: Path, seed: int = 0) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    return ["mnist", *flags, "--seed", str(seed), "--out", str(out)]


def test_cli_run_schema_and_determinism(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(tiny_args(tmp_path / "a")) == 0
    assert "same_init_aux" in capsys.readouterr().out  # the table
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert (tmp_path / "a" / "mnist.png").read_bytes()[:4] == b"\x89PNG"
    assert list(res["conditions"]) == list(mnist.CONDITIONS)
    for cond in res["conditions"].values():
        acc = cond["accuracy"]
        assert len(acc["values"]) == 2 and len(acc["ci95"]) == 2
        assert all(0 <= a <= 1 for a in acc["values"])
        assert acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1]
    th = res["theorem"]
    assert set(th["same_init"]) == {"cos_to_teacher_update", "task_loss_change"}
    cos = th["same_init"]["cos_to_teacher_update"]
    assert len(cos["values"]) == 2 and 0 <= cos["frac_positive"] <= 1
    assert "cos_to_teacher_minus_own_init" in th["cross_init"]
    assert res["seeds"] == 2 and res["config"]["teacher_steps"] == 6
    assert res["wall_time_s"] > 0
    # same seed -> identical numbers; another seed -> different networks
    assert main(tiny_args(tmp_path / "b")) == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["conditions"] == res["conditions"] and again["theorem"] == res["theorem"]
    assert main(tiny_args(tmp_path / "c", seed=1)) == 0
    other = json.loads((tmp_path / "c" / "results.json").read_text())
    assert other["conditions"] != res["conditions"]


def test_run_on_idx_data(tmp_path: Path) -> None:
    write_fake_idx_dir(tmp_path, gz=True)
    cfg = MnistConfig(data_dir=str(tmp_path), **TINY)
    res = mnist.run_mnist(cfg, tmp_path / "out")
    assert res["data"] == {"name": "mnist", "n_train": 50, "n_test": 20, "input_dim": 784}
    assert (tmp_path / "out" / "results.json").exists()
