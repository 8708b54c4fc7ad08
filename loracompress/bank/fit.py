"""Shared bases and per-adapter cores for one module of one cluster, in the factor space.

N adapters update one module by ``ΔWᵢ = sᵢ·Bᵢ·Aᵢ``. A bank keeps per module an orthonormal ``U`` (out×R)
and ``V`` (in×R) shared by the cluster, and per adapter a core ``Σᵢ = Uᵀ ΔWᵢ V`` (R×R), so
``ΔWᵢ ≈ U Σᵢ Vᵀ``. For given ``U``, ``V`` that core is the least-squares best, and the error is
``‖ΔWᵢ‖² − ‖Σᵢ‖²``; the bases maximise ``Σᵢ wᵢ²‖Uᵀ ΔWᵢ V‖²``, where ``wᵢ = 1/‖ΔWᵢ‖`` of the whole adapter
makes each adapter count by its relative error (a large adapter would otherwise own the bases).

Nothing of size out×in is formed. The stacked factors ``[B₁ … B_N]`` (out×Σr) and ``[A₁ᵀ … A_Nᵀ]``
(in×Σr) are factorised once (``Bcat = Q_b P_b``, ``Acat = Q_a P_a``); every ``ΔWᵢ`` is then
``Q_b (sᵢ P_bᵢ P_aᵢᵀ) Q_aᵀ`` and everything else is a product of matrices of side Σr at most: the
bases start as the top eigenvectors of ``Σ wᵢ² Cᵢ Cᵢᵀ`` and ``Σ wᵢ² Cᵢᵀ Cᵢ`` (``Cᵢ = sᵢ P_bᵢ P_aᵢᵀ``) (a higher-order SVD,
which gives nested bases, so the captured energy of every R is known before R is chosen) and may be
refined by alternating updates (HOOI: each side the top eigenvectors given the other).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loracompress.core.adapter import LoraModule

_WORK = torch.float64
#: singular values of a stacked factor below this fraction of its largest are numerical zero
_RANK_TOL = 1e-10


@dataclass
class ModuleStack:
    """One module's factors of a cluster's adapters, in the orthonormal coordinates of their spans."""

    Qb: torch.Tensor  # [out, kb], orthonormal basis of span(B₁ … B_N)
    Qa: torch.Tensor  # [in, ka], orthonormal basis of span(A₁ᵀ … A_Nᵀ)
    Pb: list[torch.Tensor]  # per adapter [kb, rᵢ]: Bᵢ = Qb Pbᵢ
    Pa: list[torch.Tensor]  # per adapter [ka, rᵢ]: Aᵢᵀ = Qa Paᵢ
    scales: list[float]
    weights: list[float]
    Uc: torch.Tensor  # [kb, kb]: eigenvectors, most energy first (U = Qb Uc)
    Vc: torch.Tensor  # [ka, ka]

    @property
    def r_max(self) -> int:
        """The largest R a square core allows: every direction of the smaller span."""
        return min(self.Qb.shape[1], self.Qa.shape[1])


def _span(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``X = Q @ C`` with ``Q`` orthonormal over X's numerical column span (thin SVD: rank-revealing)."""
    Q, S, Vh = torch.linalg.svd(X, full_matrices=False)
    k = int((S > S[0] * _RANK_TOL).sum()) if S.numel() else 0
    return Q[:, :k].contiguous(), S[:k, None] * Vh[:k]


def _top_eigvecs(M: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Eigenvectors of the symmetric ``M``, largest eigenvalue first (the top ``k`` when given)."""
    lam, vecs = torch.linalg.eigh((M + M.T) / 2)
    vecs = vecs.flip(1)
    return vecs if k is None else vecs[:, :k].contiguous()


def stack_module(modules: Sequence[LoraModule], weights: Sequence[float]) -> ModuleStack:
    """Factorise the stacked factors of one module and start the bases from their higher-order SVD."""
    Bcat = torch.cat([m.B.detach().to(_WORK) for m in modules], dim=1)
    Acat = torch.cat([m.A.detach().to(_WORK).T for m in modules], dim=1)
    Qb, Pcat = _span(Bcat)
    Qa, Ocat = _span(Acat)
    bounds = np.cumsum([0] + [m.rank for m in modules])
    Pb = [Pcat[:, bounds[i]:bounds[i + 1]] for i in range(len(modules))]
    Pa = [Ocat[:, bounds[i]:bounds[i + 1]] for i in range(len(modules))]
    scales = [float(m.scale) for m in modules]
    kb, ka = Qb.shape[1], Qa.shape[1]
    MU = torch.zeros(kb, kb, dtype=_WORK)
    MV = torch.zeros(ka, ka, dtype=_WORK)
    for Pi, Oi, s, w in zip(Pb, Pa, scales, weights):
        c = (w * s) ** 2
        MU += c * Pi @ (Oi.T @ Oi) @ Pi.T  # Cᵢ Cᵢᵀ through rᵢ×rᵢ products
        MV += c * Oi @ (Pi.T @ Pi) @ Oi.T
    return ModuleStack(Qb=Qb, Qa=Qa, Pb=Pb, Pa=Pa, scales=scales, weights=list(weights),
                       Uc=_top_eigvecs(MU), Vc=_top_eigvecs(MV))


def nested_gains(stack: ModuleStack) -> np.ndarray:
    """Weighted energy each R adds over R−1 (R = 1 … r_max) with the nested starting bases.

    The energy the leading R×R block of every core holds, for all R at once: a 2-D cumulative sum of the
    squared full cores, read on its diagonal. One adapter's core at a time, so memory stays at r_max².
    """
    R = stack.r_max
    captured = np.zeros(R)
    Ub, Vb = stack.Uc[:, :R], stack.Vc[:, :R]
    for Pi, Oi, s, w in zip(stack.Pb, stack.Pa, stack.scales, stack.weights):
        core = (w * s) * (Ub.T @ Pi) @ (Oi.T @ Vb)
        cum = (core**2).cumsum(0).cumsum(1)
        captured += torch.diagonal(cum).numpy()
    return np.diff(np.concatenate([[0.0], captured]))


def refine(stack: ModuleStack, rank: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bases ``U`` [out, rank], ``V`` [in, rank] after ``iterations`` alternating updates (HOOI).

    Each update is the exact maximiser of the captured energy given the other side, so the energy never
    drops; with ``rank == r_max`` and equal spans it cannot change anything and is skipped.
    """
    Uc, Vc = stack.Uc[:, :rank], stack.Vc[:, :rank]
    full = rank >= stack.Qb.shape[1] and rank >= stack.Qa.shape[1]
    for _ in range(0 if full else iterations):
        MU = sum(((w * s) ** 2) * Z @ Z.T for Z, s, w in
                 ((Pi @ (Oi.T @ Vc), s, w) for Pi, Oi, s, w in zip(stack.Pb, stack.Pa, stack.scales, stack.weights)))
        Uc = _top_eigvecs(MU, rank)
        MV = sum(((w * s) ** 2) * Y @ Y.T for Y, s, w in
                 ((Oi @ (Pi.T @ Uc), s, w) for Pi, Oi, s, w in zip(stack.Pb, stack.Pa, stack.scales, stack.weights)))
        Vc = _top_eigvecs(MV, rank)
    return stack.Qb @ Uc, stack.Qa @ Vc


def project(module: LoraModule, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The least-squares core ``Uᵀ (s·B·A) V = s·(UᵀB)(AV)`` [R, R] for orthonormal ``U``, ``V`` (float64)."""
    B, A = module.B.detach().to(_WORK), module.A.detach().to(_WORK)
    return float(module.scale) * (U.to(_WORK).T @ B) @ (A @ V.to(_WORK))


def delta_energy(module: LoraModule) -> float:
    """``‖s·B·A‖²_F`` through the r×r Grams."""
    B, A = module.B.detach().to(_WORK), module.A.detach().to(_WORK)
    return float(module.scale) ** 2 * float(((B.T @ B) * (A @ A.T)).sum())
