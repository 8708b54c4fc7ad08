"""LoRPA: lottery-ticket rank pruning of a trained adapter.

The student starts as the original adapter at full rank, in SVD order. The steps are split into
``rounds + 1`` equal phases. At the end of each of the first ``rounds`` phases:

1. every active rank component ``i`` of every module is scored by its magnitude,
   ``score="norm"``: ``(‖B[:, i]‖·‖A[i, :]‖)²`` (the squared Frobenius norm of the rank-1 term;
   for the SVD start it is ``σ_i²``), or ``score="products"``: ``(Σ_kj |B_ki·A_ij|)²``;
2. the components are pruned globally towards the budget through
   :func:`loracompress.core.budget.allocate` (value per parameter, so a component of a wide module
   must be worth its cost). The parameter count shrinks geometrically over the rounds, from the
   full adapter to exactly the budget after the last round;
3. the survivors are **rewound** to their values at the rewind point (the checkpoint's own
   components, or the values after ``rewind_step`` steps for late rewinding), the pruned
   components are zeroed and masked, the optimizer's moments are reset, and the learning-rate
   schedule starts again (warm-up, decay) for the next phase.

The last phase retrains the winning ticket with its mask fixed; its ranks are the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loracompress.calibration.methods.base import CalibContext, Method, MethodSettings
from loracompress.calibration.methods.components import component_magnitude, keep_components
from loracompress.core.budget import allocate
from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)

SCORES = ("norm", "products")


@dataclass
class LoRPASettings(MethodSettings):
    """rounds: pruning rounds (1: prune once, halfway; 3: geometric steps towards the budget). score:
    ``"norm"`` (‖B_i‖·‖A_i‖) or ``"products"`` (Σ|B_ki·A_ij|). rewind_step: rewind survivors to their
    values after this many steps (0: the checkpoint's)."""

    rounds: int = 1
    score: str = "norm"
    rewind_step: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise LoraCompressError(f"lorpa rounds must be a whole number >= 1 (got {self.rounds!r})")
        if self.score not in SCORES:
            raise LoraCompressError(f"lorpa score must be one of {', '.join(SCORES)} (got {self.score!r})")
        if not isinstance(self.rewind_step, int) or self.rewind_step < 0:
            raise LoraCompressError(f"lorpa rewind_step must be a step count >= 0 (got {self.rewind_step!r})")


class LoRPA(Method):
    """Lottery-ticket rank pruning: score by magnitude, prune to the budget, rewind, retrain.

    Settings:
        rounds: pruning rounds (1: prune once, halfway; 3: geometric steps towards the budget).
        score: ``"norm"`` (‖B_i‖·‖A_i‖) or ``"products"`` (Σ|B_ki·A_ij|, the paper's sum of products).
        rewind_step: rewind survivors to their values after this many steps (0: the checkpoint's).
    """

    name = "lorpa"
    summary = "lottery ticket: magnitude rank-pruning, rewind the survivors, retrain with the mask fixed"
    Settings = LoRPASettings

    def __init__(self, settings: LoRPASettings | None = None, **values: Any) -> None:
        super().__init__(settings, **values)
        self.rounds, self.score, self.rewind_step = self.config.rounds, self.config.score, self.config.rewind_step
        self.prune_at: list[int] = []  # 0-based steps after which a round prunes
        self.rewind_to: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.full_params = 0

    # -- hooks ---------------------------------------------------------------------------------

    def setup(self, ctx: CalibContext) -> None:
        super().setup(ctx)
        phase = ctx.total_steps // (self.rounds + 1)
        if phase < 1:
            raise LoraCompressError(
                f"lorpa with {self.rounds} round(s) needs at least {self.rounds + 1} steps (got {ctx.total_steps}); raise --steps"
            )
        if self.rewind_step >= phase:
            raise LoraCompressError(
                f"lorpa rewind_step {self.rewind_step} must come before the first pruning round (step {phase})"
            )
        self.prune_at = [phase * (k + 1) - 1 for k in range(self.rounds)]
        self.full_params = sum(layer.active_rank * ctx.cost(p) for p, layer in ctx.layers.items())
        if self.rewind_step == 0:
            self._record_rewind_point()

    def after_step(self, step: int) -> None:
        if self.rewind_step > 0 and step + 1 == self.rewind_step:
            self._record_rewind_point()
        if step in self.prune_at:
            self._prune_round(self.prune_at.index(step))

    def schedule_restarts(self) -> list[int]:
        return [s + 1 for s in self.prune_at]

    def finalize(self) -> dict[str, int]:
        ctx = self.context
        ranks = {p: layer.active_rank for p, layer in ctx.layers.items()}
        spent = sum(r * ctx.cost(p) for p, r in ranks.items())
        if spent > ctx.target_params:
            raise RuntimeError(f"lorpa finished above the budget ({spent} > {ctx.target_params}); was a round skipped?")
        return ranks

    # -- state for checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.rewind_step > 0:  # the setup-time rewind point is rebuilt by setup itself
            for p, (A, B) in self.rewind_to.items():
                state[f"rewind.{p}.A"], state[f"rewind.{p}.B"] = A, B
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p in self.context.layers:
            if f"rewind.{p}.A" in state:
                self.rewind_to[p] = (state[f"rewind.{p}.A"], state[f"rewind.{p}.B"])

    # -- internals -------------------------------------------------------------------------------

    def _record_rewind_point(self) -> None:
        self.rewind_to = {p: (layer.A.detach().clone(), layer.B.detach().clone()) for p, layer in self.context.layers.items()}

    def _round_target(self, k: int) -> int:
        """Parameters kept after round ``k`` (0-based): geometric from the full adapter to the budget."""
        ctx = self.context
        if k == self.rounds - 1:
            return ctx.target_params
        ratio = ctx.target_params / max(self.full_params, 1)
        return int(self.full_params * ratio ** ((k + 1) / self.rounds))

    def _prune_round(self, k: int) -> None:
        ctx = self.context
        target = self._round_target(k)
        values: dict[str, np.ndarray] = {}
        order: dict[str, torch.Tensor] = {}
        for p, layer in ctx.layers.items():
            active = (layer.mask != 0).nonzero().flatten().cpu()
            scores = component_magnitude(layer, self.score).cpu()[active]
            ranked = torch.argsort(scores, descending=True, stable=True)
            order[p] = active[ranked]
            values[p] = scores[ranked].double().numpy()
        costs = {p: ctx.cost(p) for p in ctx.layers}
        counts = allocate(values, costs, target)
        with torch.no_grad():
            for p, layer in ctx.layers.items():
                keep = torch.zeros(layer.rank, dtype=torch.bool)
                keep[order[p][: counts[p]]] = True
                A0, B0 = self.rewind_to[p]
                layer.A.copy_(A0)
                layer.B.copy_(B0)
                keep_components(layer, keep)
        ctx.reset_optimizer()  # the rewound ticket retrains from fresh moments
        kept = sum(counts[p] * costs[p] for p in counts)
        log.info("lorpa round %d/%d: kept %d parameters (target %d), rewound and retraining",
                 k + 1, self.rounds, kept, target)
