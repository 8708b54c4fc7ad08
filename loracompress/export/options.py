"""What every ONNX export is told, whichever engine writes the graph."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from loracompress.export.registry import ExportOptions


@dataclass(kw_only=True)
class GraphOptions(ExportOptions):
    """The options both ONNX engines share: ``export --format onnx`` (:class:`~loracompress.export.onnx.OnnxOptions`)
    and onnxruntime-genai's builder (:class:`~loracompress.export.genai.GenaiOptions`) extend it."""

    base_model: str | None = None
    mode: str = "merged"
    dtype: str = "fp32"
    tolerance: float | None = None
    trust_remote_code: bool = False


def shared(options: GraphOptions) -> dict[str, Any]:
    """The :class:`GraphOptions` fields of ``options`` (of any subclass), to build another subclass from."""
    return {f.name: getattr(options, f.name) for f in fields(GraphOptions)}
