from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.experiment.run import ExperimentConfig

    add_dataclass_flags(p, ExperimentConfig)
    p.add_argument("--out", required=True, help="experiment folder (cached stages inside)")
    p.add_argument("--stage-cache", default=None, metavar="DIR",
                   help="keep the stages in DIR, shared with other experiments given the same "
                        "DIR (OUT/stages links there): what they have in common, such as every "
                        "target's control runs, is made once")


def run(args: argparse.Namespace) -> int:
    from sublearn.config import dataclass_from_args
    from sublearn.experiment.run import ExperimentConfig, run_experiment

    res = run_experiment(dataclass_from_args(ExperimentConfig, args), args.out,
                         stage_cache=args.stage_cache)
    primary = res["primary_metric"]
    print(f"\n{primary} for target '{res['target']}' (mean [95% CI] over runs):")
    for cond, metrics in res["conditions"].items():
        m = metrics[primary]
        print(f"  {cond:16s} {m['mean']:.4f}  [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]"
              f"  n={len(m['values'])}")
    e = res["effects"][primary]
    ratio = e["ratio"]["estimate"]
    lo, hi = e["ratio"]["ci95"]
    if ratio is not None:
        print(f"  trait / control: {ratio:.2f}x [{lo:.2f}, {hi:.2f}]")
    print(f"  p (trait > control over runs): Welch {e['p_welch']:.3g}, "
          f"exact permutation {e['p_permutation']:.3g}")
    peak = res.get("peak_rss_gb")
    mem = f"; peak RSS {peak['process']:.1f} GiB (in {peak['reached_in']})" if peak else ""
    print(f"  wall time: {res['wall_seconds']:.0f} s{mem}; report: {args.out}/report.md")
    return 0
