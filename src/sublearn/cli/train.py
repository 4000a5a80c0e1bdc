from __future__ import annotations

import argparse
import json

HELP = "fine-tune a student on filtered teacher data (hard labels or soft-label distillation)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.train import TrainConfig

    p.add_argument("--data", required=True, help="filtered.jsonl from `sublearn generate`")
    add_dataclass_flags(p, TrainConfig)
    p.add_argument("--out", required=True, help="student folder (adapter/ or model/ inside)")


def run(args: argparse.Namespace) -> int:
    from sublearn.config import dataclass_from_args
    from sublearn.train import TrainConfig, train

    if args.model and args.model.startswith("openai/"):
        # Same verb, remote student: an OpenAI fine-tuning job (epochs and seed carry over).
        from sublearn.finetune_api import APITrainConfig, finetune_api

        api = APITrainConfig(model=args.model.removeprefix("openai/"),
                             epochs=max(1, round(args.epochs)), seed=args.seed)
        summary = finetune_api(api, args.data, args.out)
        print(json.dumps(summary, indent=2))
        return 0
    summary = train(dataclass_from_args(TrainConfig, args), args.data, args.out)
    print(json.dumps(summary, indent=2))
    return 0
