"""DyLoRA (Valipour et al., EACL 2023) as a calibration method: nested-rank training, so that every
leading cut of the output works and ``loracompress truncate`` can cut it without data or training.

**What is sampled.** DyLoRA samples a rank ``b`` per step and trains the rank-``b`` prefix. Our
modules have different ranks and different costs, so ``b`` is a *budget*: each step samples a
parameter count in ``[b_min·target, target]`` (log-uniformly by default, so every halving of the
budget is trained equally often; with probability ``top`` the target itself, the cut ``prune``
writes, which nested training otherwise reaches too rarely to train its last components well) and
cuts every module to the prefix that
:func:`loracompress.core.budget.allocate` gives for it, with fixed per-component values (the
checkpoint's ``σ²``, recorded at setup). ``truncate`` later makes its cuts with the same values
and the same allocator, so the cuts it makes are the cuts that were trained.

**Modes.** ``full`` updates every component of the sampled prefix; ``frozen`` (DyLoRA's
frozen-prefix variant) updates only the last component of each module's prefix and keeps the
ones before it. Components outside what a step trains are restored after the optimizer step, so
momentum or weight decay cannot move them either.

**Output.** ``finalize`` keeps the cut at the target budget, in order. :meth:`DyLoRA.metadata`
marks the adapter as DyLoRA-ordered (``loracompress.order = dylora``) and records the values
(``loracompress.dylora.values``) and the trained range (``loracompress.dylora.range``) for
``truncate``. The order must survive to the file: the output must not be re-factorised.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loracompress.calibration.methods.base import CalibContext, Method, MethodSettings
from loracompress.calibration.methods.components import component_energy, keep_leading, live_layers
from loracompress.core import jsonio
from loracompress.core.adapter import NESTED_ORDER, NESTED_RANGE_KEY, NESTED_VALUES_KEY, ORDER_KEY
from loracompress.core.budget import allocate
from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)

MODES = ("full", "frozen")
SAMPLING = ("log", "uniform")


@dataclass
class DyLoRASettings(MethodSettings):
    """mode: ``full`` (train the whole sampled prefix) or ``frozen`` (only its last component). b_min: the
    smallest budget trained, as a fraction of the target budget. sampling: ``log`` (log-uniform budgets) or
    ``uniform``. top: probability that a step trains the output cut itself."""

    mode: str = "full"
    b_min: float = 1 / 16
    sampling: str = "log"
    top: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LoraCompressError(f"dylora: mode={self.mode!r}; choose one of {', '.join(MODES)}")
        if not 0 < self.b_min <= 1:
            raise LoraCompressError(f"dylora: b_min={self.b_min} must be a fraction of the budget in (0, 1]")
        if self.sampling not in SAMPLING:
            raise LoraCompressError(f"dylora: sampling={self.sampling!r}; choose one of {', '.join(SAMPLING)}")
        if not 0 <= self.top < 1:
            raise LoraCompressError(f"dylora: top={self.top} must be a probability in [0, 1)")


class DyLoRA(Method):
    """Nested-budget training: one sampled cut per step, every cut a prefix of each module.

    Args:
        mode: ``full`` (train the whole sampled prefix) or ``frozen`` (only its last component).
        b_min: the smallest budget trained, as a fraction of the target (output) budget.
        sampling: ``log`` (log-uniform budgets) or ``uniform`` (uniform budgets, DyLoRA's uniform ranks).
        top: probability that a step trains the output cut itself (the target budget).
    """

    name = "dylora"
    nested = True
    summary = "nested-rank training: every prefix works, then `truncate` cuts any size without data"
    Settings = DyLoRASettings

    def __init__(self, settings: DyLoRASettings | None = None, **values: Any) -> None:
        super().__init__(settings, **values)
        self._cache: dict[int, dict[str, int]] = {}
        self._step_ranks: dict[str, int] = {}
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor, slice]] = {}
        self._final: dict[str, int] | None = None

    # ------------------------------------------------------------------ hooks

    def setup(self, ctx: CalibContext) -> None:
        super().setup(ctx)
        self.layers, self.costs = live_layers(ctx.layers)
        self.values = {p: np.asarray(component_energy(layer).numpy(), dtype=np.float64) for p, layer in self.layers.items()}
        self.target = int(ctx.target_params)
        smallest = min(self.costs.values(), default=1)
        self.low = max(smallest, int(self.settings["b_min"] * self.target))
        self._rng = random.Random(ctx.seed)  # the same draws in every process of a distributed run

    def sample_budget(self) -> int:
        lo, hi = self.low, max(self.low, self.target)
        if self._rng.random() < self.settings["top"]:
            return hi
        if self.settings["sampling"] == "log":
            return int(round(math.exp(self._rng.uniform(math.log(lo), math.log(hi)))))
        return self._rng.randint(lo, hi)

    def cut(self, budget: int) -> dict[str, int]:
        """Per-module ranks of the cut at ``budget`` parameters (the one ``truncate`` makes)."""
        if budget not in self._cache:
            self._cache[budget] = allocate(self.values, self.costs, budget)
        return self._cache[budget]

    def before_forward(self, step: int) -> None:
        self._step_ranks = self.cut(self.sample_budget())
        with torch.no_grad():
            for p, layer in self.layers.items():
                k = self._step_ranks[p]
                layer.mask[:k] = 1
                layer.mask[k:] = 0

    def after_backward(self, step: int) -> None:
        frozen = self.settings["mode"] == "frozen"
        self._saved = {}
        with torch.no_grad():
            for p, layer in self.layers.items():
                k = self._step_ranks.get(p, layer.rank)
                trained = slice(max(k - 1, 0), k) if frozen else slice(0, k)
                self._saved[p] = (layer.A.detach().clone(), layer.B.detach().clone(), trained)
                for g, rows in ((layer.A.grad, True), (layer.B.grad, False)):
                    if g is None:
                        continue
                    keep = g[trained].clone() if rows else g[:, trained].clone()
                    g.zero_()
                    if rows:
                        g[trained] = keep
                    else:
                        g[:, trained] = keep

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            for p, (A, B, trained) in self._saved.items():
                layer = self.layers[p]
                newA, newB = layer.A[trained].clone(), layer.B[:, trained].clone()
                layer.A.copy_(A)
                layer.B.copy_(B)
                layer.A[trained] = newA
                layer.B[:, trained] = newB
        self._saved = {}

    def finalize(self) -> dict[str, int]:
        ctx = self.context
        cut = self.cut(self.target)
        with torch.no_grad():
            for p, layer in self.layers.items():
                layer.mask.fill_(1)  # the last step's sampled cut is not the output's
                keep_leading(layer, cut[p])
        self._final = dict(cut)
        return {p: cut.get(p, 0) for p in ctx.layers}

    def metadata(self) -> dict[str, str]:
        """Safetensors metadata of the output: DyLoRA order, component values, trained range."""
        if self._final is None:
            raise RuntimeError("metadata() before finalize()")
        values = {p: [float(v) for v in self.values[p][:k]] for p, k in self._final.items() if k > 0}
        return {
            ORDER_KEY: NESTED_ORDER,
            NESTED_VALUES_KEY: jsonio.dumps(values, separators=(",", ":")),
            NESTED_RANGE_KEY: jsonio.dumps({"min_params": self.low, "max_params": self.target}),
        }

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state, so a resumed run draws the same budgets (the engine saves the factors)."""
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((int(version), tuple(int(x) for x in internal), gauss))

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.ctx is not None:
            info.update(min_budget_params=self.low, max_budget_params=self.target)
        return info
