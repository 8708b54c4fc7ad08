"""One-call entry points: a path in, a path out. The CLI is a thin layer over these."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from loracompress.calibration.methods.base import Method
from loracompress.core.adapter import Adapter
from loracompress.core.budget import Budget
from loracompress.core.dtypes import parse_dtype
from loracompress.core.outputs import check_output_path
from loracompress.core.reader import load_adapter
from loracompress.core.records import compression_report
from loracompress.cuts.svd import Selector, SvdResult, compress_svd
from loracompress.errors import LoraCompressError
from loracompress.pipelines.inputs import (
    input_paths,
    load_base,
    load_data,
)
from loracompress.pipelines.plan import (  # re-exported: the options are prune's
    DEFAULT_CALIBRATION as DEFAULT_CALIBRATION,
)
from loracompress.pipelines.plan import DEFAULT_CUT, PruneOptions, PrunePlan, resolve_method
from loracompress.pipelines.results import write_result
from loracompress.runtime.device import resolve_device

log = logging.getLogger(__name__)


def default_output(source: str | Path) -> Path:
    src = Path(source).resolve()
    return src.parent / f"{src.name}-compressed"


def prune(
    source: str | Path, output: str | Path | None, options: PruneOptions, progress: Any | None = None,
    phase: Any | None = None,
) -> dict[str, Any]:
    """Compress the adapter at ``source`` into ``output``; returns the compression report.

    ``progress(step, total, loss, eta_seconds)`` is called after each calibration step, then
    ``phase(name, done, total)`` through the held-out evaluation that follows it (batches done).

    Everything that can be checked is checked before work starts, so a bad output path or a
    bad budget never costs a long run.
    """
    t0 = time.perf_counter()
    options = replace(options, method=resolve_method(options))
    out = Path(output) if output is not None else default_output(source)
    check_output_path(out, force=options.force, inputs=input_paths(source, options))
    if options.data and options.evaluate and not options.eval_data:  # before any model or data is loaded
        from loracompress.runtime.data.split import check_eval_fraction

        check_eval_fraction(options.eval_fraction)
    budget = Budget.parse(options.budget) if options.budget is not None else None
    select = Selector.parse(options.select) if options.select else None
    if options.min_rank < 0 or (options.max_rank is not None and options.max_rank < 1):
        raise LoraCompressError("--min-rank must be >= 0 and --max-rank >= 1")
    method = _check_method(options)
    if options.data:
        resolve_device(options.device)  # an unusable --device is refused before anything loads
    if method.trains:
        if method.needs_data and not options.data:
            raise LoraCompressError(
                f"method {options.method!r} calibrates on your data: pass --data FILE (and --base-model if needed)"
            )
        if budget is None:
            raise LoraCompressError(f"method {options.method!r} needs a --budget (e.g. --budget 0.25)")
        if select or options.min_rank or options.max_rank is not None:
            raise LoraCompressError("--select, --min-rank and --max-rank apply to --method svd only; drop them")
        from loracompress.pipelines.calibrate import calibrate, engine_config

        plan = PrunePlan(Path(source), out, options, type(method), method.config, budget,
                         engine=engine_config(options, out))  # a bad --steps, --lr, ... is refused here
        return calibrate(plan, progress=progress, phase=phase)
    adapter = load_adapter(source, allow_nonfinite=options.allow_nonfinite)
    out_dtype = parse_dtype(options.dtype) or adapter.dtype
    settings: dict[str, Any] = {"allocation": "global sigma^2/(in+out)"}
    quality: dict[str, Any] = {}
    if options.data:  # the activation-aware cut, measured on held-out data
        result, settings, quality = _activation_aware(adapter, options, budget, select, out_dtype)
    else:
        result = compress_svd(
            adapter,
            budget,
            select=select,
            min_rank=options.min_rank,
            max_rank=options.max_rank,
            itemsize=torch.empty(0, dtype=out_dtype).element_size(),
            dtype=out_dtype,
        )
    report = compression_report(
        source=str(source),
        output=str(out),
        before=adapter,
        after=result.adapter,
        method="svd",
        settings={"select": options.select, "min_rank": options.min_rank, "max_rank": options.max_rank, **settings},
        budget=options.budget,
        target_params=result.target_params,
        out_dtype=out_dtype,
        retained_energy=result.retained_energy,
        total_retained_energy=result.total_retained_energy,
        quality=quality,
        seconds=time.perf_counter() - t0,
    )
    write_result(result.adapter, out, report, out_dtype, options.force, input_paths(source, options))
    return report


def _check_method(options: PruneOptions) -> Method:
    """The method and its ``-O`` settings, checked before any model or data is loaded."""
    from loracompress.calibration.methods.registry import get_method

    method = get_method(options.method or DEFAULT_CUT, **options.method_settings)  # one-line errors; cheap
    if not method.trains:
        _check_calibration_only(options)
    if method.settings_need_data and options.method_settings and not options.data:
        key = next(iter(options.method_settings))
        raise LoraCompressError(f"-O {key} applies to {method.settings_need_data}, which needs --data: "
                                "add --data FILE or drop it")
    return method


#: (flag, field) of what only a calibration run reads: the svd cut trains nothing, with or without --data
_TRAINING_FLAGS = (("--steps", "steps"), ("--epochs", "epochs"), ("--lr", "lr"), ("--warmup", "warmup"),
                   ("--kd-weight", "kd_weight"), ("--task-weight", "task_weight"), ("--temperature", "temperature"),
                   ("--hidden-weight", "hidden_weight"), ("--pseudo-labels", "pseudo_labels"),
                   ("--token-dropout", "token_dropout"), ("--precision", "precision"),
                   ("--checkpoint-every", "checkpoint_every"), ("--resume", "resume"))
#: (flag, field) of what only a run with --data reads
_DATA_FLAGS = (("--eval-data", "eval_data"), ("--eval-fraction", "eval_fraction"), ("--text-field", "text_field"),
               ("--label-field", "label_field"), ("--label-map", "label_map"), ("--max-samples", "max_samples"),
               ("--seq-len", "seq_len"), ("--batch-size", "batch_size"))


def _check_calibration_only(options: PruneOptions) -> None:
    """Flags that only a calibration run reads, refused for the training-free cut rather than ignored: a user
    who passes ``--steps 500`` without ``--data`` expects a calibration, not a silent svd cut."""
    default = PruneOptions()
    given = [flag for flag, on in (("--gradient-checkpointing", options.gradient_checkpointing),
                                   ("--fsdp", options.fsdp),
                                   ("--teacher-top-k", options.teacher_top_k is not None),
                                   ("--teacher-cache-mb", options.teacher_cache_mb is not None)) if on]
    given += [flag for flag, name in _TRAINING_FLAGS if getattr(options, name) != getattr(default, name)]
    if given:
        fix = "choose a calibration --method" if options.data else "add --data FILE to calibrate"
        raise LoraCompressError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to calibration "
                                f"(a --method other than svd, with --data), and this run is the svd cut; drop "
                                f"{'it' if len(given) == 1 else 'them'} or {fix}")
    unread = [flag for flag, name in _DATA_FLAGS if getattr(options, name) != getattr(default, name)]
    if unread and not options.data:
        raise LoraCompressError(f"{', '.join(unread)} {'sets' if len(unread) == 1 else 'set'} how --data is read, and "
                                f"there is no --data; drop {'it' if len(unread) == 1 else 'them'} or add --data FILE")
    base_flags = [flag for flag, on in (("--base-dtype", options.base_dtype not in (None, "auto")),
                                        ("--load-in-4bit", options.load_in_4bit),
                                        ("--load-in-8bit", options.load_in_8bit)) if on]
    if base_flags and not options.data:
        raise LoraCompressError(f"{base_flags[0]} sets how the base model is loaded, and the cut without --data "
                                "loads none; drop it or add --data")


def _activation_aware(
    adapter: Adapter, options: PruneOptions, budget: Budget | None, select: Selector | None, out_dtype: torch.dtype
) -> tuple[SvdResult, dict[str, Any], dict[str, Any]]:
    """``--method svd`` with ``--data``: the activation-aware cut; its settings and held-out quality."""
    from loracompress.cuts.activation import DEFAULT_DAMPING, activation_aware_svd
    from loracompress.pipelines.evaluate import compare_adapters
    from loracompress.runtime.placement import resolve_placement

    if budget is None and select is None:
        raise LoraCompressError("nothing to do: give --budget, --select, or both")
    damping = float(options.method_settings.get("damping", DEFAULT_DAMPING))  # checked by SvdSettings
    placement = resolve_placement(options.base_dtype, options.device, options.load_in_4bit, options.load_in_8bit)
    base = load_base(adapter, options, placement=placement)
    data = load_data(base, options)
    result = activation_aware_svd(
        base, adapter, data.train, budget, damping=damping, select=select, min_rank=options.min_rank,
        max_rank=options.max_rank, itemsize=torch.empty(0, dtype=out_dtype).element_size(), dtype=out_dtype,
    )
    quality: dict[str, Any] = {}
    if options.evaluate and data.held_out:
        quality = compare_adapters(base, adapter, result.adapter, data.held_out, data.task)
    settings = {"allocation": "global output-space sigma^2 / (E|x|^2/in) / (in+out)", "activation_aware": True,
                "damping": damping, "base_model": base.source, "data": str(options.data),
                "eval_data": options.eval_data, "eval_fraction": None if options.eval_data else options.eval_fraction,
                "samples": data.samples, "held_out_samples": data.held_out_samples,
                "seq_len": options.seq_len, "batch_size": options.batch_size, "seed": options.seed,
                **placement.describe()}
    return result, settings, quality
