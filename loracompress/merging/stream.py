"""The streaming merge: a safetensors base model and an adapter folded tensor by tensor.

Only the base's *structure* is built (on the meta device, no weights); the weights are read from
the shards one tensor at a time (:class:`~loracompress.merging.checkpoint.Reader`), each LoRA'd weight
gets ``ΔW`` added in float32 (:func:`~loracompress.merging.weights.add_delta`) and is cast back,
everything else is copied as it is, following the plan (:mod:`loracompress.merging.plan`). Peak memory
is one tensor (plus its fp32 copy when it is merged) plus the adapter, whatever the size of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from loracompress.core import jsonio
from loracompress.core.adapter import Adapter
from loracompress.core.safeio import write_safetensors_lazy
from loracompress.merging.check import ModuleCheck
from loracompress.merging.checkpoint import INDEX_NAME, Reader
from loracompress.merging.plan import MergePlan, Planned
from loracompress.merging.weights import add_delta


def write_plan(plan: MergePlan, adapter: Adapter, out_dir: Path, check: ModuleCheck,
               progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Write every planned tensor into ``out_dir`` (one shard at a time), plus the index when there
    are several shards. Returns the safetensors file names written."""
    by_file: dict[str, list[Planned]] = {f: [] for f in plan.files}
    for t in plan.tensors:
        by_file[t.file].append(t)
    files = [f for f in plan.files if by_file[f]]
    with ExitStack() as stack:
        reader = Reader(plan.checkpoint, stack, plan.quant)
        for i, name in enumerate(files):
            group = {t.name: t for t in by_file[name]}
            specs = {n: (t.dtype, t.shape) for n, t in group.items()}
            write_safetensors_lazy(out_dir / name, specs, lambda n, group=group: _value(group[n], reader, adapter, check),
                                   metadata={"format": "pt"})
            if progress is not None:
                progress(i + 1, len(files))
    if len(files) > 1:
        weight_map = {t.name: t.file for t in sorted(plan.tensors, key=lambda t: t.name)}
        index = {"metadata": {"total_size": plan.bytes()}, "weight_map": weight_map}
        jsonio.write_json(out_dir / INDEX_NAME, index)
    return files


def _value(t: Planned, reader: Reader, adapter: Adapter, check: ModuleCheck) -> torch.Tensor:
    src = t.source
    value = adapter.extra_tensors[src.extra] if src.extra is not None else reader.read(src.key)  # type: ignore[arg-type]
    if src.module is None:
        return value.to(t.dtype)
    m = adapter.modules[src.module]
    x = check.inputs(m)
    ref = check.reference(value.T if src.transposed else value, m, x)
    merged = add_delta(value, m, transposed=src.transposed)  # a new tensor: the adapter's own is never changed
    cast = merged.to(t.dtype)
    check.record(src.module, merged.T if src.transposed else merged,
                 None if t.dtype == torch.float32 else (cast.T if src.transposed else cast), x, ref)
    return cast
