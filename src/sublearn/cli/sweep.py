from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="sweep YAML: 'base' (experiment settings) and 'grid' (lists)")
    p.add_argument("--out", required=True, help="sweep folder (one subfolder per run)")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local process pool or a Ray cluster (default: local)")
    p.add_argument("--workers", type=int, default=1,
                   help="local: runs at once, each in its own process (default: 1)")
    p.add_argument("--address", default=None,
                   help="ray: cluster address (e.g. ray://head:10001 or auto; default: start "
                        "a local Ray instance)")
    p.add_argument("--cpus-per-run", type=float, default=1.0,
                   help="ray: CPUs reserved per run (default: 1)")
    p.add_argument("--retries", type=int, default=1,
                   help="extra attempts for a failed run (default: 1)")
    p.add_argument("--share-stages", action="store_true",
                   help="the runs keep their stages in one cache (OUT/stages), so that runs "
                        "differing only in later settings share what they have in common "
                        "(teachers and data when only student settings differ)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sublearn.errors import SublearnError
    from sublearn.experiment.sweep import load_spec, local_executor, ray_executor, run_sweep

    spec = load_spec(args.spec)
    if args.dry_run:
        for r in spec.expand():
            print(f"{r.name}: {r.values}")
        return 0
    if args.workers < 1:
        raise SublearnError("--workers must be at least 1")
    if args.executor == "ray":
        execute = ray_executor(args.address, args.cpus_per_run)
    else:
        execute = local_executor(args.workers)
    rows = run_sweep(spec, args.out, execute, retries=args.retries, share=args.share_stages)
    print((Path(args.out) / "summary.md").read_text(), end="")
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    if failed:
        print(f"sublearn sweep: {len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0
