"""PRILoRA for compression: ranks increasing linearly with depth, A pruned by input-weighted magnitude.

After Benedek & Wolf, *PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation* (EACL 2024),
adapted from fine-tuning to compressing a trained adapter under a parameter budget.

**Ranks.** Block ``l`` of ``L`` gets ``r_l = r_min + (r_max − r_min)·l/(L−1)`` with
``r_max / r_min = rank_ratio`` (the paper's 4 → 12 is ``3``); the common scale is solved so
that ``Σ_modules (in+out)·min(r_l, r_module)`` equals the budget in parameters. Each block's
share (its modules' ``(in+out)·r_l``) is filled by its modules' components in order of ``σ²``
per parameter, and what rounding leaves goes to the best remaining components anywhere, both
through :func:`loracompress.core.budget.allocate`, so the budget is met exactly. (At small budgets
``r_l`` is below 1: rounding module by module would hand whole blocks their ranks in depth order.)
Modules outside the blocks (a pooler, a head projection) take the depth of the block before them.

**Pruning A.** A forward hook keeps ``x̄``, an exponential moving average (factor ``beta``) of
the per-feature L2 norm (root mean square over tokens) of each layer's input. Every
``interval`` steps, in every active row ``i`` of ``A``, the ``fraction`` of its non-zero
elements with the smallest ``S_ij = |A_ij|·x̄_j`` is set to zero (not frozen: as in the
paper, training may regrow them). No pruning event falls in the last ``interval`` steps.

**From element sparsity to stored savings.** A PEFT file stores ``A`` densely, so zeros inside a
row save nothing; only whole rank components (a row of ``A`` with its column of ``B``) do. Each
component's importance is therefore its row's total score, ``‖B[:, i]‖·Σ_j S_ij``: a row that
element pruning has emptied scores zero. Until ``cut_end`` of the steps, the components with the
lowest importance are masked out gradually (cubic schedule) from the full rank down to the
depth-linear rank of each module; from then on the mask is fixed and the survivors train on
(element pruning continuing inside their rows). The final structured cut therefore meets the
budget exactly, and the zeros are carried in the dense factors as plain values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from loracompress.calibration.methods.base import CalibContext, Method, MethodSettings
from loracompress.calibration.methods.components import component_magnitude, keep_components
from loracompress.core.budget import allocate
from loracompress.errors import LoraCompressError
from loracompress.runtime.layers import LoraLayer

log = logging.getLogger(__name__)


def depth_of_modules(ctx: CalibContext) -> dict[str, int]:
    """Each module's block index; modules outside blocks take the previous block's (0 before any)."""
    out: dict[str, int] = {}
    last = 0
    for p in ctx.layers:
        d = ctx.depth.get(p, -1)
        if d >= 0:
            last = d
        out[p] = d if d >= 0 else last
    return out


def linear_ranks(
    weights: dict[str, float], costs: dict[str, int], caps: dict[str, int], target: int
) -> dict[str, float]:
    """Fractional ranks ``min(c·w_p, cap_p)`` with ``c`` solved so that ``Σ cost·rank == target``."""
    full = sum(costs[p] * caps[p] for p in weights)
    if target >= full:
        return {p: float(caps[p]) for p in weights}

    def spent(c: float) -> float:
        return sum(costs[p] * min(c * weights[p], caps[p]) for p in weights)

    lo, hi = 0.0, 1.0
    while spent(hi) < target:
        hi *= 2
    for _ in range(100):  # bisection: spent() is continuous and non-decreasing in c
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) < target else (lo, mid)
    return {p: min(hi * weights[p], caps[p]) for p in weights}


@dataclass
class PriLoRASettings(MethodSettings):
    """rank_ratio: ``r_max / r_min`` of the depth-linear ranks (>= 1; 1 = uniform). fraction: share of each
    active A row's non-zero elements zeroed at each pruning event. interval: steps between pruning events
    (None: a twentieth of the steps). beta: EMA factor of the input-norm statistics. cut_end: fraction of
    the steps by which the structured cut reaches the final ranks."""

    rank_ratio: float = 3.0
    fraction: float = 0.1
    interval: int | None = None
    beta: float = 0.9
    cut_end: float = 0.5

    def __post_init__(self) -> None:
        if not (self.rank_ratio >= 1 and math.isfinite(self.rank_ratio)):
            raise LoraCompressError(f"prilora rank_ratio must be >= 1 (got {self.rank_ratio!r})")
        if not 0 <= self.fraction < 1:
            raise LoraCompressError(f"prilora fraction must be in [0, 1) (got {self.fraction!r})")
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise LoraCompressError(f"prilora interval must be a step count >= 1 (got {self.interval!r})")
        if not 0 <= self.beta < 1:
            raise LoraCompressError(f"prilora beta must be in [0, 1) (got {self.beta!r})")
        if not 0 < self.cut_end <= 1:
            raise LoraCompressError(f"prilora cut_end must be in (0, 1] (got {self.cut_end!r})")


class PriLoRA(Method):
    """Depth-linear ranks under the budget; A pruned by ``|A_ij|·x̄_j``; a gradual structured cut.

    Settings:
        rank_ratio: ``r_max / r_min`` of the depth-linear ranks (>= 1; 1 = uniform).
        fraction: share of each active A row's non-zero elements zeroed at each pruning event.
        interval: steps between pruning events (default: a twentieth of the steps).
        beta: EMA factor of the input-norm statistics.
        cut_end: fraction of the steps by which the structured cut reaches the final ranks.
    """

    name = "prilora"
    summary = "depth-linear ranks, A pruned by |A|·x̄ (input-norm EMA) during a short distillation"
    Settings = PriLoRASettings

    def __init__(self, settings: PriLoRASettings | None = None, **values: Any) -> None:
        super().__init__(settings, **values)
        c = self.config
        self.rank_ratio, self.fraction, self.beta, self.cut_end = float(c.rank_ratio), float(c.fraction), float(c.beta), float(c.cut_end)
        self.interval = c.interval
        self.ranks: dict[str, int] = {}  # the final, depth-linear ranks
        self.start_ranks: dict[str, int] = {}
        self.cut_step = 0  # 0-based step after which the mask is final
        self.ema: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    # -- hooks ---------------------------------------------------------------------------------

    def setup(self, ctx: CalibContext) -> None:
        super().setup(ctx)
        total = ctx.total_steps
        self.interval = self.interval or max(1, total // 20)
        self.cut_step = max(0, math.ceil(self.cut_end * total) - 1)
        self.start_ranks = {p: layer.active_rank for p, layer in ctx.layers.items()}
        self.ranks = self._allocate(ctx)
        self.ema = {}
        for p, layer in ctx.layers.items():
            self._hooks.append(layer.register_forward_pre_hook(self._make_hook(p)))
        log.debug("prilora: depth-linear ranks %s", self.ranks)

    def after_step(self, step: int) -> None:
        ctx = self.context
        last_event = step + 1 > ctx.total_steps - self.interval
        event = (step + 1) % self.interval == 0 and not last_event
        if event:
            self._prune_elements()
        if step <= self.cut_step and (event or step == self.cut_step):
            self._structured_cut(step)

    def finalize(self) -> dict[str, int]:
        ctx = self.context
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p, layer in ctx.layers.items():
            if layer.active_rank != self.ranks[p]:
                raise RuntimeError(f"prilora: {p} has {layer.active_rank} active components, expected {self.ranks[p]}")
        return dict(self.ranks)

    # -- state for checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {f"ema.{p}": v for p, v in self.ema.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = {p: state[f"ema.{p}"] for p in self.context.layers if f"ema.{p}" in state}

    # -- internals -------------------------------------------------------------------------------

    def _allocate(self, ctx: CalibContext) -> dict[str, int]:
        """Depth-linear ranks as parameter shares per block, filled within each block by energy per parameter."""
        depth = depth_of_modules(ctx)
        L = max(ctx.num_layers, 1)
        weights = {p: 1.0 + (self.rank_ratio - 1.0) * (depth[p] / (L - 1) if L > 1 else 0.0) for p in ctx.layers}
        costs = {p: ctx.cost(p) for p in ctx.layers}
        caps = dict(self.start_ranks)
        rho = linear_ranks(weights, costs, caps, ctx.target_params)
        # Below one rank per module (a small budget) a block's fractional rank cannot be rounded
        # module by module without favouring whole blocks; so each block gets its share in
        # parameters, and its modules' components compete for it by σ² per parameter.
        energy = {p: component_magnitude(layer).double().cpu().numpy() for p, layer in ctx.layers.items()}
        floor: dict[str, int] = {}
        for block in sorted(set(depth.values())):
            members = [p for p in ctx.layers if depth[p] == block]
            share = int(sum(costs[p] * rho[p] for p in members))
            floor.update(allocate({p: energy[p] for p in members}, {p: costs[p] for p in members}, share,
                                  max_rank={p: caps[p] for p in members}))
        # What rounding left in each block goes to the best remaining components anywhere.
        return allocate(energy, costs, ctx.target_params, min_rank=floor, max_rank=caps)

    def _make_hook(self, path: str) -> Any:
        def hook(module: LoraLayer, args: tuple[Any, ...]) -> None:
            if module.mode != "student" or not torch.is_grad_enabled():
                return  # the teacher's forward and evaluation do not count
            x = args[0].detach()
            norm = x.reshape(-1, x.shape[-1]).float().pow(2).mean(0).sqrt()
            old = self.ema.get(path)
            self.ema[path] = norm if old is None else old.mul_(self.beta).add_(norm, alpha=1 - self.beta)

        return hook

    def _input_norms(self, path: str, layer: LoraLayer) -> torch.Tensor:
        ema = self.ema.get(path)
        if ema is None:  # no statistics yet: plain magnitude
            return torch.ones(layer.A.shape[1], device=layer.A.device)
        return self.context.reduce_mean(ema.clone())

    def _prune_elements(self) -> None:
        if self.fraction <= 0:
            return
        with torch.no_grad():
            for p, layer in self.context.layers.items():
                if layer.active_rank == 0:
                    continue
                S = layer.A.abs() * self._input_norms(p, layer)[None, :]
                S = S.masked_fill(layer.A == 0, float("inf"))  # already zero: not counted again
                nonzero = (layer.A != 0).sum(1)
                k = torch.floor(nonzero.float() * self.fraction).long()  # per row
                if int(k.max()) == 0:
                    continue
                order = torch.argsort(S, dim=1, stable=True)
                rank_in_row = torch.empty_like(order)
                rank_in_row.scatter_(1, order, torch.arange(S.shape[1], device=S.device).expand_as(order))
                prune = (rank_in_row < k[:, None]) & (layer.mask != 0)[:, None]
                layer.A[prune] = 0.0

    def _structured_cut(self, step: int) -> None:
        """Mask components down to the cubic schedule's count for ``step`` (the final ranks at ``cut_step``)."""
        ctx = self.context
        progress = min(1.0, (step + 1) / (self.cut_step + 1))
        with torch.no_grad():
            for p, layer in ctx.layers.items():
                start, final = self.start_ranks[p], self.ranks[p]
                want = final + int(math.floor((start - final) * (1.0 - progress) ** 3))
                if layer.active_rank <= want:
                    continue
                S = layer.A.abs() * self._input_norms(p, layer)[None, :]
                importance = S.sum(1) * layer.B.norm(dim=0) * (layer.mask != 0)
                importance = torch.where(layer.mask != 0, importance, torch.full_like(importance, -1.0))
                keep_idx = torch.argsort(importance, descending=True, stable=True)[:want]
                keep = torch.zeros(layer.rank, dtype=torch.bool, device=layer.mask.device)
                keep[keep_idx] = True
                keep_components(layer, keep)

