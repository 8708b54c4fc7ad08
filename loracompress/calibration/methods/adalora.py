"""AdaLoRA (Zhang et al., ICLR 2023) as a calibration method: prune rank components by importance
on a cubic budget schedule, the budget counted in parameters.

**Triplets.** AdaLoRA writes ``ΔW = PΛQ`` and prunes triplets ``(P_i, λ_i, Q_i)``. Our layers hold
balanced SVD factors (``√σ`` on each side) and a mask, so triplet ``i`` is ``(B[:, i], m_i, A[i, :])``
with the mask value ``m_i`` as ``λ_i``. Its importance is AdaLoRA's
``s(λ_i) + mean_j s(A_ij) + mean_j s(B_ji)`` with ``s = Ī·Ū`` (smoothed sensitivity ``|w·∇w|`` times
its uncertainty); ``λ``'s sensitivity comes from ``A``'s gradient, see
:mod:`loracompress.calibration.methods.importance`. Pruning a triplet sets ``m_i = 0``; a pruned triplet may
come back at a later allocation if its score is still high.

**Schedule.** The budget ``b(t)`` stays at ``b₀`` (the whole adapter, or ``init_budget`` of it)
for ``t_init`` of the run, then falls cubically,
``b(t) = b_T + (b₀ − b_T)·(1 − (t − t_i)/(T − t_f − t_i))³``, reaching the target ``b_T`` when
``t_final`` of the run is left; the mask is then fixed and the survivors fine-tune. Every
``interval`` steps the triplets are re-chosen: within each module by score, across modules by
score per parameter through :func:`loracompress.core.budget.allocate`, so a rank of a wide module is
charged what it costs (``in + out``).

**Orthogonality.** AdaLoRA's ``‖PᵀP − I‖² + ‖QQᵀ − I‖²`` would fight the balanced ``√σ`` scaling,
so ``orth_reg`` weighs the cosine-similarity form (orthogonal, not orthonormal, components); its
gradient is added to ``A``/``B``'s gradients after the backward pass.

``finalize`` moves each module's survivors to the front (order otherwise unchanged), so the
kept components are a prefix with mask 1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loracompress.calibration.methods.base import CalibContext, Method, MethodSettings
from loracompress.calibration.methods.components import (
    add_orthogonality_grad,
    component_energy,
    keep_leading,
    live_layers,
    move_to_front,
)
from loracompress.calibration.methods.importance import ComponentImportance
from loracompress.core.budget import allocate
from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)


@dataclass
class AdaLoRASettings(MethodSettings):
    """t_init / t_final: fractions of the steps before pruning starts and with the final mask fixed.
    interval: steps between re-allocations (None: about 50 of them). init_budget: the schedule's start as
    a fraction of the adapter (below 1: from the SVD cut of that size). beta1, beta2: EMA factors of the
    sensitivity and its uncertainty. orth_reg: weight of the orthogonality regulariser (0: off)."""

    t_init: float = 0.1
    t_final: float = 0.2
    interval: int | None = None
    init_budget: float = 1.0
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1

    def __post_init__(self) -> None:
        t_init, t_final = self.t_init, self.t_final
        if not (0 <= t_init <= 1 and 0 <= t_final <= 1 and t_init + t_final <= 1):
            raise LoraCompressError(
                f"adalora: t_init={t_init} and t_final={t_final} must be fractions of the run with t_init + t_final <= 1"
            )
        if self.interval is not None and self.interval < 1:
            raise LoraCompressError(f"adalora: interval={self.interval} must be at least 1 step")
        if not 0 < self.init_budget <= 1:
            raise LoraCompressError(f"adalora: init_budget={self.init_budget} must be a fraction of the adapter in (0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise LoraCompressError(f"adalora: beta1={self.beta1} and beta2={self.beta2} must be in [0, 1)")
        if self.orth_reg < 0:
            raise LoraCompressError(f"adalora: orth_reg={self.orth_reg} must be >= 0")


class AdaLoRA(Method):
    """Importance-scored triplet pruning on AdaLoRA's cubic budget schedule.

    Args:
        t_init: fraction of the steps before pruning starts (warm-up at the initial budget).
        t_final: fraction of the steps at the end with the final mask fixed.
        interval: steps between re-allocations during the cubic phase (default: about 50 of them).
        init_budget: the schedule's starting budget as a fraction of the adapter's parameters;
            below 1 the run starts from the training-free SVD cut of that size.
        beta1, beta2: EMA factors of the sensitivity and of its uncertainty (AdaLoRA: 0.85).
        orth_reg: weight of the orthogonality regulariser (0 turns it off).
    """

    name = "adalora"
    summary = "AdaLoRA's triplet importance and cubic schedule, the budget counted in parameters"
    Settings = AdaLoRASettings

    def __init__(self, settings: AdaLoRASettings | None = None, **values: Any) -> None:
        super().__init__(settings, **values)
        self.importance = ComponentImportance(self.config.beta1, self.config.beta2)
        #: (steps done, budget in parameters, parameters active) at every allocation
        self.history: list[tuple[int, int, int]] = []
        self._final_done = False

    # ------------------------------------------------------------------ hooks

    def setup(self, ctx: CalibContext) -> None:
        super().setup(ctx)
        s = self.settings
        self.layers, self.costs = live_layers(ctx.layers)
        total = sum(self.costs[p] * layer.rank for p, layer in self.layers.items())
        self.target = int(ctx.target_params)
        self.b0 = max(min(total, math.floor(s["init_budget"] * total)), self.target)
        T = ctx.total_steps
        self.t_i = int(round(s["t_init"] * T))
        self.end = max(T - int(round(s["t_final"] * T)), self.t_i)
        self.interval = s["interval"] or max(1, (self.end - self.t_i) // 50)
        self.prior = {p: component_energy(layer) for p, layer in self.layers.items()}
        if self.b0 < total:
            self._allocate(self.b0, step=0)

    def budget_at(self, step: int) -> int:
        """The schedule's budget (parameters) once ``step`` steps are done."""
        if step <= self.t_i:
            return self.b0
        if step >= self.end:
            return self.target
        frac = 1 - (step - self.t_i) / (self.end - self.t_i)
        return int(self.target + (self.b0 - self.target) * frac**3)

    def after_backward(self, step: int) -> None:
        if step < self.end:  # scores are only needed while the mask can still change
            self.importance.update(self.layers)
        add_orthogonality_grad(self.layers, self.settings["orth_reg"])

    def after_step(self, step: int) -> None:
        done = step + 1
        if done < self.t_i or self._final_done:
            return
        if done >= self.end:
            self._allocate(self.target, done)
            self._final_done = True
        elif (done - self.t_i) % self.interval == 0:
            self._allocate(self.budget_at(done), done)

    def finalize(self) -> dict[str, int]:
        ctx = self.context
        if not self._final_done:
            self._allocate(self.target, ctx.total_steps)
            self._final_done = True
        ranks = {p: 0 for p in ctx.layers}
        for p, layer in self.layers.items():
            keep = torch.nonzero(layer.mask != 0).flatten()
            perm = move_to_front(layer, keep)
            self.importance.permute(p, perm)
            keep_leading(layer, int(keep.numel()))
            ranks[p] = int(keep.numel())
        return ranks

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.ctx is not None:
            info.update(initial_budget=self.b0, target_params=self.target, prune_from_step=self.t_i,
                        final_mask_at_step=self.end, interval=self.interval)
        return info

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs for an exact resume (the engine saves the masks itself)."""
        return {**self.importance.state_dict(), "history": [list(h) for h in self.history],
                "final_done": self._final_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance.load_state_dict(state)
        self.history = [tuple(h) for h in state.get("history", [])]  # type: ignore[misc]
        self._final_done = bool(state.get("final_done", False))

    # ------------------------------------------------------------------ allocation

    def _allocate(self, budget: int, step: int) -> None:
        """Keep, in every module, its best components by score, ``budget`` parameters in all."""
        scores = self.importance.scores(self.layers)
        # Before any gradient (or with none reaching the adapter) the SVD energies decide.
        informed = any(float(s.abs().max()) > 0 for s in scores.values() if s.numel())
        values: dict[str, np.ndarray] = {}
        orders: dict[str, np.ndarray] = {}
        for p in self.layers:
            s = scores[p].numpy() if informed else self.prior[p].numpy()
            prior = self.prior[p].numpy()
            order = np.lexsort((np.arange(len(s)), -prior, -s))  # best score first; ties by σ², then position
            orders[p], values[p] = order, s[order]
        ranks = allocate(values, self.costs, budget)
        active = 0
        with torch.no_grad():
            for p, layer in self.layers.items():
                keep = torch.as_tensor(orders[p][: ranks[p]].copy(), dtype=torch.long, device=layer.mask.device)
                layer.mask.zero_()
                layer.mask[keep] = 1
                active += ranks[p] * self.costs[p]
        self.history.append((step, budget, active))
        log.debug("adalora step %d: budget %d, active %d parameters", step, budget, active)
