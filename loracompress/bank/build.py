"""Fitting a bank: clusters, ranks under the budget, bases, cores; and adding adapters to frozen bases.

``fit_bank`` tries each candidate number of clusters at the same budget and keeps the one whose bank
reconstructs the adapters best (the sum of their relative squared errors: the same number the bases
and the allocation maximise). No data is involved, so nothing can be tuned on a test set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from loracompress.bank.allocate import (
    Slot,
    allocate_bank,
    bank_cost,
    check_floor,
    resolve_target,
    smallest_rank_cost,
    uniform_ranks,
)
from loracompress.bank.cluster import agglomerate, similarity
from loracompress.bank.fit import ModuleStack, delta_energy, nested_gains, project, refine, stack_module
from loracompress.core.adapter import LoraModule
from loracompress.core.budget import Budget
from loracompress.errors import LoraCompressError

#: ``--clusters auto`` tries 1 … this many clusters (never more than there are adapters)
MAX_AUTO_CLUSTERS = 8
#: ``--clusters auto`` stops after this many candidates in a row that do no better than the best so far
AUTO_PATIENCE = 2
#: alternating refinements of the bases after the ranks are chosen (see :func:`loracompress.bank.fit.refine`)
REFINE_ITERATIONS = 3

Modules = Mapping[str, LoraModule]


@dataclass
class Bank:
    """Per cluster and module the shared bases ``(U [out, R], V [in, R])``; per adapter its cores and cluster."""

    shapes: dict[str, tuple[int, int]]  # module -> (out, in)
    clusters: list[int]
    bases: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    cores: list[dict[str, torch.Tensor]]

    def rank(self, cluster: int, module: str) -> int:
        return int(self.bases[cluster][module][0].shape[1])

    def members(self, cluster: int) -> int:
        return sum(1 for c in self.clusters if c == cluster)

    @property
    def base_params(self) -> int:
        return sum(U.numel() + V.numel() for b in self.bases for U, V in b.values())

    @property
    def core_params(self) -> int:
        return sum(c.numel() for cores in self.cores for c in cores.values())

    @property
    def num_params(self) -> int:
        return self.base_params + self.core_params

    def expand(self, index: int, dtype: torch.dtype = torch.float32) -> dict[str, LoraModule]:
        """Adapter ``index`` as plain LoRA of rank R: ``B = U``, ``A = Σᵢ Vᵀ``, scale 1 (modules of rank 0 left out)."""
        out: dict[str, LoraModule] = {}
        for path, (U, V) in self.bases[self.clusters[index]].items():
            if U.shape[1] == 0:
                continue
            core = self.cores[index][path].double()
            A = core @ V.double().T
            out[path] = LoraModule(A=A.to(dtype).contiguous(), B=U.to(dtype).contiguous(), scale=1.0)
        return out


@dataclass
class Search:
    """One candidate number of clusters: its grouping and reconstruction at the budget (None: did not fit)."""

    k: int
    labels: list[int]
    params: int | None = None
    mean_sq_error: float | None = None


@dataclass
class FitResult:
    bank: Bank
    target: int | None
    errors: list[float]
    search: list[Search] = field(default_factory=list)


def adapter_norms(adapters: Sequence[Modules]) -> list[float]:
    return [math.sqrt(sum(delta_energy(m) for m in a.values())) for a in adapters]


def _weights(norms: Sequence[float]) -> list[float]:
    # each adapter counts by its relative error; an all-zero adapter has nothing to lose
    return [1.0 / n if n > 0 else 0.0 for n in norms]


class _Stacks:
    """Per (cluster members, module) stacks and gains, shared between candidate clusterings."""

    def __init__(self, adapters: Sequence[Modules], weights: Sequence[float]) -> None:
        self.adapters, self.weights = adapters, weights
        self.cache: dict[tuple[tuple[int, ...], str], tuple[ModuleStack, np.ndarray]] = {}

    def get(self, members: tuple[int, ...], module: str) -> tuple[ModuleStack, np.ndarray]:
        key = (members, module)
        if key not in self.cache:
            stack = stack_module([self.adapters[i][module] for i in members], [self.weights[i] for i in members])
            self.cache[key] = (stack, nested_gains(stack))
        return self.cache[key]


def _groups(labels: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(i for i, c in enumerate(labels) if c == k) for k in range(max(labels) + 1)]


def _slots(stacks: _Stacks, labels: Sequence[int], shapes: Mapping[str, tuple[int, int]]) -> list[Slot]:
    return [Slot(cluster=c, module=path, in_out=sum(shapes[path]), members=len(members), gains=stacks.get(members, path)[1])
            for c, members in enumerate(_groups(labels)) for path in shapes]


def fit_bank(
    adapters: Sequence[Modules],
    budget: Budget,
    original_params: int,
    itemsize: int,
    clusters: int | None = None,
    iterations: int = REFINE_ITERATIONS,
    dtype: torch.dtype = torch.float64,
) -> FitResult:
    """Fit a bank of ``adapters`` (same modules, same shapes: checked by the caller) under ``budget``.

    ``clusters``: a fixed number, or None to choose among 1 … :data:`MAX_AUTO_CLUSTERS`, stopping after
    :data:`AUTO_PATIENCE` candidates in a row that do no better than the best (one cluster for a
    ``rank=K`` budget, whose parameter count depends on the clustering). A fraction is of ``original_params``.
    ``dtype``: the bases are rounded to the dtype they are stored in before the cores are projected onto them, so the
    stored cores are the least-squares cores of the stored bases (what adding an adapter computes).
    """
    n = len(adapters)
    if clusters is not None and not 1 <= clusters <= n:
        raise LoraCompressError(f"--clusters {clusters}: give a number from 1 to the number of adapters ({n}), or auto")
    shapes = {p: (m.out_features, m.in_features) for p, m in adapters[0].items()}
    norms = adapter_norms(adapters)
    stacks = _Stacks(adapters, _weights(norms))
    if clusters is None:
        ks = [1] if budget.kind == "rank" else list(range(1, min(n, MAX_AUTO_CLUSTERS) + 1))
    else:
        ks = [clusters]
    sim = similarity(adapters, list(shapes)) if ks != [1] else np.ones((n, n))
    target = None if budget.kind == "rank" else resolve_target(budget, original_params, itemsize)
    search: list[Search] = []
    best: tuple[float, Search, list[Slot], list[int]] | None = None
    worse = 0
    for k in ks:
        labels = agglomerate(sim, k) if k > 1 else [0] * n
        slots = _slots(stacks, labels, shapes)
        entry = Search(k=k, labels=labels)
        search.append(entry)
        if target is None:
            ranks = uniform_ranks(slots, int(budget.value))
        else:
            if smallest_rank_cost(slots) > target:
                if k == ks[0]:
                    check_floor(slots, target, budget, original_params)  # raises: not even the fewest clusters fit
                continue
            ranks = allocate_bank(slots, target)
        residual = sum(float(s.gains.sum() - s.gains[:r].sum()) for s, r in zip(slots, ranks))
        entry.params, entry.mean_sq_error = bank_cost(slots, ranks), max(residual, 0.0) / n
        if best is None or _better(entry, best[1]):
            best, worse = (entry.mean_sq_error, entry, slots, ranks), 0
        else:
            worse += 1
            if worse >= AUTO_PATIENCE:  # splitting further has stopped paying twice in a row
                break
    if best is None:  # the first candidate either fits or raised
        raise RuntimeError("no clustering was tried")
    _, chosen, slots, ranks = best
    groups = _groups(chosen.labels)
    bases: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in groups]
    for slot, r in zip(slots, ranks):
        stack, _ = stacks.get(groups[slot.cluster], slot.module)
        U, V = refine(stack, r, iterations)
        bases[slot.cluster][slot.module] = (U.to(dtype).double(), V.to(dtype).double())
    bank = Bank(shapes=shapes, clusters=list(chosen.labels), bases=bases, cores=[{} for _ in adapters])
    bank.cores = project_cores(adapters, bank.bases, bank.clusters, dtype)
    return FitResult(bank=bank, target=target, errors=relative_errors(adapters, bank, range(n)), search=search)


def _better(a: Search, b: Search) -> bool:
    """Lower error wins; equal errors (within rounding: every candidate exact at a large budget) go to fewer parameters."""
    assert a.mean_sq_error is not None and b.mean_sq_error is not None and a.params is not None and b.params is not None
    if abs(a.mean_sq_error - b.mean_sq_error) > 1e-10:
        return a.mean_sq_error < b.mean_sq_error
    return a.params < b.params


def project_cores(adapters: Sequence[Modules], bases: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
                  clusters: Sequence[int], dtype: torch.dtype = torch.float64) -> list[dict[str, torch.Tensor]]:
    """Each adapter's least-squares cores on its cluster's (frozen) bases, rounded to the ``dtype`` they are stored in."""
    return [{p: project(a[p], U, V).to(dtype).double() for p, (U, V) in bases[c].items()}
            for a, c in zip(adapters, clusters)]


def assign_clusters(adapters: Sequence[Modules], bases: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]]) -> list[int]:
    """For each adapter, the cluster whose bases capture the largest share of its update."""
    out = []
    for a in adapters:
        captured = [sum(float((project(a[p], U, V) ** 2).sum()) for p, (U, V) in b.items()) for b in bases]
        out.append(int(np.argmax(captured)))
    return out


def relative_errors(adapters: Sequence[Modules], bank: Bank, indices: Sequence[int]) -> list[float]:
    """``‖ΔW − UΣVᵀ‖ / ‖ΔW‖`` over all modules of each adapter (``adapters[j]`` is the bank's ``indices[j]``).

    ``‖ΔW‖² − 2⟨Σ, UᵀΔWV⟩ + ⟨Σ, UᵀU Σ VᵀV⟩``: exact for bases and cores as stored (rounded, not quite
    orthonormal), where the shortcut ``‖ΔW‖² − ‖Σ‖²`` would report the rounding's square root.
    """
    out = []
    for a, i in zip(adapters, indices):
        total = sum(delta_energy(m) for m in a.values())
        err = total
        for p, (U, V) in bank.bases[bank.clusters[i]].items():
            S, Uw, Vw = bank.cores[i][p].double(), U.double(), V.double()
            err += float((S * (Uw.T @ Uw @ S @ (Vw.T @ Vw) - 2 * project(a[p], Uw, Vw))).sum())
        out.append(math.sqrt(max(err, 0.0) / total) if total > 0 else 0.0)
    return out
