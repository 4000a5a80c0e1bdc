from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiments", nargs="+",
                   help="`sublearn run` folders with fine-tuned teachers, one target each and "
                        "one base model (more than one adds the other traits' teachers as a "
                        "reference)")
    p.add_argument("--out", required=True, help="output folder (align.json, report.md)")


def run(args: argparse.Namespace) -> int:
    from sublearn.experiment.align import align, format_report
    from sublearn.files import (
        atomic_write_json,
        atomic_write_text,
        check_out_dir,
        ensure_writable_dir,
    )

    check_out_dir(args.out)
    res = align(args.experiments)
    out = ensure_writable_dir(args.out)
    atomic_write_json(out / "align.json", res)
    atomic_write_text(out / "report.md", format_report(res))
    for target, s in res["summary"].items():
        own, sp = s["own"], s.get("specific")
        line = (f"{target}: students toward their own teachers cos {own['mean']:+.4f} "
                f"[{own['ci95'][0]:+.4f}, {own['ci95'][1]:+.4f}] ({own['positive']}/{own['n']} "
                "runs positive)")
        if sp is not None:
            line += (f"; specific to {target} {sp['mean']:+.4f} [{sp['ci95'][0]:+.4f}, "
                     f"{sp['ci95'][1]:+.4f}]")
            if "p_t" in sp:
                line += f", p {sp['p_t']:.2g} (t) / {sp['p_sign_flip']:.2g} (sign-flip)"
        print(line)
    return 0
