"""Serving targets for the adapter itself: ``peft`` (portable form), ``vllm``, ``uniform``.

All three are stock PEFT adapters that give the same ΔW as the input, module for module:

* ``peft``: the portable form (scale folded, ``alpha == rank`` per module, full-path patterns).
* ``vllm``: the portable form with the global ``r == lora_alpha`` rounded up to a value vLLM
  accepts as ``--max-lora-rank``. vLLM applies one global ``lora_alpha / r`` (= 1 here) and
  pads each module's factors to the engine's rank, so per-module ranks keep their sizes.
  ``modules_to_save`` is refused: vLLM cannot load it. The copies of the base model's embedding
  layers PEFT saves beside an ``lm_head`` LoRA (``lm_head.base_layer.weight``) are left out:
  vLLM skips them and uses the base model's own weights.
* ``uniform``: every module zero-padded to one rank (zero rows of A, zero columns of B add
  nothing to B @ A), for engines that need all modules of one rank.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from loracompress.core import jsonio
from loracompress.core.adapter import CONFIG_NAME, KEY_PREFIX, Adapter, LoraModule, base_param_name
from loracompress.core.dtypes import parse_dtype
from loracompress.core.outputs import atomic_output_dir, check_output_path
from loracompress.core.reader import load_adapter
from loracompress.core.units import human_bytes
from loracompress.core.writer import rank_patterns, write_adapter_files
from loracompress.errors import LoraCompressError
from loracompress.export.registry import (
    REPORT_NAME,
    ExportFormat,
    ExportOptions,
    ExportReport,
    register_format,
)

log = logging.getLogger(__name__)

TARGETS = ("peft", "vllm", "uniform")
#: The ``max_lora_rank`` values vLLM accepts.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(kw_only=True)
class TargetOptions(ExportOptions):
    """What an adapter target can be told; each target is its own subclass, so that the options' type picks it."""

    target: ClassVar[str] = "peft"
    dtype: str | None = None  # the output dtype (default: the adapter's)
    rank: int | None = None  # uniform: the rank every module is padded to (default: the largest)


@dataclass(kw_only=True)
class PeftOptions(TargetOptions):
    target: ClassVar[str] = "peft"


@dataclass(kw_only=True)
class VllmOptions(TargetOptions):
    target: ClassVar[str] = "vllm"


@dataclass(kw_only=True)
class UniformOptions(TargetOptions):
    target: ClassVar[str] = "uniform"


class TargetReport(ExportReport):
    """What an adapter target wrote."""

    def lines(self) -> list[str]:
        line = f"{self['target']} adapter: {self['modules']} modules, {human_bytes(self['bytes'])}"
        if self["target"] == "vllm":
            line += (f"; global r = lora_alpha = {self['max_lora_rank']}: serve with --max-lora-rank "
                     f"{self['max_lora_rank']} (or more)")
        elif self["target"] == "uniform":
            line += f"; every module at rank {self['rank']}"
        out = [line]
        out += [f"  left out {key.removeprefix('base_model.model.')}: PEFT's copy of the base model's layer "
                "(save_embedding_layers); vLLM uses the base model's own" for key in self.get("dropped", [])]
        return [*out, f"wrote {self['output']} (and {REPORT_NAME})"]


def vllm_rank(max_rank: int) -> int:
    """The smallest vLLM ``max_lora_rank`` value that holds ``max_rank``."""
    for r in VLLM_RANKS:
        if r >= max_rank:
            return r
    raise LoraCompressError(
        f"the adapter's largest rank is {max_rank} but vLLM serves ranks up to {VLLM_RANKS[-1]}; "
        f"compress it further (e.g. prune --max-rank {VLLM_RANKS[-1]})"
    )


def pad_to_rank(adapter: Adapter, rank: int) -> Adapter:
    """Every module of rank > 0 zero-padded to ``rank`` (same ΔW); rank-0 modules stay dropped."""
    if rank < adapter.max_rank:
        raise LoraCompressError(f"--rank {rank} is below the adapter's largest rank {adapter.max_rank}; use --rank >= {adapter.max_rank}")
    modules = {}
    for path, m in adapter.modules.items():
        if m.rank == 0:
            continue
        if rank > min(m.in_features, m.out_features):
            raise LoraCompressError(
                f"--rank {rank} exceeds module {path} ({m.out_features}×{m.in_features}): a LoRA rank must be at most "
                f"min(in, out) = {min(m.in_features, m.out_features)}; use a smaller --rank"
            )
        extra = rank - m.rank
        A = torch.cat([m.A, m.A.new_zeros(extra, m.in_features)], dim=0)
        B = torch.cat([m.B, m.B.new_zeros(m.out_features, extra)], dim=1)
        modules[path] = LoraModule(A=A, B=B, scale=m.scale)
    return adapter.replace(modules)


def embedding_copies(adapter: Adapter) -> list[str]:
    """Keys of the base-layer copies PEFT saves beside a LoRA on an embedding layer (``save_embedding_layers``).

    ``lm_head.base_layer.weight`` is the base model's own ``lm_head`` weight, written because
    ``lm_head`` is a LoRA target; it is not a ``modules_to_save`` head the user trained.
    """
    copies = []
    for key in adapter.extra_tensors:
        bare = key.removeprefix(KEY_PREFIX)
        path, sep, _ = bare.rpartition(".base_layer.")
        if sep and path in adapter.modules:
            copies.append(key)
    return sorted(copies)


def _check_vllm(adapter: Adapter) -> Adapter:
    """The adapter vLLM can serve: PEFT's base-layer copies dropped (vLLM skips them and uses the base's own)."""
    copies = embedding_copies(adapter)
    saved = adapter.config.get("modules_to_save")
    heads = sorted({base_param_name(k).rsplit(".", 1)[0] for k in adapter.extra_tensors if k not in copies})
    if heads or saved:
        raise LoraCompressError(
            f"vLLM cannot serve modules_to_save ({', '.join(heads) or saved}); use --target peft, or retrain without modules_to_save"
        )
    if not copies:
        return adapter
    extra = {k: t for k, t in adapter.extra_tensors.items() if k not in copies}
    return adapter.replace(dict(adapter.modules), extra_tensors=extra)


def _global_rank(config_path: Path, rank: int, ranks: dict[str, int]) -> None:
    """Rewrite the written config so the global ``r == lora_alpha == rank`` and patterns cover the rest."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(r=rank, lora_alpha=rank, **rank_patterns(ranks, rank))
    jsonio.write_json(config_path, config, sort_keys=True)


def export_target(
    source: str | Path,
    output: str | Path,
    target: str = "peft",
    *,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> TargetReport:
    """Write ``source`` as a ``target`` adapter at ``output``; returns a small record of what was done.

    Raises:
        LoraCompressError: unknown target, ``modules_to_save`` for vLLM, a rank vLLM cannot serve.
    """
    if target not in TARGETS:
        raise LoraCompressError(f"unknown target {target!r}: use one of {', '.join(TARGETS)} (or --format onnx)")
    if rank is not None and target != "uniform":
        raise LoraCompressError("--rank is only used with --target uniform")
    if rank is not None and rank < 1:
        raise LoraCompressError("--rank must be >= 1")
    check_output_path(output, force=force, inputs=[Path(source)])
    adapter = load_adapter(source, allow_nonfinite=allow_nonfinite)
    kept = {p: m.rank for p, m in adapter.modules.items() if m.rank > 0}
    if not kept:
        raise LoraCompressError(f"{source}: every module has rank 0; there is no adapter to serve")
    record: dict[str, Any] = {"target": target, "source": str(source), "output": str(output), "max_rank": max(kept.values()),
                              "skipped": [s.to_json() for s in adapter.skipped]}  # what PEFT does not load: not exported
    global_rank = None
    if target == "vllm":
        served = _check_vllm(adapter)
        record["dropped"] = sorted(set(adapter.extra_tensors) - set(served.extra_tensors))
        adapter = served
        global_rank = vllm_rank(max(kept.values()))
        record["max_lora_rank"] = global_rank
    elif target == "uniform":
        adapter = pad_to_rank(adapter, rank or max(kept.values()))
        kept = {p: m.rank for p, m in adapter.modules.items()}
        record["rank"] = adapter.max_rank
    with atomic_output_dir(output, force=force, inputs=[Path(source)]) as tmp:
        write_adapter_files(adapter, tmp, dtype)
        if global_rank is not None:
            _global_rank(tmp / CONFIG_NAME, global_rank, kept)
        # Reading it back checks that every module's pattern resolves to its own rank.
        written = load_adapter(tmp)
        record.update(params=written.num_params, bytes=written.num_bytes(), modules=len(written.modules))
        jsonio.write_json(tmp / REPORT_NAME, {"format": target, **record})
    return TargetReport(record)


def _run(sources: Sequence[Path], output: Path, options: TargetOptions) -> TargetReport:
    return export_target(sources[0], output, options.target, rank=options.rank, dtype=parse_dtype(options.dtype),
                         force=options.force, allow_nonfinite=options.allow_nonfinite)


for _options, _help in ((PeftOptions, "the portable PEFT form (the default)"),
                        (VllmOptions, "PEFT form with a global rank vLLM accepts as --max-lora-rank"),
                        (UniformOptions, "every module zero-padded to one rank (--rank)")):
    register_format(ExportFormat(_options.target, _help, _options, _run))
