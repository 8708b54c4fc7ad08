"""Importance of rank components from gradients, shared by the AdaLoRA and IncreLoRA methods.

**Sensitivity.** For a parameter ``w`` with gradient ``g`` the sensitivity ``I = |w·g|`` estimates the
loss change from removing ``w``. It is noisy from batch to batch, so AdaLoRA smooths it
(``Ī ← β₁Ī + (1−β₁)I``) and tracks its uncertainty (``Ū ← β₂Ū + (1−β₂)|I − Ī|``); the score is
``s = Ī·Ū``. IncreLoRA scores modules with the same recipe.

**Triplets.** Our layers hold ``A``/``B`` and a per-component ``mask``. Rank component ``i`` is the
triplet ``(B[:, i], m_i, A[i, :])``: the mask value ``m_i`` plays the role of AdaLoRA's singular
value ``λ_i``, and the triplet's score is AdaLoRA's ``s(λ_i) + mean_j s(A_ij) + mean_j s(B_ji)``.
The mask needs no gradient of its own: ``m_i·∂L/∂m_i = Σ_j A_ij·∂L/∂A_ij`` exactly, so the
``λ`` sensitivity comes from ``A``'s gradient.

**Per unit mask.** A component's gradients scale with its mask value, so every sensitivity is
divided by ``m_i``: a component ramping in, or trained ahead at a tiny mask (IncreLoRA's reserve),
is scored as if it were fully on. A masked-out component (``m_i = 0``) gets no gradient; its
score decays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loracompress.runtime.layers import LoraLayer

_PARTS = ("lambda", "A", "B")


@dataclass
class _Ema:
    """Smoothed sensitivity and uncertainty of one tensor of sensitivities."""

    ipt: torch.Tensor
    unc: torch.Tensor

    def update(self, value: torch.Tensor, beta1: float, beta2: float) -> None:
        self.ipt.mul_(beta1).add_(value, alpha=1 - beta1)
        self.unc.mul_(beta2).add_((value - self.ipt).abs(), alpha=1 - beta2)

    @property
    def score(self) -> torch.Tensor:
        return self.ipt * self.unc


class ComponentImportance:
    """Per-component AdaLoRA scores for every layer, updated from the gradients after each backward."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        self.beta1, self.beta2 = beta1, beta2
        self._state: dict[str, tuple[_Ema, _Ema, _Ema]] = {}
        self.updates = 0

    @torch.no_grad()
    def update(self, layers: Mapping[str, LoraLayer]) -> None:
        """Fold the current gradients of every layer into the running scores."""
        for path, layer in layers.items():
            if layer.rank == 0 or layer.A.grad is None or layer.B.grad is None:
                continue
            A, B = layer.A.detach(), layer.B.detach()
            m = layer.mask.detach().to(A.dtype).abs()
            inv = torch.where(m > 0, 1.0 / m.clamp_min(1e-30), torch.zeros_like(m))
            prod_a = A * layer.A.grad.detach().to(A.dtype)
            sens_a = prod_a.abs() * inv[:, None]
            sens_b = (B * layer.B.grad.detach().to(B.dtype)).abs() * inv[None, :]
            sens_l = prod_a.sum(dim=1).abs() * inv
            state = self._state.get(path)
            if state is None:
                state = tuple(_Ema(torch.zeros_like(t), torch.zeros_like(t)) for t in (sens_l, sens_a, sens_b))
                self._state[path] = state  # type: ignore[assignment]
            for ema, value in zip(state, (sens_l, sens_a, sens_b)):
                ema.update(value, self.beta1, self.beta2)
        self.updates += 1

    def scores(self, layers: Mapping[str, LoraLayer]) -> dict[str, torch.Tensor]:
        """``path -> [rank]`` triplet scores (float64, CPU); zeros for layers never scored."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in layers.items():
            state = self._state.get(path)
            if state is None:
                out[path] = torch.zeros(layer.rank, dtype=torch.float64)
                continue
            lam, a, b = state
            s = lam.score + a.score.mean(dim=1) + b.score.mean(dim=0)
            out[path] = s.detach().double().cpu()
        return out

    def state_dict(self, prefix: str = "importance") -> dict[str, Any]:
        """Tensors and counters to checkpoint (keys ``PREFIX.PATH.{lambda,A,B}.{ipt,unc}``)."""
        out: dict[str, Any] = {f"{prefix}.updates": self.updates}
        for path, emas in self._state.items():
            for part, ema in zip(_PARTS, emas):
                out[f"{prefix}.{path}.{part}.ipt"] = ema.ipt
                out[f"{prefix}.{path}.{part}.unc"] = ema.unc
        return out

    def load_state_dict(self, state: Mapping[str, Any], prefix: str = "importance") -> None:
        self.updates = int(state.get(f"{prefix}.updates", 0))
        found: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key.startswith(prefix + ".") and key.endswith((".ipt", ".unc")):
                path, part, kind = key[len(prefix) + 1:].rsplit(".", 2)
                found.setdefault(path, {})[f"{part}.{kind}"] = value
        self._state = {
            path: tuple(_Ema(t[f"{part}.ipt"].clone(), t[f"{part}.unc"].clone()) for part in _PARTS)  # type: ignore[misc]
            for path, t in found.items()
        }

    @torch.no_grad()
    def permute(self, path: str, perm: torch.Tensor) -> None:
        """Reorder one layer's component scores (after its components were reordered)."""
        state = self._state.get(path)
        if state is None:
            return
        lam, a, b = state
        for ema in (lam, a):
            ema.ipt.copy_(ema.ipt[perm])
            ema.unc.copy_(ema.unc[perm])
        b.ipt.copy_(b.ipt[:, perm])
        b.unc.copy_(b.unc[:, perm])
