"""The calibration-method interface: plain hooks that the engine calls, in this order.

::

    method.setup(ctx)                      # once, after the LoRA layers are attached
    for step in range(ctx.total_steps):
        method.before_forward(step)        # e.g. DyLoRA samples a rank and sets masks
        loss = ...; loss.backward()
        method.after_backward(step)        # gradients are available (importance scores)
        optimizer.step(); optimizer.zero_grad()
        method.after_step(step)            # masks / pruning / rank growth / rewinding
    ranks = method.finalize()              # per-module ranks meeting the budget exactly
    meta = method.metadata()               # str -> str, merged into the output's safetensors metadata

Methods never run their own loop and never do I/O. Allocation state (scores, EMAs, masks to
apply) lives in the method, not in the layers; a method changes a layer only through its
``mask`` and, where the algorithm needs it, its ``A``/``B`` values. ``finalize`` must meet
``ctx.target_params`` through :func:`loracompress.core.budget.allocate` so every method meets its
budget the same way. A user can drive these hooks from their own training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from loracompress.runtime.layers import LoraLayer


@dataclass
class CalibContext:
    """What a method may know about the run."""

    layers: dict[str, LoraLayer]  # path -> layer, in model order
    target_params: int  # the budget, in parameters (one rank of a layer costs in + out)
    total_steps: int
    optimizer: torch.optim.Optimizer | None = None
    seed: int = 0
    #: path -> depth index (0 = first block), for depth-aware methods; -1 when unknown
    depth: dict[str, int] = field(default_factory=dict)
    num_layers: int = 1  # number of transformer blocks
    extras: dict[str, Any] = field(default_factory=dict)

    def cost(self, path: str) -> int:
        layer = self.layers[path]
        return int(layer.A.shape[1] + layer.B.shape[0])


class Method:
    """Base class: every hook is a no-op; ``finalize`` keeps the leading components by mask order."""

    name = "base"

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.ctx: CalibContext | None = None

    def setup(self, ctx: CalibContext) -> None:
        self.ctx = ctx

    def before_forward(self, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def finalize(self) -> dict[str, int]:
        """Per-module ranks; the engine keeps those components (by current mask) and drops the rest."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """Safetensors metadata for the output adapter, called after ``finalize`` (e.g. DyLoRA's order)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Settings recorded in ``compression_report.json``."""
        return {"method": self.name, **self.settings}
