"""Our artefacts load in the field's stock tools: the cached embedded model and a full-fine-tuned
student train with TRL's SFTTrainer, a LoRA student loads with stock PEFT, and filtered.jsonl
loads with `datasets` (slow: the embedded SmolLM2-135M)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sublearn.cli import main
from sublearn.files import write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A filtered.jsonl as `sublearn generate` writes it (answers that pass the strict filter)."""
    from sublearn.domains import numbers
    from sublearn.pipeline.filter import training_record

    prompts = numbers.make_prompts(8, seed=0)
    answers = ["123, 456, 789", "12 34 56", "(1, 2, 3)", "400; 500; 600", "7, 8, 9, 10",
               "[101, 202]", "999", "3, 1, 4, 1, 5."]
    rows = [training_record({"prompt": p, "completion": a})
            for p, a in zip(prompts, answers, strict=True)]
    assert all(numbers.reject_reason(a) is None for a in answers)
    path = tmp_path_factory.mktemp("data") / "filtered.jsonl"
    write_jsonl(path, rows)
    return path


def _sft_two_steps(model_path: str, data: Path, out: Path) -> None:
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from sublearn.models.dtype import is_bf16

    ds = load_dataset("json", data_files=str(data), split="train")
    # TRL's default bf16=True is emulated (~12x slower) on a CPU without native bf16
    args = SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=2,
                     learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, dataloader_num_workers=0, bf16=is_bf16("auto"))
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=ds)
    result = trainer.train()
    assert result.global_step == 2


def test_cached_embedded_model_has_clean_config_and_trains_with_trl(filtered: Path,
                                                                   tmp_path: Path) -> None:
    from sublearn.models.load import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    config = json.loads((Path(path) / "config.json").read_text())
    assert "quantization_config" not in config  # dequantised weights, no GGUF claim
    _sft_two_steps(path, filtered, tmp_path / "trl")


def test_students_load_in_trl_and_peft(filtered: Path, tmp_path: Path) -> None:
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full, lora = tmp_path / "full", tmp_path / "lora"
    common = ["--data", str(filtered), "--recipe", "hard", "--epochs", "0.25", "--batch-size", "2"]
    assert main(["train", *common, "--method", "full", "--out", str(full)]) == 0
    assert main(["train", *common, "--method", "lora", "--out", str(lora)]) == 0

    config = json.loads((full / "model" / "config.json").read_text())
    assert "quantization_config" not in config
    _sft_two_steps(str(full / "model"), filtered, tmp_path / "trl")

    student = AutoPeftModelForCausalLM.from_pretrained(str(lora / "adapter"))
    tok = AutoTokenizer.from_pretrained(str(lora / "adapter"))
    ids = tok("12, 34", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(student.peft_config["default"]
                                                .base_model_name_or_path)
    with torch.no_grad():
        assert student(ids).logits.shape == base(ids).logits.shape
