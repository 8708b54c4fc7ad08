"""The student: where it starts (the SVD-ordered checkpoint) and how the result is read out."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from loracompress.calibration.methods.base import CalibContext
from loracompress.core.adapter import ORDER_KEY, Adapter, LoraModule
from loracompress.core.linalg import lowrank_svd
from loracompress.cuts.svd import truncated_adapter
from loracompress.runtime.layers import LoraLayer


def svd_student(adapter: Adapter) -> Adapter:
    """The adapter at full rank, each module in SVD order with its scale folded (the student's start).

    Through the ``r×r`` cores, one module at a time: no float64 ``U``/``V`` of every module at once.
    """
    return truncated_adapter(adapter, None, {p: m.rank for p, m in adapter.modules.items()})


def extract(layers: Mapping[str, LoraLayer], ranks: Mapping[str, int], teacher: Adapter, ctx: CalibContext,
             metadata: Mapping[str, str]) -> Adapter:
    """Keep each module's first ``ranks[p]`` active components, scale folded.

    They are re-factorised in SVD order (balanced factors), so the output truncates well again,
    unless the method declares its own component order in ``metadata`` (e.g. DyLoRA's nested one).
    """
    reorder = ORDER_KEY not in metadata
    spent = 0
    modules: dict[str, LoraModule] = {}
    for path, layer in layers.items():
        k = int(ranks.get(path, 0))
        if k <= 0:
            continue
        kept = layer.to_module(apply_mask=True)
        if kept.rank < k:
            raise RuntimeError(f"method asked for rank {k} in {path} but only {kept.rank} components are active")
        if reorder:
            A, B = lowrank_svd(kept.B[:, :k], kept.A[:k], kept.scale).factors(k, torch.float32)
        else:
            root = math.sqrt(abs(kept.scale))
            A, B = kept.A[:k] * root, kept.B[:, :k] * (root * math.copysign(1.0, kept.scale))
        modules[path] = LoraModule(A=A.contiguous(), B=B.contiguous(), scale=1.0)
        spent += k * ctx.cost(path)
    if spent > ctx.target_params:
        raise RuntimeError(f"method exceeded the budget: {spent} > {ctx.target_params} parameters")
    return teacher.replace(modules, metadata={**teacher.metadata, ORDER_KEY: "svd", **metadata})
