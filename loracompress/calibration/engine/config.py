"""How to train: the engine's settings, validated once, and what the report records of them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loracompress.core.validate import reject_nonfinite
from loracompress.errors import LoraCompressError

#: Without --steps/--epochs: this many passes over the data, capped at DEFAULT_MAX_STEPS steps.
#: Sized so the bundled MiniLM sample (900 calibration reviews, batch 16) calibrates in well
#: under 5 minutes on a 2-core CPU (see docs/calibration.md for the measurement).
DEFAULT_EPOCHS = 3.0
DEFAULT_MAX_STEPS = 300
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class EngineConfig:
    """How to train. Validated on construction; errors name the flag to fix."""

    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    warmup: float = 0.1  # fraction of the steps (< 1) or a number of steps (>= 1)
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    kd_weight: float = 1.0
    task_weight: float = 1.0
    temperature: float = 2.0
    #: weight of the block-output distillation (see :func:`.loss.hidden_state_loss`); 0: logits only
    hidden_weight: float = 0.0
    #: classification without labels: the teacher's top-1 class stands in as the task loss's label
    pseudo_labels: bool = False
    #: classification: each step deletes this fraction of every text's tokens (a fresh view each time, the
    #: teacher scored on the same view; see :mod:`.augment`); 0: the texts as they are
    token_dropout: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    cache_teacher: bool | None = None  # None: cache when the data is reused and the cache fits
    teacher_cache_mb: float = 1024.0
    #: causal LMs: 0 the full distribution, k top-k + rest, None (auto) full while it fits the cache cap
    teacher_top_k: int | None = None
    #: causal LMs: the output head, log-softmax and KL run on chunks of tokens whose float32 logits take at
    #: most this many MiB (see :func:`.loss.chunked_lm_loss`); 0: the model's whole logits at once
    loss_chunk_mb: float = 64.0
    #: recompute each transformer block in the backward pass instead of keeping its activations
    gradient_checkpointing: bool = False
    #: shard the frozen base across the processes (FSDP2, :mod:`.sharding`); the LoRA factors stay whole
    fsdp: bool = False
    checkpoint_every: int | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        reject_nonfinite(self)
        if self.steps is not None and self.steps < 1:
            raise LoraCompressError(f"--steps must be at least 1 (got {self.steps})")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise LoraCompressError(f"--epochs must be a positive number (got {self.epochs})")
        if self.steps is not None and self.epochs is not None:
            raise LoraCompressError("give --steps or --epochs, not both")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LoraCompressError(f"--lr must be a positive number (got {self.lr})")
        if not (self.warmup >= 0 and math.isfinite(self.warmup)):
            raise LoraCompressError(f"--warmup must be >= 0: a fraction of the steps or a step count (got {self.warmup})")
        if self.schedule not in SCHEDULES:
            raise LoraCompressError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.kd_weight < 0 or self.task_weight < 0 or self.kd_weight + self.task_weight == 0:
            raise LoraCompressError("--kd-weight and --task-weight must be >= 0 and not both 0")
        if not (self.hidden_weight >= 0 and math.isfinite(self.hidden_weight)):
            raise LoraCompressError(f"--hidden-weight must be a number >= 0 (got {self.hidden_weight})")
        if not (0 <= self.token_dropout < 1):
            raise LoraCompressError(f"--token-dropout must be in [0, 1): a fraction of the tokens (got {self.token_dropout})")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise LoraCompressError(f"--temperature must be positive (got {self.temperature})")
        if self.precision not in PRECISIONS:
            raise LoraCompressError(f"unknown --precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if not (self.teacher_cache_mb >= 0 and math.isfinite(self.teacher_cache_mb)):
            raise LoraCompressError(
                f"--teacher-cache-mb must be a number >= 0 (0: never cache; got {self.teacher_cache_mb})"
            )
        if self.teacher_top_k is not None and (isinstance(self.teacher_top_k, bool) or self.teacher_top_k < 0):
            raise LoraCompressError(
                f"--teacher-top-k must be an integer >= 0 (0: the full vocabulary; got {self.teacher_top_k})"
            )
        if not (self.loss_chunk_mb >= 0 and math.isfinite(self.loss_chunk_mb)):
            raise LoraCompressError(f"loss_chunk_mb must be a number >= 0 (0: no chunks; got {self.loss_chunk_mb})")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise LoraCompressError(f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})")
        if (self.checkpoint_every or self.resume) and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every/resume need checkpoint_dir")

    def uses_views(self, task: str) -> bool:
        """Whether each step trains on a fresh view of its batch (:mod:`.augment`): classification only,
        a causal LM's next tokens being targets at every position already."""
        return self.token_dropout > 0 and task == "cls"

    def chunk_tokens(self, vocab: int) -> int:
        """Tokens per chunk of the loss for a ``vocab``-sized head (at least 1)."""
        return max(1, int(self.loss_chunk_mb * 2**20 // (4 * max(1, vocab))))

    def total_steps(self, batches_per_epoch: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * batches_per_epoch))
        return max(1, min(DEFAULT_MAX_STEPS, math.ceil(DEFAULT_EPOCHS * batches_per_epoch)))

    def warmup_steps(self, total: int) -> int:
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * total))


def config_dict(cfg: EngineConfig) -> dict[str, Any]:
    """The settings recorded in the compression report."""
    d = asdict(cfg)
    d.pop("checkpoint_dir", None)
    return {k: v for k, v in d.items() if v is not None}
