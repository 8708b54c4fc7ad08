"""The module check: each merged weight against base + LoRA on random probes, without a model in memory."""

from __future__ import annotations

import math
from typing import Any

import torch

from loracompress.core.adapter import LoraModule


class ModuleCheck:
    """Each merged module against base + LoRA on random probes, in fp32: ``W'x`` vs ``Wx + B(Ax)·s``.

    Probes are unit-scale rows (``N(0, 1/in)``), so the difference is on the scale of the layer's
    outputs. The cast to the output dtype is measured the same way and recorded.
    """

    def __init__(self, probes: int = 8, seed: int = 0):
        self.probes = probes
        self.generator = torch.Generator().manual_seed(seed)
        self.max_abs_diff = 0.0
        self.max_abs_diff_cast: float | None = None
        self.worst: str | None = None
        self.count = 0

    def inputs(self, m: LoraModule) -> torch.Tensor:
        return torch.randn(self.probes, m.in_features, generator=self.generator) / math.sqrt(max(m.in_features, 1))

    @staticmethod
    def reference(weight: torch.Tensor, m: LoraModule, x: torch.Tensor) -> torch.Tensor:
        """``Wx + B(Ax)·scale`` for a weight in ``[out, in]`` orientation, fp32."""
        return x @ weight.float().T + ((x @ m.A.float().T) @ m.B.float().T) * m.scale

    def record(self, path: str, merged: torch.Tensor, cast: torch.Tensor | None, x: torch.Tensor, ref: torch.Tensor) -> None:
        diff = float((x @ merged.float().T - ref).abs().max()) if ref.numel() else 0.0
        if not diff <= self.max_abs_diff:  # NaN counts as the worst
            self.max_abs_diff, self.worst = diff, path
        if cast is not None:
            cdiff = float((x @ cast.float().T - ref).abs().max()) if ref.numel() else 0.0
            self.max_abs_diff_cast = max(self.max_abs_diff_cast or 0.0, cdiff)
        self.count += 1

    def to_json(self) -> dict[str, Any]:
        return {"modules": self.count, "probes_per_module": self.probes, "max_abs_diff": self.max_abs_diff,
                "max_abs_diff_output_dtype": self.max_abs_diff_cast, "worst_module": self.worst}
