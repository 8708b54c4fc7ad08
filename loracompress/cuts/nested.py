"""The nested (DyLoRA-order) cut: keep each module's leading components under a global budget.

A DyLoRA-trained adapter (``loracompress.order = dylora`` in its safetensors metadata) is *nested*:
each module's leading components were trained to work on their own, so a cut keeps them as they are
(never re-factorised, which would mix them and lose the order), as many per module as
:func:`loracompress.core.budget.allocate` gives it over the per-component values recorded at
training time. An adapter without that order is cut in SVD order instead (:mod:`loracompress.cuts.svd`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loracompress.core import jsonio
from loracompress.core.adapter import (
    NESTED_ORDER,
    NESTED_RANGE_KEY,
    NESTED_VALUES_KEY,
    ORDER_KEY,
    Adapter,
    LoraModule,
)
from loracompress.core.budget import Budget, allocate
from loracompress.core.linalg import component_energies
from loracompress.cuts.svd import compress_svd

log = logging.getLogger(__name__)


@dataclass
class Cut:
    """One truncation of an adapter."""

    adapter: Adapter
    ranks: dict[str, int]
    target_params: int
    order: str  # "dylora" (leading components kept) or "svd" (the training-free cut)
    retained_energy: dict[str, float] | None = None
    total_retained_energy: float | None = None
    notes: list[str] = field(default_factory=list)


def is_dylora(adapter: Adapter) -> bool:
    return adapter.metadata.get(ORDER_KEY) == NESTED_ORDER


def dylora_values(adapter: Adapter) -> dict[str, np.ndarray]:
    """The per-component values recorded at training time, or each component's energy when missing.

    Recorded values that do not match the adapter's ranks (a file edited by hand) are not trusted.
    """
    raw = adapter.metadata.get(NESTED_VALUES_KEY)
    recorded: dict[str, Any] = {}
    if raw:
        try:
            recorded = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; using the components' own energies", NESTED_VALUES_KEY)
    values = {}
    for path, m in adapter.modules.items():
        v = recorded.get(path) if isinstance(recorded, dict) else None
        if isinstance(v, list) and len(v) == m.rank and all(isinstance(x, (int, float)) for x in v):
            values[path] = np.asarray(v, dtype=np.float64)
        else:
            if raw:
                log.warning("no recorded values for %s; using its components' energies", path)
            values[path] = component_energies(m.A, m.B, m.scale).numpy()
    return values


def truncate_adapter(adapter: Adapter, budget: Budget, itemsize: int | None = None,
                     dtype: torch.dtype | None = None) -> Cut:
    """Cut ``adapter`` to ``budget``: leading components if DyLoRA-ordered, else the SVD cut.

    A fractional budget is of the original adapter when ``adapter`` records its parameter count
    (:attr:`~loracompress.core.adapter.Adapter.original_params`, written by every compressing command),
    else of ``adapter`` itself: a DyLoRA output trained at 1/4 cuts to 1/32 *of the original* at
    ``0.03125``.
    """
    itemsize = itemsize or torch.empty(0, dtype=adapter.dtype).element_size()
    costs = {p: m.cost for p, m in adapter.modules.items()}
    target = budget.resolve(list(costs.values()), [m.rank for m in adapter.modules.values()], itemsize,
                            reference=adapter.original_params)
    if not is_dylora(adapter):
        order = adapter.metadata.get(ORDER_KEY, "none recorded")
        log.warning("the adapter is not DyLoRA-ordered (%s = %s): cutting it in SVD order instead, the "
                    "training-free svd cut", ORDER_KEY, order)
        result = compress_svd(adapter, Budget("params", target, budget.text), itemsize=itemsize, dtype=dtype)
        return Cut(result.adapter, result.ranks_after, target, "svd", result.retained_energy,
                   result.total_retained_energy)
    values = dylora_values(adapter)
    ranks = allocate(values, costs, target)
    modules = {
        p: LoraModule(A=m.A[:ranks[p]].clone(), B=m.B[:, :ranks[p]].clone(), scale=m.scale)
        for p, m in adapter.modules.items() if ranks[p] > 0
    }
    metadata = {**adapter.metadata, NESTED_VALUES_KEY: jsonio.dumps(
        {p: [float(x) for x in values[p][:ranks[p]]] for p in modules}, separators=(",", ":"))}
    notes = []
    trained = _trained_range(adapter)
    if trained is not None and target < trained[0]:
        notes.append(f"below the smallest budget trained ({trained[0]} parameters); quality is not guaranteed")
        log.warning("budget %s (%d parameters) is below the smallest cut DyLoRA trained (%d parameters)",
                    budget.text, target, trained[0])
    return Cut(adapter.replace(modules, metadata=metadata), {p: ranks[p] for p in adapter.modules}, target,
               "dylora", notes=notes)


def _trained_range(adapter: Adapter) -> tuple[int, int] | None:
    try:
        r = json.loads(adapter.metadata.get(NESTED_RANGE_KEY, ""))
        return int(r["min_params"]), int(r["max_params"])
    except (ValueError, KeyError, TypeError):
        return None
