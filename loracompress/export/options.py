"""What every ONNX export is told, whichever engine writes the graph."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from loracompress.core.validate import reject_nonfinite


@dataclass
class GraphOptions:
    """The options both ONNX engines share: ``export --format onnx`` (:class:`~loracompress.export.OnnxOptions`)
    and onnxruntime-genai's builder (:class:`~loracompress.export.genai.GenaiOptions`) extend it."""

    base_model: str | None = None
    mode: str = "merged"
    dtype: str = "fp32"
    tolerance: float | None = None
    force: bool = False
    trust_remote_code: bool = False
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:  # inherited by both engines' options
        reject_nonfinite(self)


def shared(options: GraphOptions) -> dict[str, Any]:
    """The :class:`GraphOptions` fields of ``options`` (of any subclass), to build another subclass from."""
    return {f.name: getattr(options, f.name) for f in fields(GraphOptions)}
