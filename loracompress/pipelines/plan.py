"""What ``prune`` is told (:class:`PruneOptions`) and what it makes of it, checked once (:class:`PrunePlan`).

``prune()`` validates everything into a frozen plan before any model or data is loaded; calibration and
keep-best run from the plan and never parse or check again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracompress.calibration.engine.config import EngineConfig
from loracompress.calibration.methods.base import Method, MethodSettings
from loracompress.core.budget import Budget
from loracompress.cuts.svd import Selector
from loracompress.pipelines.inputs import CalibrationDataOptions, ModelOptions

_ENGINE = EngineConfig  # the engine's defaults are the one declaration of the training settings


@dataclass(kw_only=True)
class PruneOptions(ModelOptions, CalibrationDataOptions):
    """Everything ``prune`` can be told: the model and data options it shares with the other commands
    (:mod:`loracompress.pipelines.inputs`), the cut, and the training settings, whose defaults are the
    engine's (:class:`~loracompress.calibration.engine.EngineConfig`). Calibration fields are used when
    ``data`` is given."""

    budget: str | None = None
    #: None: ``svd`` without data, :data:`DEFAULT_CALIBRATION` with ``data`` and a budget (see :func:`resolve_method`)
    method: str | None = None
    select: str | None = None
    min_rank: int = 0
    max_rank: int | None = None
    dtype: str | None = None
    force: bool = False
    allow_nonfinite: bool = False
    # --- calibration (training settings: the engine's defaults)
    steps: int | None = _ENGINE.steps
    epochs: float | None = _ENGINE.epochs
    #: None: the engine's (1e-3), or a larger one for unlabelled classification data (calibrate.py)
    lr: float | None = None
    warmup: float = _ENGINE.warmup
    kd_weight: float = _ENGINE.kd_weight
    task_weight: float = _ENGINE.task_weight
    temperature: float = _ENGINE.temperature
    #: block-output distillation weight; None: automatic (see calibrate.LABEL_FREE)
    hidden_weight: float | None = None
    #: the teacher's top-1 class as the label of unlabelled classification data; None: automatic
    pseudo_labels: bool | None = None
    #: classification: the fraction of tokens each step deletes (fresh views); None: automatic
    token_dropout: float | None = None
    precision: str = _ENGINE.precision
    checkpoint_every: int | None = _ENGINE.checkpoint_every
    resume: bool = _ENGINE.resume
    # --- how the base is held (runtime/placement.py) and calibration memory (docs/calibration.md)
    base_dtype: str | None = None  # None/"auto": bf16 on a GPU that supports it, else fp32
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    gradient_checkpointing: bool = False
    #: shard the frozen base across the launched processes (FSDP2); the LoRA factors stay whole
    fsdp: bool = False
    teacher_cache_mb: float | None = None  # None: the engine's default (1024)
    teacher_top_k: int | None = None  # None: auto; 0: full vocabulary
    #: calibration: write the training-free SVD cut instead when it has the lower held-out KL
    keep_best: bool = True
    method_settings: dict[str, Any] = field(default_factory=dict)


#: The calibration method ``prune`` uses when it is given data and no ``--method``: the one with the
#: lowest held-out KL to the original at 1/16 and 1/32 over both tasks of benchmarks/results/quality.md
#: (geometric mean of its KL relative to the svd cut's: increlora 0.50, lorpa 0.65, adalora 0.65,
#: prilora 0.77; see the README).
DEFAULT_CALIBRATION = "increlora"
#: The method ``prune`` uses without data (or with an svd-only option): the training-free cut.
DEFAULT_CUT = "svd"


def resolve_method(options: PruneOptions) -> str:
    """The method a run uses: the one asked for; else calibration when there is data and a budget and no
    svd-only option (``--select``, ``--min-rank``, ``--max-rank``); else the training-free ``svd`` cut."""
    if options.method:
        return options.method
    svd_only = options.select or options.min_rank or options.max_rank is not None or options.budget is None
    return DEFAULT_CALIBRATION if options.data and not svd_only else DEFAULT_CUT


@dataclass(frozen=True)
class PrunePlan:
    """A prune run as ``prune()`` checked it: the resolved method (its class and checked settings), the parsed
    budget and selector, the output path (``--force`` rules applied) and every option as given.

    The plan holds no method *instance*: the run builds its own with :meth:`new_method` and frees it (with
    the layers, gradients and statistics its context holds) before the held-out evaluation.

    ``engine`` is the training settings as the options give them (None for a training-free method). The
    settings the options leave to the data (unlabelled classification data trains longer, with a larger
    learning rate) are not in it: the plan is built before any data is read, so the calibration fills
    them in once it has read the data (:func:`loracompress.pipelines.calibrate.data_defaults`)."""

    source: Path
    output: Path
    options: PruneOptions
    method: type[Method]
    settings: MethodSettings
    budget: Budget | None
    select: Selector | None = None
    engine: EngineConfig | None = None

    def new_method(self) -> Method:
        return self.method(self.settings)
