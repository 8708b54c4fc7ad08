"""Which adapters share bases: a similarity of their update subspaces, and average-linkage clusters of it.

Two adapters can share a module's bases well when their updates act on the same directions. Per
module, the similarity is the cosine between the energy operators of their column spaces,
``⟨ΔWᵢΔWᵢᵀ, ΔWⱼΔWⱼᵀ⟩ / (‖ΔWᵢΔWᵢᵀ‖‖ΔWⱼΔWⱼᵀ‖)`` (1: the same directions with the same weights; 0:
orthogonal), averaged with the same for the row spaces, then over modules. ``ΔWᵢΔWᵢᵀ = LᵢLᵢᵀ`` with
``Lᵢ = sᵢBᵢRᵢᵀ`` (``Aᵢᵀ = QᵢRᵢ``), an out×r factor, so the inner products are ``‖LᵢᵀLⱼ‖²``: one Gram
of the stacked factors per module.

The number of clusters is not chosen here: the bank builder fits every candidate at the same budget
and keeps the one with the lowest reconstruction error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from loracompress.core.adapter import LoraModule

_WORK = torch.float64


def _side_factor(outer: torch.Tensor, inner: torch.Tensor, scale: float) -> torch.Tensor:
    """``L`` with ``L Lᵀ = (s·outer·inner)(s·outer·inner)ᵀ``: ``outer`` [d, r], ``inner`` [r, e]."""
    R = torch.linalg.qr(inner.T, mode="r")[1]  # innerᵀ = Q R, so inner·innerᵀ = Rᵀ R
    return scale * outer @ R.T


def _block_cosines(factors: Sequence[torch.Tensor]) -> np.ndarray:
    bounds = np.cumsum([0] + [f.shape[1] for f in factors])
    cat = torch.cat(list(factors), dim=1)
    G = (cat.T @ cat) ** 2
    n = len(factors)
    inner = np.array([[float(G[bounds[i]:bounds[i + 1], bounds[j]:bounds[j + 1]].sum()) for j in range(n)]
                      for i in range(n)])
    norm = np.sqrt(np.clip(np.diag(inner), 0, None))
    denom = np.outer(norm, norm)
    return np.divide(inner, denom, out=np.zeros_like(inner), where=denom > 0)


def similarity(adapters: Sequence[Mapping[str, LoraModule]], modules: Sequence[str]) -> np.ndarray:
    """N×N similarities in [0, 1] (1 on the diagonal), averaged over ``modules``."""
    n = len(adapters)
    total = np.zeros((n, n))
    for path in modules:
        ms = [a[path] for a in adapters]
        left = [_side_factor(m.B.detach().to(_WORK), m.A.detach().to(_WORK), m.scale) for m in ms]
        right = [_side_factor(m.A.detach().to(_WORK).T, m.B.detach().to(_WORK).T, m.scale) for m in ms]
        total += (_block_cosines(left) + _block_cosines(right)) / 2
    return total / max(len(modules), 1)


def agglomerate(sim: np.ndarray, k: int) -> list[int]:
    """Average-linkage clusters of ``sim`` into ``k`` groups; labels numbered by each group's first member."""
    groups: list[list[int]] = [[i] for i in range(sim.shape[0])]
    while len(groups) > k:
        best, pair = -np.inf, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                link = float(sim[np.ix_(groups[a], groups[b])].mean())
                if link > best:
                    best, pair = link, (a, b)
        a, b = pair
        groups[a] = sorted(groups[a] + groups.pop(b))
    labels = [0] * sim.shape[0]
    for c, g in enumerate(sorted(groups, key=min)):
        for i in g:
            labels[i] = c
    return labels
