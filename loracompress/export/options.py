"""What every ONNX export is told, whichever engine writes the graph."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from loracompress.errors import LoraCompressError
from loracompress.export.registry import ExportOptions

if TYPE_CHECKING:
    from loracompress.core.adapter import Adapter


@dataclass(kw_only=True)
class GraphOptions(ExportOptions):
    """The options both ONNX engines share: ``export --format onnx`` (:class:`~loracompress.export.onnx.OnnxOptions`)
    and onnxruntime-genai's builder (:class:`~loracompress.export.genai.GenaiOptions`) extend it."""

    base_model: str | None = None
    mode: str = "merged"
    dtype: str = "fp32"
    tolerance: float | None = None
    trust_remote_code: bool = False
    #: --mode adapters: the user vouches that adapters naming different bases were trained on --base-model
    same_base: bool = False


def _same_model(a: str, b: str) -> bool:
    """Two ``base_model_name_or_path`` values name one model: equal text, or two paths to one folder."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # a hub id, or a path that is not here
        return False


def check_same_base(adapters: Sequence[Adapter], options: GraphOptions) -> None:
    """One graph holds one base: adapters that name different bases are refused, unless the user gives
    ``--base-model`` and says with ``--same-base`` that they all share it.

    The graph and every check use one base, so an adapter trained on another base (same shapes, other
    weights) would be verified against the wrong reference, pass, and serve wrong outputs.
    """
    if options.same_base and (options.mode != "adapters" or not options.base_model):
        raise LoraCompressError("--same-base needs --mode adapters and --base-model BASE (the base the adapters share)")
    named = [(a, str(a.config.get("base_model_name_or_path"))) for a in adapters if a.config.get("base_model_name_or_path")]
    other = next(((a, name) for a, name in named[1:] if not _same_model(named[0][1], name)), None)
    if other is None or options.same_base:
        return
    (first, first_name), (second, second_name) = named[0], other
    raise LoraCompressError(
        f"the adapters name different base models ({first_name!r} in {_where(first)}, {second_name!r} in "
        f"{_where(second)}); one graph has one base, so the other adapter would run on the wrong weights: export "
        "each base's adapters separately, or if they were all trained on one base pass --base-model BASE --same-base"
    )


def _where(adapter: Adapter) -> str:
    return str(adapter.source) if adapter.source else "an adapter"


def shared(options: GraphOptions) -> dict[str, Any]:
    """The :class:`GraphOptions` fields of ``options`` (of any subclass), to build another subclass from."""
    return {f.name: getattr(options, f.name) for f in fields(GraphOptions)}
