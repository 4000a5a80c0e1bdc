from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", help="experiment folder (from `sublearn run`)")
    p.add_argument("run_b", help="experiment folder with another target")
    p.add_argument("--out", required=True, help="output folder (contrast.json inside)")


def run(args: argparse.Namespace) -> int:
    from sublearn.experiment.contrast import contrast
    from sublearn.files import atomic_write_json, check_out_dir, ensure_writable_dir

    check_out_dir(args.out)
    res = contrast(args.run_a, args.run_b)
    atomic_write_json(ensure_writable_dir(args.out) / "contrast.json", res)
    for animal, s in res["scores"].items():
        own, other = s[f"{animal}_students"], s["other_students"]
        print(f"{animal} share: {animal}-teacher students {own['mean']:.4f} "
              f"[{own['ci95'][0]:.4f}, {own['ci95'][1]:.4f}] vs other students "
              f"{other['mean']:.4f} [{other['ci95'][0]:.4f}, {other['ci95'][1]:.4f}], "
              f"p = {s['p_value']:.3g}")
    return 0
