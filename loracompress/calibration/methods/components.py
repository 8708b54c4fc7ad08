"""Per-component maths shared by the methods: energies, magnitudes, keeping, dropping, reordering.

Rank component ``i`` of a layer is the triplet ``(B[:, i], mask[i], A[i, :])``. Everything a method
does to components one at a time lives here, so no method imports another.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loracompress.core.linalg import component_energies
from loracompress.runtime.layers import LoraLayer


def live_layers(layers: Mapping[str, LoraLayer]) -> tuple[dict[str, LoraLayer], dict[str, int]]:
    """The layers that have components (a module the student dropped has none), and one component's cost in each."""
    live = {p: layer for p, layer in layers.items() if layer.rank > 0}
    return live, {p: int(layer.A.shape[1] + layer.B.shape[0]) for p, layer in live.items()}


def component_energy(layer: LoraLayer) -> torch.Tensor:
    """``(s·‖A_i‖·‖B_i‖)²`` per component: ``σ_i²`` when the layer holds balanced SVD factors."""
    with torch.no_grad():
        return component_energies(layer.A.detach(), layer.B.detach(), layer.scale).cpu()


def add_orthogonality_grad(layers: Mapping[str, LoraLayer], weight: float) -> float:
    """Add ``weight · ∇R`` to the gradients of ``A`` and ``B``; returns ``R``.

    ``R = Σ ‖C_A − I‖² + ‖C_B − I‖²`` over each layer's active components, where ``C_A`` is the
    cosine-similarity matrix of ``A``'s rows and ``C_B`` of ``B``'s columns. AdaLoRA regularises
    ``‖PᵀP − I‖²``; our factors carry ``√σ`` on each side (``AAᵀ = diag(σ)``), so we ask for
    orthogonal, not orthonormal, components: the magnitudes stay free. Orthogonal components can
    be pruned one at a time without disturbing the rest.
    """
    total = 0.0
    if weight <= 0:
        return total
    for layer in layers.values():
        active = torch.nonzero(layer.mask != 0).flatten()
        if active.numel() < 2 or layer.A.grad is None or layer.B.grad is None:
            continue
        for factor, rows in ((layer.A, True), (layer.B, False)):
            with torch.enable_grad():
                x = (factor.detach()[active] if rows else factor.detach()[:, active].T).clone().requires_grad_(True)
                unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
                gram = unit @ unit.T
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                reg = ((gram - eye) ** 2).sum()
                (grad,) = torch.autograd.grad(reg, x)
            total += float(reg.detach())
            with torch.no_grad():
                if rows:
                    factor.grad[active] += weight * grad.to(factor.grad.dtype)
                else:
                    factor.grad[:, active] += weight * grad.T.to(factor.grad.dtype)
    return total


# --------------------------------------------------------------------------- component bookkeeping


@torch.no_grad()
def keep_leading(layer: LoraLayer, rank: int) -> None:
    """Make the first ``rank`` components the output (mask 1) and drop the rest (mask 0).

    A fractional mask value on a kept component (one still ramping in) is folded into ``A``
    first, so the layer computes the same function and the mask is exactly 0/1.
    """
    m = layer.mask
    head = m[:rank]
    layer.A[:rank] *= head[:, None].to(layer.A.dtype)
    m[:rank] = 1
    m[rank:] = 0


@torch.no_grad()
def move_to_front(layer: LoraLayer, keep: torch.Tensor) -> torch.Tensor:
    """Reorder ``layer``'s components so those in ``keep`` (in their current order) come first.

    Returns the permutation applied (new position -> old index). The function the layer computes
    is unchanged; only the order of its components (rows of ``A``, columns of ``B``, mask) moves.
    """
    r = layer.rank
    flags = torch.zeros(r, dtype=torch.bool)
    flags[keep.cpu()] = True
    idx = torch.arange(r)
    perm = torch.cat([idx[flags], idx[~flags]]).to(layer.A.device)
    layer.A.copy_(layer.A[perm])
    layer.B.copy_(layer.B[:, perm])
    layer.mask.copy_(layer.mask[perm])
    return perm


def component_magnitude(layer: LoraLayer, kind: str = "norm") -> torch.Tensor:
    """Per-component magnitude of ``scale·B[:, i]·A[i, :]``, squared (an energy, like ``σ²``)."""
    A, B = layer.A.detach().float(), layer.B.detach().float()
    if kind == "products":
        mag = B.abs().sum(0) * A.abs().sum(1)
    else:
        mag = B.norm(dim=0) * A.norm(dim=1)
    return (mag * abs(layer.scale)) ** 2


def keep_components(layer: LoraLayer, keep: torch.Tensor) -> None:
    """Mask (and zero) every component of ``layer`` not in the boolean ``keep``."""
    with torch.no_grad():
        drop = ~keep.to(layer.mask.device)
        layer.mask[drop] = 0.0
        layer.A[drop] = 0.0
        layer.B[:, drop] = 0.0
