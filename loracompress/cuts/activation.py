"""The activation-aware cut: truncate each module so its *output* error on the user's inputs is minimal.

The weight-space cut keeps the top singular components of ``ΔW``, which minimises
``‖ΔW − ΔW'‖_F``: it treats every input direction alike. What matters is the error on the
inputs the layer actually sees, ``E‖(ΔW − ΔW')x‖² = ‖(ΔW − ΔW')L‖_F²`` with ``Σ = E[xxᵀ] = LLᵀ``.
Its minimiser over rank-``k`` matrices is ``ΔW' = U_k U_kᵀ ΔW``, where ``U_k`` are the top-``k``
left singular vectors of the whitened delta ``ΔW·L`` (whose singular values ``σ`` give the
output error each component removes, ``σ²``).

The global allocation compares components of different modules by ``σ²`` divided by the
module's mean input energy per feature, ``E‖x‖²/in``: the output error relative to the scale of
what the module reads. Raw ``σ²`` would favour modules whose inputs are large (an MLP down
projection after its activation) over modules reading a normalised residual stream, whatever
either does to the result. With isotropic inputs (``Σ = c·I``) the relative values are exactly the
weight-space ``σ²``, so this cut departs from the plain one only where the inputs are not
isotropic. Measured on both benchmark tasks at 1/8, 1/16 and 1/32 of the parameters, the relative
values lowered the held-out KL in all six cells against raw ``σ²`` (by 26% on geometric mean).

Computed without any ``in×in`` matrix: ``ΔW·L = s·B·(A·L)`` and ``(AL)(AL)ᵀ = AΣAᵀ``, so the
left singular vectors and values of ``ΔW·L`` are those of ``s·B·G^{1/2}`` with the ``r×r`` Gram
``G = E[(Ax)(Ax)ᵀ]``, collected by forward hooks at the cost of one extra ``A·x``. Damping adds
``λ·mean(diag Σ)·I`` to ``Σ`` (``λ·E‖x‖²/in · AAᵀ`` to ``G``), which pulls directions the data
hardly excites back towards the weight-space cut. The kept factors are ``B' = U_k√S_k`` and
``A' = S_k^{-1/2} U_kᵀ ΔW`` (equal to ``√S Vᵀ L⁻¹`` when ``L`` is invertible, but needing no
triangular solve and no invertible ``Σ``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loracompress.core.adapter import Adapter
from loracompress.core.budget import Budget
from loracompress.core.linalg import LowRankSVD, lowrank_svd
from loracompress.cuts.svd import Selector, SvdResult, compress_svd
from loracompress.runtime.data import model_inputs
from loracompress.runtime.layers import LoraLayer, attach, detach

log = logging.getLogger(__name__)

DEFAULT_DAMPING = 0.01
_W = torch.float64  # accumulate and factorise in double precision


@dataclass
class InputMoments:
    """Per module: ``G = E[(Ax)(Ax)ᵀ]`` (``r×r``), ``E‖x‖²`` and the number of tokens seen."""

    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    sq_norm: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


def collect_moments(
    model: nn.Module, layers: dict[str, LoraLayer], batches: Sequence[dict[str, torch.Tensor]]
) -> InputMoments:
    """Run ``batches`` through ``model`` (layers as they are: the original adapter active) and
    accumulate each layer's input statistics in its own ``A`` basis, skipping padded tokens."""
    sums: dict[str, torch.Tensor] = {}
    sq: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {p: 0 for p in layers}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(path: str, layer: LoraLayer) -> Any:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            mask = state["mask"]
            if mask is not None and x.shape[:-1] == mask.shape:
                x = x[mask]  # real tokens only
            x = x.reshape(-1, x.shape[-1]).to(layer.A.dtype)
            h = (x @ layer.A.detach().T).to(_W)
            g = h.T @ h
            s = x.to(_W).pow(2).sum()
            if path in sums:
                sums[path] += g
                sq[path] += s
            else:
                sums[path], sq[path] = g, s
            count[path] += int(x.shape[0])
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(p, layer)) for p, layer in layers.items()]
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = model_inputs(batch, dev)
                mask = inputs.get("attention_mask")
                state["mask"] = mask.bool() if mask is not None else None
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = InputMoments()
    for p in layers:
        n = count[p]
        if n:
            out.gram[p] = (sums[p] / n).cpu()
            out.sq_norm[p] = float(sq[p]) / n
        out.tokens[p] = n
    return out


def _sqrt_psd(G: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix (negative rounding clipped)."""
    w, V = torch.linalg.eigh((G + G.T) / 2)
    return (V * w.clamp_min(0).sqrt()) @ V.T


def whitened_svds(
    adapter: Adapter, moments: InputMoments, damping: float = DEFAULT_DAMPING
) -> dict[str, LowRankSVD]:
    """Per module, a :class:`LowRankSVD` whose ``S`` are output-space singular values and whose
    ``factors(k)`` give the output-optimal rank-``k`` factors (see the module docstring).

    Modules the data never reached fall back to the weight-space SVD, with values scaled to zero
    so the allocation spends budget on them last.
    """
    if damping < 0:
        raise ValueError("damping must be >= 0")
    out: dict[str, LowRankSVD] = {}
    for path, m in adapter.modules.items():
        A, B = m.A.detach().to(_W), m.B.detach().to(_W)
        if m.rank == 0 or moments.tokens.get(path, 0) == 0:
            ws = lowrank_svd(m.B, m.A, m.scale)
            if m.rank:
                log.warning("%s saw no calibration tokens; its cut is weight-space and it is kept last", path)
                root = ws.S.sqrt()
                ws = _FixedFactors(ws.U * root, torch.zeros_like(ws.S), root[:, None] * ws.Vh)
            out[path] = ws
            continue
        G = moments.gram[path].to(_W)
        if damping:
            G = G + damping * (moments.sq_norm[path] / m.in_features) * (A @ A.T)
        core = lowrank_svd(B, _sqrt_psd(G), m.scale)  # left vectors/values of s·B·A·L
        U, S = core.U, core.S
        # A' rows: U_kᵀ ΔW / σ_k. Components with (numerically) no output energy carry nothing on
        # this data; their rows are zeroed rather than divided by ~0.
        proj = (U.T @ B) @ A * m.scale  # [r, in] = Uᵀ ΔW
        tiny = S <= S.max().clamp_min(1e-300) * 1e-9
        S = torch.where(tiny, torch.zeros_like(S), S)
        Vh = torch.where(tiny[:, None], torch.zeros_like(proj), proj / S.clamp_min(1e-300)[:, None])
        out[path] = LowRankSVD(U, S, Vh)
    return out


@dataclass
class _FixedFactors(LowRankSVD):
    """Factors given directly (``U`` and ``Vh`` already carry the scale); ``S`` is only the value."""

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return self.Vh[:rank].to(dtype).contiguous(), self.U[:, :rank].to(dtype).contiguous()


def activation_aware_svd(
    base: Any,
    adapter: Adapter,
    batches: Sequence[dict[str, torch.Tensor]],
    budget: Budget | None,
    *,
    damping: float = DEFAULT_DAMPING,
    select: Selector | None = None,
    min_rank: int = 0,
    max_rank: int | None = None,
    itemsize: int | None = None,
    dtype: torch.dtype | None = None,
) -> SvdResult:
    """Compress ``adapter`` to ``budget`` by the activation-aware cut on ``batches``.

    ``base`` is a :class:`~loracompress.runtime.model.BaseModel` (or a bare model) the adapter fits. The
    adapter is attached for the statistics pass and detached afterwards.
    """
    model = base.model if hasattr(base, "model") else base
    layers = attach(model, adapter)
    try:
        moments = collect_moments(model, layers, batches)
    finally:
        detach(model)
    svds = whitened_svds(adapter, moments, damping)
    return compress_svd(adapter, budget, select=select, min_rank=min_rank, max_rank=max_rank,
                        values=allocation_values(adapter, svds, moments), itemsize=itemsize, svds=svds, dtype=dtype)


def allocation_values(
    adapter: Adapter, svds: dict[str, LowRankSVD], moments: InputMoments
) -> dict[str, torch.Tensor]:
    """Per module, the output-space ``σ²`` divided by the mean input energy per feature ``E‖x‖²/in``
    (see the module docstring); modules that saw no tokens keep their values (zero: kept last)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in adapter.modules.items():
        energy = svds[path].S.to(_W) ** 2
        per_feature = moments.sq_norm.get(path, 0.0) / max(m.in_features, 1)
        out[path] = energy / per_feature if moments.tokens.get(path, 0) and per_feature > 0 else energy
    return out
