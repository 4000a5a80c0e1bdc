"""The paper's MNIST subliminal-learning experiment (Cloud et al. 2025, arXiv 2507.14805, §6).

A teacher MLP with 10 class logits plus m auxiliary logits is trained on digits from a
reference initialisation θ0. Students are then distilled on uniform noise images only,
matching the teacher's softmax over either the auxiliary logits ("aux", which were never
trained) or all logits ("all"). A student that starts from θ0 (same init) picks up the
digit task through the aux logits; a student from another init (cross init) should not.

Every seed runs at once: each weight is a tensor [seeds, fan_in, fan_out] and a single
Adam steps them all; per-seed losses are summed so the seeds' gradients never mix.

Heavy imports (torch, numpy, scipy, sklearn, matplotlib) live inside the functions so that
`sublearn --help`, which builds flags from `MnistConfig`, stays instant.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sublearn.errors import SublearnError, first_line
from sublearn.experiment.stats import summarize
from sublearn.files import atomic_savefig, atomic_write_json, check_out_dir, ensure_writable_dir
from sublearn.models.load import warm_math_kernels

if TYPE_CHECKING:
    import numpy as np
    import torch

N_CLASSES = 10
MNIST_STEPS_PER_EPOCH = 60000 / 1024  # the paper's 5 epochs, in steps, is our step budget
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
CONDITIONS = (
    "reference",
    "teacher",
    "same_init_aux",
    "same_init_all",
    "cross_init_aux",
    "cross_init_all",
    "shared_head_aux",
)
# Independent random streams, so changing one stage's length never shifts another's draws.
STREAM_REF_INIT, STREAM_CROSS_INIT, STREAM_TEACHER, STREAM_NOISE, STREAM_THEOREM = range(5)
EVAL_CHUNK = 4096  # rows per forward pass at evaluation: bounds activation memory on MNIST


@dataclass
class MnistConfig:
    seed: int = field(default=0, metadata={"help": "master seed; the run is deterministic in it"})
    n_seeds: int = field(default=10, metadata={"help": "independent runs, vectorised (paper: 100)"})
    data_dir: str = field(
        default="",
        metadata={
            "help": "folder with MNIST IDX files (optionally .gz) or mnist.npz; "
            "empty = scikit-learn's bundled 8x8 digits"
        },
    )
    test_fraction: float = field(
        default=0.2, metadata={"help": "held-out share of the 8x8 digits (stratified, fixed)"}
    )
    eval_split: str = field(default="test", metadata={
        "help": "test: score on the test set; validation: hold out 20%% of the training images "
                "(stratified, fixed) and score on them, to choose settings without the test set",
        "choices": ["test", "validation"]})
    hidden: int = field(default=256, metadata={"help": "width of both hidden layers"})
    # m = 10 and lr 3e-3 were chosen on a validation split of the training digits (README):
    # same-init aux-only students 0.36 -> 0.88 there, at the paper's step budget
    aux_logits: int = field(default=10, metadata={
        "help": "auxiliary logits m, never supervised (paper: 3)"})
    lr: float = field(default=3e-3, metadata={
        "help": "Adam learning rate, teacher and students"})
    batch_size: int = field(default=1024, metadata={"help": "images (or noise images) per step"})
    teacher_steps: int = field(
        default=round(5 * MNIST_STEPS_PER_EPOCH),
        metadata={"help": "teacher optimiser steps; default = 5 MNIST epochs at batch 1024"},
    )
    student_steps: int = field(
        default=round(5 * MNIST_STEPS_PER_EPOCH),
        metadata={"help": "student distillation steps on noise (paper: same as the teacher)"},
    )
    theorem_eps: float = field(
        default=1e-3, metadata={"help": "step size of the one-step gradient-descent theorem check"}
    )
    threads: int = field(
        default=0,
        metadata={"help": "torch CPU threads; 0 = usable cores not already busy (load average)"},
    )

    def __post_init__(self) -> None:
        positive = ("n_seeds", "hidden", "aux_logits", "batch_size", "teacher_steps")
        for name in positive + ("student_steps",):
            if getattr(self, name) < (1 if name in positive else 0):
                raise SublearnError(f"--{name.replace('_', '-')} must be positive")
        if self.threads < 0:
            raise SublearnError(f"--threads must be >= 0 (0: the free cores), got {self.threads}")
        if not 0 < self.test_fraction < 1:
            raise SublearnError("--test-fraction must be between 0 and 1")
        if not (0 < self.lr < float("inf") and 0 < self.theorem_eps < float("inf")):
            raise SublearnError("--lr and --theorem-eps must be positive and finite")


# ---------------------------------------------------------------------------------------
# data


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file: 2 zero bytes, a dtype code, ndim, ndim big-endian uint32 sizes, data."""
    import numpy as np

    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError) as e:
        raise SublearnError(f"{path}: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in dtypes:
        raise SublearnError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise SublearnError(f"{path} is cut short inside its IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise SublearnError(f"{path} holds {data.size} values, header says {dims}")
    return data.reshape(dims)


def _load_mnist_arrays(data_dir: Path) -> dict[str, np.ndarray]:
    import numpy as np

    npz = data_dir if data_dir.suffix == ".npz" else data_dir / "mnist.npz"
    if npz.is_file():
        import zipfile

        try:  # no pickles: allow_pickle stays off
            with np.load(npz) as z:
                missing = [k for k in IDX_FILES if k not in z]
                if missing:
                    raise SublearnError(f"{npz} lacks arrays {', '.join(missing)}")
                return {k: z[k] for k in IDX_FILES}
        except (ValueError, zipfile.BadZipFile, EOFError) as e:
            raise SublearnError(f"{npz} is not a readable .npz of arrays: "
                                f"{first_line(e)}") from None
    arrays = {}
    for key, name in IDX_FILES.items():
        found = [p for p in (data_dir / name, data_dir / f"{name}.gz") if p.is_file()]
        if not found:
            raise SublearnError(
                f"no MNIST data in {data_dir}: expected mnist.npz (x_train, y_train, x_test, "
                f"y_test) or {', '.join(IDX_FILES.values())} (each optionally .gz)"
            )
        arrays[key] = read_idx(found[0])
    return arrays


def load_data(cfg: MnistConfig) -> dict[str, Any]:
    """Train/test tensors with pixels scaled to [-1, 1], as in the paper."""
    import numpy as np
    import torch

    if cfg.data_dir:
        a = _load_mnist_arrays(Path(cfg.data_dir))
        name, pixel_max = "mnist", 255.0
        for split in ("train", "test"):
            if len(a[f"x_{split}"]) != len(a[f"y_{split}"]):
                raise SublearnError(f"MNIST {split} images and labels differ in count")
    else:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        keys = ("x_train", "x_test", "y_train", "y_test")
        split = train_test_split(x, y, test_size=cfg.test_fraction, stratify=y, random_state=0)
        a = dict(zip(keys, split, strict=True))
        name, pixel_max = "sklearn_digits_8x8", 16.0
    out: dict[str, Any] = {"name": name}
    for split in ("train", "test"):
        x = np.asarray(a[f"x_{split}"], dtype=np.float32).reshape(len(a[f"x_{split}"]), -1)
        y = np.asarray(a[f"y_{split}"]).astype(np.int64).reshape(-1)
        if y.size and (y.min() < 0 or y.max() >= N_CLASSES):
            raise SublearnError(f"{name} {split} labels must lie in 0..9")
        out[f"x_{split}"] = torch.from_numpy(x / (pixel_max / 2) - 1)
        out[f"y_{split}"] = torch.from_numpy(y)
    if cfg.eval_split == "validation":  # the test set is left untouched
        from sklearn.model_selection import train_test_split

        y = out["y_train"].numpy()
        xt, xv, yt, yv = train_test_split(out["x_train"].numpy(), y, test_size=0.2, stratify=y,
                                          random_state=1)
        out.update(name=f"{name}, validation split of the training images",
                   x_train=torch.from_numpy(xt), y_train=torch.from_numpy(yt),
                   x_test=torch.from_numpy(xv), y_test=torch.from_numpy(yv))
    return out


# ---------------------------------------------------------------------------------------
# model: a batch of MLPs, params = [W1, b1, W2, b2, W3, b3], W: [S, fan_in, fan_out]


def init_mlp(sizes: list[int], n_seeds: int, gen: torch.Generator) -> list[torch.Tensor]:
    import torch

    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        params.append(torch.randn(n_seeds, fan_in, fan_out, generator=gen) / math.sqrt(fan_in))
        params.append(torch.zeros(n_seeds, 1, fan_out))  # [S, 1, out] broadcasts over rows
    return params


def forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x: [N, D] shared by all seeds, or [S, N, D] per seed -> logits [S, N, 10 + m]."""
    h = x if x.dim() == 3 else x.expand(params[0].shape[0], -1, -1)
    for i in range(0, len(params), 2):
        h = params[i + 1].baddbmm(h, params[i])  # bias + h @ W in one kernel: CPU is memory-bound
        if i + 2 < len(params):
            h = h.relu_()  # in place: baddbmm's backward never needs its output
    return h


def predict(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        # cast per chunk, so float64 checks never hold a float64 copy of the whole set
        chunks = x.split(EVAL_CHUNK)
        return torch.cat([forward(params, c.to(params[0].dtype)) for c in chunks], dim=1)


def class_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-seed mean cross-entropy over the 10 class logits only; y: [N] or [S, N] -> [S]."""
    logp = logits[..., :N_CLASSES].log_softmax(-1)
    y = y.expand(logits.shape[:2])
    return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(-1)


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, logits: slice) -> torch.Tensor:
    """Per-seed KL(teacher || student) over the chosen logits' softmax -> [S]."""
    t = teacher[..., logits].log_softmax(-1)
    s = student[..., logits].log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean(-1)


AUX = slice(N_CLASSES, None)  # condition "aux": the m logits the teacher never trained
ALL = slice(None)  # condition "all": every logit, class ones included


def accuracy(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[float]:
    pred = predict(params, x)[..., :N_CLASSES].argmax(-1)
    return (pred == y).double().mean(-1).tolist()


# ---------------------------------------------------------------------------------------
# training


def rng(seed: int, stream: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def train_teacher(
    init: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg: MnistConfig
) -> list[torch.Tensor]:
    """Cross-entropy on class logits only; each seed reshuffles the data every epoch."""
    import torch

    params = [p.clone().requires_grad_() for p in init]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen, step = rng(cfg.seed, STREAM_TEACHER), 0
    while step < cfg.teacher_steps:
        order = torch.rand(cfg.n_seeds, len(x), generator=gen).argsort(dim=1)
        for idx in order.split(cfg.batch_size, dim=1)[: cfg.teacher_steps - step]:
            loss = class_ce(forward(params, x[idx]), y[idx]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return [p.detach() for p in params]


def distill(
    starts: dict[str, tuple[list[torch.Tensor], slice]],
    teacher: list[torch.Tensor],
    cfg: MnistConfig,
) -> dict[str, list[torch.Tensor]]:
    """Train each student (name -> (init, logits to match)) on fresh U(-1, 1) noise per step;
    none ever sees a real image. All share each noise batch and the teacher's forward pass
    on it, so conditions differ only in init and logits (and the teacher runs once)."""
    import torch

    students = {
        name: [p.clone().requires_grad_() for p in init] for name, (init, _) in starts.items()
    }
    opts = {name: torch.optim.Adam(ps, lr=cfg.lr) for name, ps in students.items()}
    gen, dim = rng(cfg.seed, STREAM_NOISE), teacher[0].shape[1]
    for _ in range(cfg.student_steps):
        noise = torch.rand(cfg.n_seeds, cfg.batch_size, dim, generator=gen) * 2 - 1
        with torch.no_grad():
            target = forward(teacher, noise)
        for name, (_, logits) in starts.items():
            loss = distill_kl(forward(students[name], noise), target, logits).sum()
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
    return {name: [p.detach() for p in ps] for name, ps in students.items()}


# ---------------------------------------------------------------------------------------
# theorem check: one small gradient step on the aux distillation loss


def _cos(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    """Per-seed cosine between two parameter lists, each flattened over all tensors."""
    dot = sum((x * y).flatten(1).sum(1) for x, y in zip(a, b, strict=True))
    na = sum(x.pow(2).flatten(1).sum(1) for x in a).sqrt()
    nb = sum(y.pow(2).flatten(1).sum(1) for y in b).sqrt()
    return (dot / (na * nb)).tolist()


def theorem_step(
    start: list[torch.Tensor], teacher: list[torch.Tensor], data: dict[str, Any], cfg: MnistConfig
) -> tuple[list[torch.Tensor], list[float]]:
    """Δθ = -ε ∇ KL_aux at `start` on one noise batch, and the resulting change in the
    student's class-logit cross-entropy on the train set. float64: the change is tiny."""
    import torch

    start = [p.double() for p in start]
    teacher = [p.double() for p in teacher]
    gen = rng(cfg.seed, STREAM_THEOREM)
    noise = torch.rand(cfg.n_seeds, cfg.batch_size, start[0].shape[1], generator=gen) * 2 - 1
    noise = noise.double()
    params = [p.clone().requires_grad_() for p in start]
    with torch.no_grad():
        target = forward(teacher, noise)
    grads = torch.autograd.grad(distill_kl(forward(params, noise), target, AUX).sum(), params)
    delta = [-cfg.theorem_eps * g for g in grads]
    x, y = data["x_train"], data["y_train"]
    before = class_ce(predict(start, x), y)
    after = class_ce(predict([p + d for p, d in zip(start, delta, strict=True)], x), y)
    return delta, (after - before).tolist()


def theorem_check(
    ref: list[torch.Tensor],
    cross: list[torch.Tensor],
    teacher: list[torch.Tensor],
    data: dict[str, Any],
    cfg: MnistConfig,
) -> dict[str, Any]:
    teacher_update = [t.double() - r.double() for t, r in zip(teacher, ref, strict=True)]
    same_delta, same_dloss = theorem_step(ref, teacher, data, cfg)
    cross_delta, cross_dloss = theorem_step(cross, teacher, data, cfg)
    cross_offset = [t.double() - c.double() for t, c in zip(teacher, cross, strict=True)]

    def cos_summary(delta: list[torch.Tensor], target: list[torch.Tensor]) -> dict[str, Any]:
        values = _cos(delta, target)
        return {**summarize(values), "frac_positive": sum(v > 0 for v in values) / len(values)}

    def loss_summary(values: list[float]) -> dict[str, Any]:
        return {**summarize(values), "frac_decreased": sum(v < 0 for v in values) / len(values)}

    return {
        "eps": cfg.theorem_eps,
        "note": "delta = -eps * grad of aux-logit KL to the teacher on U(-1,1) noise; "
        "cos_to_teacher_update = cos(delta, theta_teacher - theta0); task_loss_change = "
        "train-set class cross-entropy after minus before the step",
        "same_init": {
            "cos_to_teacher_update": cos_summary(same_delta, teacher_update),
            "task_loss_change": loss_summary(same_dloss),
        },
        "cross_init": {
            "cos_to_teacher_update": cos_summary(cross_delta, teacher_update),
            "cos_to_teacher_minus_own_init": cos_summary(cross_delta, cross_offset),
            "task_loss_change": loss_summary(cross_dloss),
        },
    }


# ---------------------------------------------------------------------------------------
# statistics, plot, report


def plot(conditions: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        "Reference\ninit",
        "Teacher",
        "Same init\naux only",
        "Same init\nall logits",
        "Cross init\naux only",
        "Cross init\nall logits",
        "Shared head\naux only",
    ]
    colors = ["#9e9e9e", "#424242", "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c"]
    accs = [conditions[c]["accuracy"] for c in CONDITIONS]
    means = [a["mean"] for a in accs]
    # a missing CI (one seed) draws no error bar rather than failing
    err = [
        [a["mean"] - a["ci95"][0] for a in accs],
        [a["ci95"][1] - a["mean"] for a in accs],
    ]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(range(len(means)), means, yerr=err, capsize=4, color=colors, edgecolor="black")
    ax.axhline(0.1, color="red", linestyle="--", linewidth=1, label="chance (0.1)")
    ax.set_xticks(range(len(means)), labels)
    ax.set_ylim(0, 1.15)  # headroom above 100% keeps the legend off the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("test accuracy (mean, 95% CI)")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    atomic_savefig(fig, path)


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'condition':<16}{'accuracy':>10}   95% CI"]
    for name, c in results["conditions"].items():
        a = c["accuracy"]
        ci = f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
        lines.append(f"{name:<16}{a['mean']:>10.3f}   {ci}")
    th = results["theorem"]
    for init in ("same_init", "cross_init"):
        cos = th[init]["cos_to_teacher_update"]
        dl = th[init]["task_loss_change"]
        lines.append(
            f"theorem {init}: cos(step, teacher-theta0) mean {cos['mean']:+.4f}, "
            f"positive {cos['frac_positive']:.0%}; task-loss change mean {dl['mean']:+.2e}"
        )
    lines.append(f"wall time {results['wall_time_s']:.1f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# the experiment


def default_threads() -> int:
    """Cores minus the load already on them: on a shared small box, OpenMP threads that
    outnumber the free cores spin against each other (measured ~5x slower per step here).
    Thread count does not change the numbers: bmm splits work over seeds and rows."""
    return max(1, len(os.sched_getaffinity(0)) - int(os.getloadavg()[0]))


def student_starts(ref: list[torch.Tensor], cross: list[torch.Tensor]
                   ) -> dict[str, tuple[list[torch.Tensor], slice]]:
    """Each student condition: (init, logits it matches). θ0 = ref, the teacher's init."""
    return {
        "same_init_aux": (ref, AUX),
        "same_init_all": (ref, ALL),
        "cross_init_aux": (cross, AUX),
        "cross_init_all": (cross, ALL),
        # the 2026 follow-up's variant: hidden layers from another init, the output head
        # (last layer) from θ0, the teacher's
        "shared_head_aux": (cross[:-2] + ref[-2:], AUX),
    }


def run_mnist(cfg: MnistConfig, out_dir: str | Path) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    check_out_dir(out_dir)
    data = load_data(cfg)
    out = ensure_writable_dir(out_dir)
    prev_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads()
    torch.set_num_threads(threads)
    warm_math_kernels()  # the one torch path that loads no model: see load_model
    try:
        sizes = [data["x_train"].shape[1], cfg.hidden, cfg.hidden, N_CLASSES + cfg.aux_logits]
        ref = init_mlp(sizes, cfg.n_seeds, rng(cfg.seed, STREAM_REF_INIT))  # θ0
        cross = init_mlp(sizes, cfg.n_seeds, rng(cfg.seed, STREAM_CROSS_INIT))  # θ0'
        teacher = train_teacher(ref, data["x_train"], data["y_train"], cfg)
        starts = student_starts(ref, cross)
        models = {"reference": ref, "teacher": teacher, **distill(starts, teacher, cfg)}
        conditions = {
            name: {"accuracy": summarize(accuracy(p, data["x_test"], data["y_test"]))}
            for name, p in models.items()
        }
        theorem = theorem_check(ref, cross, teacher, data, cfg)
    finally:
        torch.set_num_threads(prev_threads)
    results = {
        "conditions": conditions,
        "theorem": theorem,
        "config": asdict(cfg),
        "seeds": cfg.n_seeds,
        "data": {
            "name": data["name"],
            "n_train": len(data["x_train"]),
            "n_test": len(data["x_test"]),
            "input_dim": sizes[0],
        },
        "threads": threads,
        "wall_time_s": 0.0,
    }
    title = f"{data['name']}: {cfg.n_seeds} seeds, m={cfg.aux_logits} auxiliary logits"
    plot(conditions, out / "mnist.png", title)
    results["wall_time_s"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", results)
    print(format_table(results), file=sys.stdout)
    return results
