"""IncreLoRA (Zhang et al., 2023) as a calibration method: start small, grow rank where it pays.

**Start.** Each module starts from its top singular components of the checkpoint (at most
``init_rank`` of them), chosen by the training-free SVD allocation within ``init_fraction`` of
the budget; the rest of the checkpoint's components wait behind the mask.

**Importance.** Every backward pass updates AdaLoRA/IncreLoRA's score, the smoothed sensitivity
``|θ·∇θ|`` times its uncertainty, per rank component (see :mod:`loracompress.calibration.methods.importance`).

**Advance learning.** The next ``reserve`` components of each module are trained ahead: they
run at a tiny mask ``reserve_mask`` (so they barely change the output) and get gradients, and
their score, taken per unit mask, is the first-order value of switching them on. At that tiny
mask the loss only sees their direction, so their magnitude is held at the checkpoint's (both
factors renormalised after each step) while the direction learns.

**Growth.** After ``t_init`` of the run, in ``rounds`` rounds up to ``grow_until``, the budget
still free is handed out: modules compete with the score of their next component per parameter
it costs (``in + out``) through :func:`loracompress.core.budget.allocate`, at most ``per_round``
components per module per round, the last round filling the budget. A module grows by its next
checkpoint component (the trained reserve), so each module's kept set stays a prefix.

**Warm-up.** A component that was just added ramps its mask linearly from ``reserve_mask`` to 1
over ``warmup`` steps instead of switching on at once (fewer when the run ends sooner, so every
ramp is complete by the last step).

**Orthogonality.** Optional (``orth_reg``): the cosine form of AdaLoRA's regulariser, see
:func:`loracompress.calibration.methods.importance.add_orthogonality_grad`.

``finalize`` tops up any budget still free (too few steps to finish growing) and keeps the grown
prefixes: the budget is met through ``allocate``.
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
)
from loracompress.calibration.methods.importance import ComponentImportance
from loracompress.core.budget import allocate
from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)


@dataclass
class IncreLoRASettings(MethodSettings):
    """init_rank / init_fraction: the start's leading components per module and share of the budget.
    t_init / grow_until: fractions of the steps before the first growth round and by which the budget is
    allocated. rounds, per_round: growth rounds and components added to one module per round. reserve,
    advance, reserve_mask: components trained ahead of being added, and the mask they run at. warmup:
    steps over which a new component's mask ramps to 1 (None: one round). beta1, beta2: EMA factors.
    orth_reg: weight of the orthogonality regulariser (0: off)."""

    init_rank: int = 1
    init_fraction: float = 0.5
    t_init: float = 0.1
    grow_until: float = 0.7
    rounds: int = 8
    per_round: int = 1
    reserve: int = 1
    advance: bool = True
    reserve_mask: float = 1e-3
    warmup: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.0

    def __post_init__(self) -> None:
        if self.init_rank < 0 or not 0 <= self.init_fraction <= 1:
            raise LoraCompressError(
                f"increlora: init_rank={self.init_rank} must be >= 0 and init_fraction={self.init_fraction} in [0, 1]")
        if not 0 <= self.t_init <= self.grow_until <= 1:
            raise LoraCompressError(f"increlora: need 0 <= t_init ({self.t_init}) <= grow_until ({self.grow_until}) <= 1")
        if self.rounds < 1 or self.per_round < 1 or self.reserve < 0:
            raise LoraCompressError(
                f"increlora: rounds ({self.rounds}) and per_round ({self.per_round}) must be >= 1, reserve >= 0")
        if not 0 < self.reserve_mask < 1:
            raise LoraCompressError(f"increlora: reserve_mask={self.reserve_mask} must be in (0, 1)")
        if self.warmup is not None and self.warmup < 1:
            raise LoraCompressError(f"increlora: warmup={self.warmup} must be at least 1 step")
        if self.orth_reg < 0:
            raise LoraCompressError(f"increlora: orth_reg={self.orth_reg} must be >= 0")


class IncreLoRA(Method):
    """Incremental rank allocation from a small start, grown by importance under a parameter budget.

    Args:
        init_rank: at most this many leading components per module at the start.
        init_fraction: the start uses at most this fraction of the budget.
        t_init: fraction of the steps before the first growth round.
        grow_until: fraction of the steps by which the budget is fully allocated.
        rounds: number of growth rounds.
        per_round: at most this many components added to one module per round (not the last).
        reserve: components per module trained ahead of being added (advance learning).
        advance: train the reserve ahead; without it modules compete by their active components' score.
        reserve_mask: the mask value the reserve runs at, and where a new component's warm-up starts.
        warmup: steps over which a new component's mask ramps to 1 (default: one round's length).
        beta1, beta2: EMA factors of the sensitivity and of its uncertainty.
        orth_reg: weight of the orthogonality regulariser (0: off).
    """

    name = "increlora"
    summary = "starts small and grows rank where the |θ·∇θ| importance is highest"
    Settings = IncreLoRASettings

    def __init__(self, settings: IncreLoRASettings | None = None, **values: Any) -> None:
        super().__init__(settings, **values)
        self.importance = ComponentImportance(self.config.beta1, self.config.beta2)
        self.active: dict[str, int] = {}
        self.start_ranks: dict[str, int] = {}
        #: (steps done, parameters active) after each growth round
        self.history: list[tuple[int, int]] = []
        self._ramp: dict[str, dict[int, tuple[int, int]]] = {}  # path -> {component: (first step, length)}
        self._reserve_norms: dict[str, dict[int, tuple[float, float]]] = {}
        self._round = 0
        self.finished = False

    # ------------------------------------------------------------------ hooks

    def setup(self, ctx: CalibContext) -> None:
        super().setup(ctx)
        s = self.settings
        self.layers, self.costs = live_layers(ctx.layers)
        self.prior = {p: component_energy(layer).numpy() for p, layer in self.layers.items()}
        self.target = int(ctx.target_params)
        start_budget = int(s["init_fraction"] * self.target)
        if s["init_rank"] > 0 and start_budget >= min(self.costs.values(), default=math.inf):
            self.active = allocate(self.prior, self.costs, start_budget, max_rank=s["init_rank"])
        else:
            self.active = {p: 0 for p in self.layers}
        self.start_ranks = dict(self.active)
        self.start_params = self._spent()
        T = ctx.total_steps
        first = int(round(s["t_init"] * T))
        last = max(int(round(s["grow_until"] * T)), first)
        n = max(1, min(s["rounds"], last - first))
        self.round_steps = sorted({max(1, first + int(round(k * (last - first) / n))) for k in range(1, n + 1)})
        self.warmup = s["warmup"] or max(1, (last - first) // n)
        with torch.no_grad():
            for p, layer in self.layers.items():
                layer.mask.zero_()
                layer.mask[: self.active[p]] = 1
                self._ramp[p] = {}
                self._set_reserve(p)

    def before_forward(self, step: int) -> None:
        eps = self._ramp_start
        with torch.no_grad():
            for p, ramp in self._ramp.items():
                for i, (began, length) in list(ramp.items()):
                    t = min(1.0, (step - began + 1) / length)
                    self.layers[p].mask[i] = eps + (1 - eps) * t
                    if t >= 1:
                        del ramp[i]

    def after_backward(self, step: int) -> None:
        if not self.finished:
            self.importance.update(self.layers)
        add_orthogonality_grad(self.layers, self.settings["orth_reg"])

    def after_step(self, step: int) -> None:
        if self.finished:
            return
        self._renormalise_reserve()
        done = step + 1
        while self._round < len(self.round_steps) and done >= self.round_steps[self._round]:
            self._round += 1
            self._grow(last=self._round == len(self.round_steps), step=done)

    def finalize(self) -> dict[str, int]:
        ctx = self.context
        if not self.finished:  # the run ended before growth finished: fill what is left now
            self._grow(last=True, step=ctx.total_steps, warm=False)
        ranks = {p: 0 for p in ctx.layers}
        for p, layer in self.layers.items():
            keep_leading(layer, self.active[p])
            ranks[p] = self.active[p]
        return ranks

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.ctx is not None:
            info.update(start_params=self.start_params, target_params=self.target, growth_steps=self.round_steps)
        return info

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs for an exact resume (the engine saves the masks itself)."""
        return {
            **self.importance.state_dict(),
            "active": dict(self.active),
            "ramp": {p: {str(i): list(s) for i, s in r.items()} for p, r in self._ramp.items()},
            "reserve_norms": {p: {str(i): list(n) for i, n in r.items()} for p, r in self._reserve_norms.items()},
            "round": self._round,
            "finished": self.finished,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance.load_state_dict(state)
        self.active = {p: int(k) for p, k in state["active"].items()}
        self._ramp = {p: {int(i): (int(s[0]), int(s[1])) for i, s in r.items()} for p, r in state["ramp"].items()}
        self._reserve_norms = {p: {int(i): (float(n[0]), float(n[1])) for i, n in r.items()}
                               for p, r in state["reserve_norms"].items()}
        self._round = int(state["round"])
        self.finished = bool(state["finished"])
        self.history = [tuple(h) for h in state.get("history", [])]  # type: ignore[misc]

    # ------------------------------------------------------------------ growth

    @property
    def _ramp_start(self) -> float:
        return self.settings["reserve_mask"] if self.settings["advance"] else 0.0

    def _spent(self) -> int:
        return sum(self.active[p] * self.costs[p] for p in self.layers)

    def _growth_scores(self) -> dict[str, float]:
        """Each module's claim to grow: the score of its next component (trained ahead) or, without
        advance learning, the mean score of its active components."""
        scores = self.importance.scores(self.layers)
        out = {}
        for p, layer in self.layers.items():
            a = self.active[p]
            if self.settings["advance"]:
                out[p] = float(scores[p][a]) if a < layer.rank else 0.0
            else:
                out[p] = float(scores[p][:a].mean()) if a > 0 else 0.0
        return out

    def _grow(self, last: bool, step: int, warm: bool = True) -> None:
        n = len(self.round_steps)
        goal = self.target if last else self.start_params + (self.target - self.start_params) * self._round // n
        growth = self._growth_scores()
        informed = any(g > 0 for g in growth.values())
        values: dict[str, np.ndarray] = {}
        caps: dict[str, int] = {}
        for p, layer in self.layers.items():
            a, prior = self.active[p], self.prior[p]
            v = np.array(prior, dtype=np.float64)
            if informed and a < layer.rank:
                # the next component carries the module's score; later ones decay with the checkpoint's σ²
                v[a:] = growth[p] * prior[a:] / max(prior[a], 1e-300)
            if a < layer.rank:
                v[:a] = v[a]  # already kept (min_rank); equal values leave the later ones' order alone
            values[p] = v
            if last:
                caps[p] = layer.rank
            elif informed and growth[p] <= 0:
                caps[p] = a  # no signal: a module earns growth only in the round that fills the budget
            else:
                caps[p] = min(layer.rank, a + self.settings["per_round"])
        new = allocate(values, self.costs, max(goal, self._spent()), min_rank=self.active, max_rank=caps)
        left = self.ctx.total_steps - step if self.ctx is not None else 0  # the ramp must end before the run does
        with torch.no_grad():
            for p, layer in self.layers.items():
                for i in range(self.active[p], new[p]):
                    self._reserve_norms[p].pop(i, None)
                    if warm and left > 0:
                        self._ramp[p][i] = (step, min(self.warmup, left))
                    else:
                        layer.mask[i] = 1
                self.active[p] = new[p]
                if last:
                    layer.mask[new[p]:] = 0  # no more growth: the reserve stops running
                    self._reserve_norms[p] = {}
                else:
                    self._set_reserve(p)
        self.history.append((step, self._spent()))
        self.finished = last
        log.debug("increlora step %d: %d of %d parameters allocated", step, self._spent(), self.target)

    @torch.no_grad()
    def _set_reserve(self, p: str) -> None:
        """Run the next ``reserve`` components of module ``p`` at the reserve mask (advance learning)."""
        layer, a = self.layers[p], self.active[p]
        norms = self._reserve_norms.setdefault(p, {})
        if not self.settings["advance"]:
            return
        for i in range(a, min(a + self.settings["reserve"], layer.rank)):
            if i not in norms:
                norms[i] = (float(layer.A[i].norm()), float(layer.B[:, i].norm()))
                layer.mask[i] = self.settings["reserve_mask"]

    @torch.no_grad()
    def _renormalise_reserve(self) -> None:
        for p, norms in self._reserve_norms.items():
            layer = self.layers[p]
            for i, (na, nb) in norms.items():
                layer.A[i] *= na / max(float(layer.A[i].norm()), 1e-30)
                layer.B[:, i] *= nb / max(float(layer.B[:, i].norm()), 1e-30)
