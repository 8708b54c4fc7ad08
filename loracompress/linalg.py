"""Exact, cheap linear algebra on low-rank products ``B @ A``.

The SVD of ``ΔW = s·B@A`` (``B: [out, r]``, ``A: [r, in]``) is computed through thin QR
factorisations of ``B`` and ``Aᵀ``: ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``, so
``ΔW = s·Q_b (R_b R_aᵀ) Q_aᵀ`` and only the ``r×r`` core needs an SVD. The cost is
``O((in+out)·r²)``; the dense ``out×in`` delta is never formed.
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


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> LowRankSVD:
    """SVD of ``scale · B @ A`` via QR of both factors, in float64."""
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"expected B [out, r] and A [r, in], got {tuple(B.shape)} and {tuple(A.shape)}")
    r = A.shape[0]
    if r == 0:
        out, inp = B.shape[0], A.shape[1]
        z = torch.zeros(0, dtype=_WORK_DTYPE)
        return LowRankSVD(torch.zeros(out, 0, dtype=_WORK_DTYPE), z, torch.zeros(0, inp, dtype=_WORK_DTYPE))
    Bw = B.detach().to(_WORK_DTYPE)
    Aw = A.detach().to(_WORK_DTYPE)
    Qb, Rb = torch.linalg.qr(Bw, mode="reduced")  # [out, k], [k, r]
    Qa, Ra = torch.linalg.qr(Aw.T, mode="reduced")  # [in, k'], [k', r]
    core = (Rb @ Ra.T) * float(scale)
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    return LowRankSVD(Qb @ Uc, S, Vhc @ Qa.T)


def singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of ``scale · B @ A`` only: R factors of the two QRs, no Q, no U/V (float64)."""
    if A.shape[0] == 0:
        return torch.zeros(0, dtype=_WORK_DTYPE)
    Rb = torch.linalg.qr(B.detach().to(_WORK_DTYPE), mode="r").R
    Ra = torch.linalg.qr(A.detach().T.to(_WORK_DTYPE), mode="r").R
    return torch.linalg.svdvals((Rb @ Ra.T) * float(scale))


def effective_rank(energy: torch.Tensor, fraction: float) -> int:
    """Smallest ``k`` whose top-``k`` components hold at least ``fraction`` of the total energy."""
    total = float(energy.sum())
    if total <= 0.0 or energy.numel() == 0:
        return 0
    cum = torch.cumsum(energy, 0) / total
    # small tolerance so that fraction=1.0 is met despite rounding in cumsum
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype)).item()) + 1


def orthonormalize_rows(A: torch.Tensor) -> torch.Tensor:
    """Rows of ``A`` made orthonormal (QR), keeping their span: used to re-orthogonalise after training."""
    Q, _ = torch.linalg.qr(A.T.to(_WORK_DTYPE), mode="reduced")
    return Q.T.to(A.dtype)
