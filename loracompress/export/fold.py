"""Folding the exporter's ``Transpose(weight)`` nodes into transposed weights, lazily.

``nn.Linear`` exports as ``MatMul(x, Transpose(W))``. Left in the graph, onnxruntime transposes
every weight when it runs it: unoptimized, that is a second copy of each weight at run time;
optimized, a folded copy of all of them at load. The exporter's own optimizer folds them too, but
into new tensors that all stay alive until the program is gone (a second model in memory).

:func:`fold_weight_transposes` instead gives each folded weight a :class:`onnx_ir.LazyTensor`
that transposes its source only when it is written, one tensor at a time, so saving the graph
never holds more than one extra weight.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

log = logging.getLogger(__name__)


def _transposed(tensor: Any, perm: list[int]) -> Any:
    """``tensor`` permuted by ``perm``, as an onnx_ir tensor (computed now)."""
    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        from onnx_ir.tensor_adapters import TorchTensor

        return TorchTensor(raw.permute(perm).contiguous())
    return ir.Tensor(np.ascontiguousarray(tensor.numpy().transpose(perm)))


def fold_weight_transposes(model: ir.Model) -> int:
    """Replace each ``Transpose`` of a constant initializer by a lazily transposed initializer.

    Initializers that are also graph inputs (overridable LoRA factors in adapters mode) are left
    alone: their value comes from the caller at run time. Returns the number of nodes folded.
    """
    graph = model.graph
    graph_inputs = {id(v) for v in graph.inputs}
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        source = node.inputs[0]
        if source is None or source.const_value is None or id(source) in graph_inputs:
            continue
        if source.name not in graph.initializers:
            continue
        tensor = source.const_value
        rank = len(tensor.shape)
        attr = node.attributes.get("perm")
        perm = list(attr.as_ints()) if attr is not None else list(range(rank))[::-1]
        shape = ir.Shape([tensor.shape[p] for p in perm])
        out = node.outputs[0]
        if out.is_graph_output():  # a graph output must stay some node's output
            continue
        lazy = ir.LazyTensor(lambda t=tensor, p=perm: _transposed(t, p), dtype=tensor.dtype, shape=shape,
                             name=f"{source.name}.T")
        value = ir.Value(name=f"{source.name}.T", shape=shape, type=ir.TensorType(tensor.dtype), const_value=lazy)
        graph.register_initializer(value)
        ir.convenience.replace_all_uses_with(out, value)
        graph.remove(node, safe=True)
        if not source.uses():
            del graph.initializers[source.name]
        folded += 1
    log.debug("folded %d weight transposes into their initializers", folded)
    return folded
