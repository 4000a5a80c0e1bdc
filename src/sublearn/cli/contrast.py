from __future__ import annotations

import argparse

HELP = "contrast the trait students of two experiments with different targets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", help="experiment folder (from `sublearn run`)")
    p.add_argument("run_b", help="experiment folder with another target")
    p.add_argument("--out", default="contrast.json", help="where to write the JSON")


def run(args: argparse.Namespace) -> int:
    from sublearn.contrast import write_contrast

    res = write_contrast(args.run_a, args.run_b, args.out)
    for animal, s in res["scores"].items():
        own, other = s[f"{animal}_students"], s["other_students"]
        print(f"{animal} share: {animal}-teacher students {own['mean']:.4f} "
              f"[{own['ci95'][0]:.4f}, {own['ci95'][1]:.4f}] vs other students "
              f"{other['mean']:.4f} [{other['ci95'][0]:.4f}, {other['ci95'][1]:.4f}], "
              f"p = {s['p_value']:.3g}")
    return 0
