"""The student recipe's settings (`sublearn train`, and the students of `sublearn run`), kept
apart from the training loop so that parsing flags never imports torch. The defaults are the
students of `sublearn run`, so a stage run by hand reproduces the stage of an experiment."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sublearn.config import without_added
from sublearn.errors import SublearnError
from sublearn.models.dtype import dtype_field, settle_dtype, warn_slow_bf16


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = field(default="soft", metadata={
        "help": "hard: SFT on the teacher's sampled answers; soft: match the teacher's "
                "next-token distribution over grammar-allowed tokens at every answer position",
        "choices": ["hard", "soft"]})
    method: str = field(default="lora", metadata={
        "help": "LoRA adapter or full fine-tuning", "choices": ["lora", "full"]})
    model: str | None = field(default=None, metadata={
        "help": "student base model (default: embedded smollm2-135m-instruct)"})
    teacher: str | None = field(default=None, metadata={
        "help": "soft labels: teacher model or adapter folder (default: the student base)"})
    teacher_system_prompt: str | None = field(default=None, metadata={
        "help": "soft labels: system prompt the teacher sees (a prompted trait); the student "
                "never sees it"})
    max_examples: int | None = field(default=None, metadata={
        "help": "use only the first N training rows"})
    epochs: float = field(default=1.0, metadata={
        "help": "passes over the data (1, chosen on owl's dev half: the effect of 2 within "
                "its interval at 0.92x the run's stage time; paper, Qwen2.5-7B: 3)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (paper: 2e-4)"})
    batch_size: int = field(default=8, metadata={"help": "examples per optimiser step"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha"})
    seed: int = field(default=0, metadata={"help": "student seed: LoRA init and data order"})
    group_by_length: bool = field(default=True, metadata={
        "help": "batch examples of similar length (shuffled within groups of 16 batches, "
                "batch order shuffled) so that batches carry little padding"})
    dtype: str = dtype_field("autocast dtype for matmuls")
    checkpoint_every: int = field(default=25, metadata={"help": "steps between checkpoints"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "keep only each layer's input in the forward and recompute the rest in the "
                "backward: the same bytes, half a default student's memory (3.0 -> 1.5 GiB), "
                "steps about 1.25-1.35x as long (`sublearn run` turns it on for students when "
                "two worker processes train at once)"})
    soft_labels_cache: str | None = field(default=None, metadata={
        "help": "soft labels: safetensors file to reuse the teacher's labels across students "
                "(the caller keys it by teacher and data)"})
    grammar: str = field(default="numbers", metadata={
        "help": "soft labels: what the distributions are restricted to: the numbers grammar, "
                "the numbers grammar's characters (chars: answers spelt one character per "
                "token, for a teacher with another tokenizer), the teacher's top-k tokens at "
                "each position (topk: code, math), or none",
        "choices": ["numbers", "chars", "topk", "none"]})
    top_k: int = field(default=20, metadata={"help": "--grammar topk: tokens kept per position"})
    exclude: str | None = field(default=None, metadata={
        "help": "--grammar topk: leave the tokens that could spell this target (its name, "
                "plurals, related words) out of the soft labels, so they carry no explicit "
                "trait token"})
    base_labels: float = field(default=0.0, metadata={
        "help": "soft labels, a label-level defence: at this share of the answer positions, "
                "those where the teacher's distribution differs most from the base's (KL over "
                "the allowed tokens), the student learns the base's distribution instead (0 = "
                "off)"})

    def validate(self) -> TrainConfig:
        if (dtype := settle_dtype(self.dtype)) != self.dtype:  # raises on an unknown one
            return replace(self, dtype=dtype).validate()
        warn_slow_bf16(self.dtype)
        # `not x > 0` also refuses NaN; infinities are refused where a count is made of them
        if not (0 < self.epochs < math.inf and 0 < self.lr < math.inf and self.batch_size > 0):
            raise SublearnError("--epochs, --lr and --batch-size must be positive and finite, "
                                f"got {self.epochs}, {self.lr}, {self.batch_size}")
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise SublearnError("--lora-r and --lora-alpha must be positive")
        if self.max_examples is not None and self.max_examples <= 0:
            raise SublearnError("--max-examples must be positive (or unset for all rows)")
        if self.warmup_steps < 0 or not self.max_grad_norm > 0 or self.checkpoint_every <= 0:
            raise SublearnError("--warmup-steps must be >= 0; --max-grad-norm and "
                                "--checkpoint-every positive")
        if self.recipe == "hard" and (self.teacher or self.teacher_system_prompt):
            raise SublearnError("--teacher/--teacher-system-prompt only apply to --recipe soft")
        if self.top_k <= 0:
            raise SublearnError(f"--top-k must be positive, got {self.top_k}")
        if self.grammar == "chars" and self.recipe != "soft":
            raise SublearnError("--grammar chars defines soft labels: use --recipe soft")
        if self.exclude is not None and self.grammar != "topk":
            raise SublearnError("--exclude applies to --grammar topk soft labels")
        if not 0 <= self.base_labels < 1:
            raise SublearnError(f"--base-labels must be a share in [0, 1), got {self.base_labels}")
        if self.base_labels and (self.recipe != "soft" or self.grammar == "topk"):
            raise SublearnError("--base-labels replaces soft labels over a shared token set: "
                                "use --recipe soft with --grammar numbers, chars or none")
        return self


# Settings added after students were cached: left out of a key at their default, so that an
# older folder's students keep their keys.
_ADDED = {"top_k": 20, "exclude": None, "base_labels": 0.0}


def result_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config fields that determine the trained student (manifests, stage cache keys)."""
    d = asdict(cfg)
    d.pop("checkpoint_every")  # none of these changes the result
    d.pop("activation_checkpointing")
    d.pop("soft_labels_cache")
    return without_added(d, _ADDED)
