"""Training-free compression: exact SVD of each module, one global allocation under the budget.

Each module's ``ΔW = s·B@A`` is factorised exactly (:func:`loracompress.core.linalg.lowrank_svd`);
components are then kept across the whole adapter by ``σ² / (in + out)`` until the budget is
met (:func:`loracompress.core.budget.allocate`). Per-module selectors, as kohya's ``resize_lora``
users know them, can cap each module's rank first:

- ``energy:F`` keeps the smallest rank whose components hold at least fraction ``F`` of the
  module's squared Frobenius norm (``Σσ²``), e.g. ``energy:0.95``.
- ``fro:F`` keeps the smallest rank whose approximation has Frobenius norm at least ``F`` times
  the module's (``sqrt(Σ_kept σ²) / sqrt(Σσ²) ≥ F``); ``fro:0.9`` equals ``energy:0.81``.
- ``ratio:R`` keeps every component with ``σ_i ≥ σ_max / R``, e.g. ``ratio:10``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from loracompress.core.adapter import Adapter, LoraModule
from loracompress.core.budget import Budget, allocate
from loracompress.core.dtypes import output_dtype
from loracompress.core.linalg import LowRankCore, LowRankSVD, effective_rank, lowrank_core, lowrank_svd
from loracompress.core.validate import require_int, require_type
from loracompress.errors import LoraCompressError


@dataclass(frozen=True)
class Selector:
    """A per-module rank rule: ``energy:0.95``, ``fro:0.9`` or ``ratio:10``."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Selector:
        kind, _, num = text.partition(":")
        kind = kind.strip().lower()
        try:
            value = float(num)
        except ValueError:
            value = float("nan")
        if kind in ("energy", "fro") and 0 < value <= 1:
            return cls(kind, value)
        if kind == "ratio" and value >= 1:
            return cls(kind, value)
        raise LoraCompressError(
            f"cannot parse --select {text!r}: use energy:F or fro:F with F in (0, 1], or ratio:R with R >= 1"
        )

    def rank(self, sigma: torch.Tensor) -> int:
        """The rank this rule keeps for singular values ``sigma`` (descending)."""
        if sigma.numel() == 0:
            return 0
        if self.kind == "energy":
            return effective_rank(sigma**2, self.value)
        if self.kind == "fro":
            return effective_rank(sigma**2, self.value**2)
        return int((sigma >= sigma[0] / self.value).sum())


@dataclass
class SvdResult:
    """The compressed adapter and what the report needs to say about it."""

    adapter: Adapter
    ranks_before: dict[str, int]
    ranks_after: dict[str, int]
    retained_energy: dict[str, float] = field(default_factory=dict)
    target_params: int | None = None
    #: fraction of the adapter's total ``Σσ²`` that the kept components hold
    total_retained_energy: float = 1.0


def decompose(adapter: Adapter) -> dict[str, LowRankSVD]:
    """The exact SVD of every module's delta."""
    return {path: lowrank_svd(m.B, m.A, m.scale) for path, m in adapter.modules.items()}


def truncated_adapter(
    adapter: Adapter,
    svds: Mapping[str, LowRankSVD | LowRankCore] | None,
    ranks: Mapping[str, int],
    dtype: torch.dtype = torch.float32,
) -> Adapter:
    """Modules rebuilt from their top-``rank`` components, scale 1 (folded). Rank-0 modules are dropped.

    With :class:`LowRankCore` entries (or none) each module's factors are formed here, one at a
    time, so peak memory stays near the input plus the output.
    """
    modules: dict[str, LoraModule] = {}
    for path, m in adapter.modules.items():
        k = ranks.get(path, 0)
        if k <= 0:
            continue
        svd = svds[path] if svds is not None else lowrank_core(m.B, m.A, m.scale)
        if isinstance(svd, LowRankCore):
            A, B = svd.factors(m.B, m.A, k, dtype)
        else:
            A, B = svd.factors(k, dtype)
        modules[path] = LoraModule(A=A, B=B, scale=1.0)
    return adapter.replace(modules, metadata={**adapter.metadata, "loracompress.order": "svd"})


def compress_svd(
    adapter: Adapter,
    budget: Budget | str | float | None,
    *,
    select: Selector | str | None = None,
    min_rank: int = 0,
    max_rank: int | None = None,
    values: Mapping[str, torch.Tensor] | None = None,
    itemsize: int | None = None,
    svds: Mapping[str, LowRankSVD] | None = None,
    dtype: torch.dtype | None = None,
) -> SvdResult:
    """Compress ``adapter`` to ``budget`` parameters by a global SVD allocation.

    Args:
        budget: the parameter budget, or its text as ``--budget`` takes it (``None`` with a selector: the
            selector alone decides).
        select: per-module rank caps (see module docstring), or their text as ``--select`` takes it.
        min_rank / max_rank: bounds on every module's rank, at least 0 and 1 (as ``--min-rank``/``--max-rank``).
        values: per-module component values to allocate by, in the order of ``svds``; default
            ``σ²`` (weight space). The activation-aware cut passes output-space ``σ²`` here.
        itemsize: bytes per parameter for byte budgets (default: the adapter's dtype).
        svds: precomputed factorisations (default: the ``r×r`` cores of every module, then the
            kept factors formed one module at a time; nothing of size ``[d, r]`` is held in float64).
        dtype: dtype of the output factors (default: the adapter's).
    """
    require_type("compress_svd(adapter)", adapter, Adapter, "an Adapter (from load_adapter)")
    if budget is not None and not isinstance(budget, Budget):
        budget = Budget.parse(budget)
    if select is not None and not isinstance(select, Selector):
        require_type("compress_svd(select)", select, str, "a Selector or its text (energy:0.9)")
        select = Selector.parse(select)
    require_int("min_rank", min_rank, 0)
    if max_rank is not None:
        require_int("max_rank", max_rank, 1)  # 0 would cut every module: an empty adapter
    if itemsize is not None:
        require_int("itemsize", itemsize, 1)
    dtype = output_dtype(dtype)
    if budget is None and select is None:
        raise LoraCompressError("nothing to do: give --budget, --select, or both")
    paths = list(adapter.modules)
    if svds is None:  # only the r×r cores are kept for the whole adapter
        svds = {p: lowrank_core(m.B, m.A, m.scale) for p, m in adapter.modules.items()}
    sigma = {p: svds[p].S for p in paths}
    energy = {p: s**2 for p, s in sigma.items()}
    vals = {p: (values[p] if values is not None else energy[p]) for p in paths}
    costs = {p: adapter.modules[p].cost for p in paths}
    caps: dict[str, int] = {p: adapter.modules[p].rank for p in paths}
    if max_rank is not None:
        caps = {p: min(c, max_rank) for p, c in caps.items()}
    if select is not None:
        caps = {p: min(c, max(select.rank(sigma[p]), min_rank)) for p, c in caps.items()}
    if budget is not None:
        itemsize = itemsize or torch.empty(0, dtype=adapter.dtype).element_size()
        target = budget.resolve([costs[p] for p in paths], [adapter.modules[p].rank for p in paths], itemsize)
        ranks = allocate({p: vals[p].double().numpy() for p in paths}, costs, target, min_rank=min_rank, max_rank=caps)
    else:
        target = None
        ranks = caps
    small = truncated_adapter(adapter, svds, ranks, dtype or adapter.dtype)
    retained = {}
    kept_total = all_total = 0.0
    for p, e in energy.items():
        total = float(e.sum())
        kept = float(e[: ranks[p]].sum())
        retained[p] = kept / total if total > 0 else 1.0
        kept_total += kept
        all_total += total
    result = SvdResult(
        adapter=small,
        ranks_before={p: m.rank for p, m in adapter.modules.items()},
        ranks_after={p: ranks.get(p, 0) for p in adapter.modules},
        retained_energy=retained,
        target_params=target,
        total_retained_energy=kept_total / all_total if all_total > 0 else 1.0,
    )
    return result
