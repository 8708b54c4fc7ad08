"""Exact, cheap linear algebra on low-rank products ``B @ A``.

The SVD of ``ΔW = s·B@A`` (``B: [out, r]``, ``A: [r, in]``) is computed through orthogonal-
triangular factorisations of ``B`` and ``Aᵀ``: ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``, so
``ΔW = s·Q_b (R_b R_aᵀ) Q_aᵀ`` and only the ``r×r`` core needs an SVD. ``R`` comes from the
eigen-decomposition of the ``r×r`` Gram matrix (``BᵀB = R_bᵀR_b``), which costs two matrix
products of ``O((in+out)·r²)``; ``Q`` is never formed unless asked for. The dense ``out×in``
delta is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# float64 keeps the factorisation exact to ~1e-12 relative; the tensors are at most [d, r]
# with small r, so the cost of double precision is negligible next to file I/O.
_WORK_DTYPE = torch.float64


@dataclass
class LowRankSVD:
    """``ΔW = U @ diag(S) @ Vh`` with ``U: [out, r]``, ``S: [r]`` (descending), ``Vh: [r, in]``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def energy(self) -> torch.Tensor:
        """Squared singular values: the Frobenius energy each component carries."""
        return self.S**2

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced factors ``(A [rank, in], B [out, rank])`` of the best rank-``rank`` approximation.

        The singular values are split evenly (``√S`` on each side) so both factors have the same
        scale: better conditioned for fine-tuning and for fp16 storage than putting ``S`` on one side.
        """
        root = self.S[:rank].sqrt()
        A = root[:, None] * self.Vh[:rank]
        B = self.U[:, :rank] * root[None, :]
        return A.to(dtype).contiguous(), B.to(dtype).contiguous()


@dataclass
class LowRankCore:
    """The ``r×r`` part of the SVD of ``s·B@A``: ``U = B @ left``, ``Vᵀ = rightᵀ @ A``, ``S``.

    Holding only these small matrices (not ``U``/``V``) lets a whole 7B-sized adapter be
    analysed first and factorised later, one module at a time.
    """

    left: torch.Tensor  # [r, k]
    S: torch.Tensor  # [k]
    right: torch.Tensor  # [r, k]

    def factors(self, B: torch.Tensor, A: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced factors of the best rank-``rank`` approximation (see :meth:`LowRankSVD.factors`)."""
        root = self.S[:rank].sqrt()
        wd = _gemm_dtype(B)
        Bk = B.to(wd) @ (self.left[:, :rank] * root[None, :]).to(wd)
        Ak = (self.right[:, :rank] * root[None, :]).T.to(wd) @ A.to(wd)
        return Ak.to(dtype).contiguous(), Bk.to(dtype).contiguous()


def _gemm_dtype(t: torch.Tensor) -> torch.dtype:
    # 16-bit factors carry ~1e-3 relative precision: float32 products are far below that and
    # twice as fast as float64. Full-precision inputs keep float64.
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else _WORK_DTYPE


def _half_factor(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a Gram matrix ``G = XᵀX``: ``R = Λ^{1/2} Vᵀ`` (so ``X = Q R``) and ``Q``'s map ``V Λ^{-1/2}``.

    Directions with (numerically) zero energy get a zero map instead of a huge one.
    """
    lam, V = torch.linalg.eigh(G)
    lam = lam.clamp_min(0)
    keep = lam > lam.max().clamp_min(1e-300) * (G.shape[0] * 1e-12 if G.dtype == _WORK_DTYPE else G.shape[0] * 1e-6)
    root = lam.sqrt()
    inv = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    return root[:, None] * V.T, V * inv[None, :]


def lowrank_core(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> LowRankCore:
    """The SVD of ``scale · B @ A`` through the ``r×r`` Gram matrices of both factors.

    ``BᵀB`` and ``AAᵀ`` cost ``O((in+out)·r²)`` as plain matrix products (faster than QR at the
    same order); their eigen-decompositions give ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a``, and the
    SVD of ``s·R_b R_aᵀ`` gives the singular values and the maps to ``U`` and ``V``.
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"expected B [out, r] and A [r, in], got {tuple(B.shape)} and {tuple(A.shape)}")
    r = A.shape[0]
    if r == 0:
        z = torch.zeros(0, 0, dtype=_WORK_DTYPE)
        return LowRankCore(z, torch.zeros(0, dtype=_WORK_DTYPE), z)
    wd = _gemm_dtype(B)
    Bw, Aw = B.detach().to(wd), A.detach().to(wd)
    Rb, Mb = _half_factor((Bw.T @ Bw).to(_WORK_DTYPE))
    Ra, Ma = _half_factor((Aw @ Aw.T).to(_WORK_DTYPE))
    Uc, S, Vhc = torch.linalg.svd((Rb @ Ra.T) * float(scale), full_matrices=False)
    return LowRankCore(left=Mb @ Uc, S=S, right=Ma @ Vhc.T)


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> LowRankSVD:
    """SVD of ``scale · B @ A`` with explicit ``U`` and ``Vᵀ`` (see :func:`lowrank_core`)."""
    core = lowrank_core(B, A, scale)
    if core.S.numel() == 0:
        return LowRankSVD(torch.zeros(B.shape[0], 0, dtype=_WORK_DTYPE), core.S, torch.zeros(0, A.shape[1], dtype=_WORK_DTYPE))
    U = B.detach().to(_WORK_DTYPE) @ core.left
    Vh = core.right.T @ A.detach().to(_WORK_DTYPE)
    return LowRankSVD(U, core.S, Vh)


def singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of ``scale · B @ A`` (float64)."""
    return lowrank_core(B, A, scale).S


def effective_rank(energy: torch.Tensor, fraction: float) -> int:
    """Smallest ``k`` whose top-``k`` components hold at least ``fraction`` of the total energy."""
    total = float(energy.sum())
    if total <= 0.0 or energy.numel() == 0:
        return 0
    cum = torch.cumsum(energy, 0) / total
    # small tolerance so that fraction=1.0 is met despite rounding in cumsum
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype)).item()) + 1


def component_energies(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``(s·‖A_i‖·‖B_i‖)²`` per component, in float64: ``σ_i²`` when ``A``/``B`` are balanced SVD factors."""
    a = A.double().norm(dim=1)
    b = B.double().norm(dim=0)
    return (a * b * scale) ** 2
