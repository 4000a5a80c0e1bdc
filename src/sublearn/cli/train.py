from __future__ import annotations

import argparse
import json

# Settings an API fine-tuning job takes from the local recipe; every other recipe flag would be
# silently ignored by a remote student, so it is refused.
API_SETTINGS = {"model", "epochs", "seed", "data", "out", "config"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.pipeline.train_config import TrainConfig

    p.add_argument("--data", required=True, help="filtered.jsonl from `sublearn generate`")
    add_dataclass_flags(p, TrainConfig)
    p.add_argument("--out", required=True, help="student folder (adapter/ or model/ inside)")


def run(args: argparse.Namespace) -> int:
    from sublearn.cli import asked_for
    from sublearn.config import dataclass_from_args
    from sublearn.errors import SublearnError
    from sublearn.models.load import parse_model_spec
    from sublearn.pipeline.train_config import TrainConfig

    scheme, name = parse_model_spec(args.model)
    if scheme == "openai":
        # Same verb, remote student: an OpenAI fine-tuning job (epochs and seed carry over).
        from sublearn.pipeline.finetune_api import APITrainConfig, finetune_api

        # A flag typed for an API student is refused; a config file (a resolved one holds every
        # setting) is refused only where it asks for something other than the default. Its
        # dtype is never refused: files written before "auto" hold the then default, bfloat16.
        ignored = [f for f in asked_for(args, args._given - API_SETTINGS, TrainConfig())
                   if f != "--dtype" or "dtype" not in args._from_config]
        if ignored:
            raise SublearnError(f"{', '.join(ignored)}: not used by an API fine-tuning job "
                                "(openai: students take only --epochs and --seed)")
        api = APITrainConfig(model=name, epochs=max(1, round(args.epochs)), seed=args.seed)
        summary = finetune_api(api, args.data, args.out)
    elif scheme == "vllm":
        raise SublearnError("vllm: models are for sampling; train a local model (hf:<id>, a "
                            "folder or an embedded name) and serve its adapter with vLLM")
    else:
        from sublearn.pipeline.train import train

        unused = ({"top_k"} if args.grammar != "topk" else set()) | \
            ({"lora_r", "lora_alpha"} if args.method == "full" else set())
        if ignored := asked_for(args, unused, TrainConfig()):
            raise SublearnError(f"{', '.join(ignored)}: not used here (--top-k: --grammar topk "
                                "soft labels; --lora-r, --lora-alpha: --method lora)")
        summary = train(dataclass_from_args(TrainConfig, args), args.data, args.out)
    print(json.dumps(summary, indent=2))
    return 0
