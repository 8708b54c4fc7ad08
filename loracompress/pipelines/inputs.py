"""What every data-driven pipeline starts from: the base model, ready for batches, and the data batched for it.

``eval``, ``truncate --eval-data``, ``prune --method svd --data`` and calibration all run::

    adapter + --base-model ─▶ load_base (device resolved, pad id set) ─▶ task_of
                           ─▶ read_data (fields detected, labels checked against the head) ─▶ batches

The options objects of those commands (:class:`~loracompress.pipelines.prune.PruneOptions`,
:class:`~loracompress.pipelines.truncate.TruncateOptions`, :class:`~loracompress.pipelines.evaluate.EvalOptions`)
are composed of :class:`ModelOptions` and :class:`DataOptions`, so each of those fields and its default is
declared once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loracompress.core.adapter import Adapter
from loracompress.core.validate import reject_nonfinite
from loracompress.errors import LoraCompressError
from loracompress.runtime.data import (
    Examples,
    char_limit,
    make_batches,
    position_limit,
    prepare_model,
    read_for_model,
    split_eval,
    task_of,
)
from loracompress.runtime.device import resolve_device

if TYPE_CHECKING:  # runtime.model imports transformers: loaded on first use, not with the CLI
    from loracompress.runtime.model import BaseModel
    from loracompress.runtime.placement import BasePlacement

Batch = dict[str, torch.Tensor]


@dataclass(kw_only=True)
class ModelOptions:
    """Which base model to load, and where: shared by every command that needs the base model."""

    base_model: str | None = None  # a folder, a cached hub id or a .gguf file; None: the adapter's record
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:  # inherited by every command's options (prune, truncate, eval)
        reject_nonfinite(self)


@dataclass(kw_only=True)
class DataOptions:
    """How to read and batch data: shared by every command that reads data."""

    text_field: str | None = None  # None: detected
    label_field: str | None = None  # None: detected
    #: string label -> class index of the head (``--label-map fresh=1,rotten=0``); None: the head's own names
    label_map: dict[str, int] | None = None
    max_samples: int | None = None
    seed: int = 0  # of the --max-samples subset, the held-out split and the shuffling
    seq_len: int = 128
    batch_size: int = 16


#: the names the pipelines' signatures use for what they read of an options object
ModelSource = ModelOptions
DataSource = DataOptions


@dataclass(kw_only=True)
class CalibrationDataOptions(DataOptions):
    """The data of a calibration (or activation-aware) run and its held-out part."""

    data: str | None = None
    eval_data: str | None = None  # None: hold out eval_fraction of data
    eval_fraction: float = 0.1
    evaluate: bool = True  # score the result on the held-out part


CalibrationSource = CalibrationDataOptions


def input_paths(source: str | Path, options: Any) -> list[str | Path | None]:
    """Every path a prune (or truncate) run reads: its output may overlap none of them."""
    return [source, getattr(options, "base_model", None), getattr(options, "data", None),
            getattr(options, "eval_data", None)]


def load_base(adapter: Adapter, options: ModelSource, *, place: bool = True,
              placement: BasePlacement | None = None) -> BaseModel:
    """The base model of ``adapter`` (``options.base_model`` or the adapter's record of it), ready for batches.

    ``place=False`` leaves it on the CPU: the calibration engine places the model itself. A
    ``placement`` (``--base-dtype``, ``--load-in-4bit``, see :mod:`loracompress.runtime.placement`)
    says the dtype, the device and the quantization instead: the weights are read straight into them.
    """
    from loracompress.runtime.model import load_base_model

    if placement is not None:
        kwargs = placement.load_kwargs()
    else:
        kwargs = {"device": resolve_device(options.device) if place else "cpu"}
    base = load_base_model(options.base_model, adapter, trust_remote_code=options.trust_remote_code, **kwargs)
    prepare_model(base)
    return base


def read_data(base: BaseModel, path: str | Path, options: DataSource) -> Examples:
    """The samples at ``path`` for ``base``: streamed, each text cut to what ``--seq-len`` tokens can cover,
    string labels mapped by ``--label-map`` or the head's names, labels checked against its head."""
    base.check_tokenizer()
    return read_for_model(base, path, text_field=options.text_field, label_field=options.label_field,
                          max_samples=options.max_samples, seed=options.seed, label_map=options.label_map,
                          max_chars=char_limit(base.tokenizer, options.seq_len))


def batches(base: BaseModel, examples: Examples | list, options: DataSource, *, shuffle: bool = False) -> list[Batch]:
    """``examples`` tokenised and padded for ``base``'s task (shuffled with ``options.seed`` when asked);
    a sample longer than the model's position limit within ``--seq-len`` is refused."""
    return make_batches(examples, base.tokenizer, task=task_of(base), seq_len=options.seq_len,
                        batch_size=options.batch_size, shuffle=shuffle, seed=options.seed,
                        max_positions=position_limit(base))


def read_batches(base: BaseModel, path: str | Path, options: DataSource) -> tuple[Examples, list[Batch]]:
    """:func:`read_data` then :func:`batches`, in file order: the held-out data of ``eval`` and ``truncate``."""
    examples = read_data(base, path, options)
    return examples, batches(base, examples, options)


@dataclass
class CalibrationData:
    """Batches to calibrate on and to evaluate on, and the task they are for."""

    task: str
    train: list[Batch]
    held_out: list[Batch]
    samples: int
    held_out_samples: int

    @property
    def labelled(self) -> bool:
        """Whether the task loss has labels to use: language modelling always does, classification when
        every calibration batch carries them."""
        return self.task == "lm" or all("labels" in b for b in self.train)


#: ``--keep-best`` compares candidates on at least this many held-out samples (at most a quarter of the data):
#: at 100, one sample is a whole point of agreement, too coarse to decide between a cut and a calibration.
MIN_HELD_OUT = 200


def held_out_fraction(options: CalibrationSource, n: int) -> float:
    """The share of ``n`` samples held out: ``--eval-fraction``, raised for ``--keep-best`` to hold out
    :data:`MIN_HELD_OUT` samples (or a quarter of the data when that is fewer)."""
    fraction = float(options.eval_fraction)
    if getattr(options, "keep_best", False) and options.method and n > 0:
        from loracompress.calibration.methods.registry import method_class

        if not method_class(options.method).keeps_best():
            return fraction
        fraction = max(fraction, min(MIN_HELD_OUT, n // 4) / n)
    return fraction


def load_data(base: BaseModel, options: CalibrationSource) -> CalibrationData:
    """Read, split and batch the calibration (and held-out) data for ``base`` (labels checked against its head)."""
    if not options.data:
        raise LoraCompressError("calibration needs data: pass --data FILE (jsonl, csv, txt, ...)")
    task = task_of(base)
    prepare_model(base)  # idempotent; callers that loaded the model themselves may not have
    examples = read_data(base, options.data, options)
    if options.eval_data:
        held = read_data(base, options.eval_data, options)
    elif options.evaluate:
        examples, held = split_eval(examples, held_out_fraction(options, len(examples)), options.seed)
    else:
        held = []
    train = batches(base, examples, options, shuffle=True)
    held_batches = batches(base, held, options) if held else []
    return CalibrationData(task, train, held_batches, len(examples), len(held))
