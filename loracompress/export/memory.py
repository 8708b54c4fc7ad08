"""Keeping ONNX export at about one copy of the model.

- The base is loaded in the 16-bit dtype it was published in (:func:`storage_dtype`), not in fp32;
  :func:`fp32_compute` runs the reference forward in fp32 anyway, one module's weights upcast at a
  time, so the reference is exactly the fp32 base + adapter of before.
- :func:`merge_cast` adds each ``ΔW`` in fp32 and rounds once, straight to the export dtype.
- :func:`release` frees the PyTorch weights (and hands the memory back) before onnxruntime loads
  the written graph, so the two never coexist.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from loracompress.core.adapter import Adapter
from loracompress.runtime.layers import _untie, base_shape, check_fit, require_float_weights

log = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


def storage_dtype(spec: str | Path | None, adapter: Adapter, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype to hold the base in: its published 16-bit dtype (exact, half of fp32), else fp32."""
    from loracompress.runtime.model import load_base_structure

    structure = load_base_structure(spec, adapter, trust_remote_code=trust_remote_code)
    if isinstance(structure, str):  # GGUF, uncached id, ...: as before
        return torch.float32
    config = structure.config
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in _HALF else torch.float32


@contextmanager
def fp32_compute(model: nn.Module) -> Iterator[None]:
    """Inside the block, every module computes with its 16-bit weights upcast to fp32 for its own
    forward only (then put back, bit for bit): fp32 results, one module in fp32 at a time."""
    handles = []

    def before(module: nn.Module, _args: object) -> None:
        saved = {}
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is not None and t.dtype in _HALF:
                saved[name] = t.data
                t.data = t.data.float()
        module._lc_saved = saved  # type: ignore[attr-defined]

    def after(module: nn.Module, _args: object, _out: object) -> None:
        for name, data in getattr(module, "_lc_saved", {}).items():
            t = module.get_parameter(name) if name in dict(module.named_parameters(recurse=False)) else module.get_buffer(name)
            t.data = data
        module._lc_saved = {}  # type: ignore[attr-defined]

    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module in model.modules():
            if hasattr(module, "_lc_saved"):
                after(module, None, None)
                del module._lc_saved


class MappedShards:
    """The base's memory-mapped safetensors shards, and handing back the pages of weights no longer used.

    A base loaded in its stored dtype holds views of private (copy-on-write) maps of its shard
    files; a shard's pages stay in the process until none of its tensors is left, so replacing the
    weights one by one would hold old and new copies of a whole shard. :meth:`drop` tells the kernel
    a replaced weight's pages are not needed (``MADV_DONTNEED``). On a private file map that is
    always harmless: a page touched again is read back from the file, which is never written.
    Anywhere else (another OS, anonymous memory, a shared map) it does nothing.
    """

    _MADV_DONTNEED = 4

    def __init__(self) -> None:
        self.maps: list[tuple[int, int]] = []
        self._madvise = None
        try:
            with open("/proc/self/maps", encoding="utf-8") as f:
                for line in f:
                    fields = line.split(None, 5)
                    if len(fields) == 6 and fields[1].endswith("p") and fields[5].strip().endswith(".safetensors"):
                        lo, hi = (int(x, 16) for x in fields[0].split("-"))
                        self.maps.append((lo, hi))
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise
            self._page = int(os.sysconf("SC_PAGE_SIZE"))
        except (OSError, AttributeError, ValueError):
            self.maps = []

    def drop(self, tensor: torch.Tensor, live: nn.Module) -> bool:
        """Hand back ``tensor``'s whole pages if they lie in a shard map and no tensor of ``live`` uses them."""
        if not self.maps or self._madvise is None or tensor.device.type != "cpu":
            return False
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.untyped_storage().nbytes()
        if not any(lo <= start and end <= hi for lo, hi in self.maps):
            return False
        for t in [*live.parameters(), *live.buffers()]:
            if t.device.type == "cpu" and t.data_ptr() < end and start < t.data_ptr() + t.untyped_storage().nbytes():
                return False  # still viewed (a tied weight, say)
        lo = -(-start // self._page) * self._page  # whole pages only: a page's other bytes may be another tensor's
        hi = end // self._page * self._page
        return hi > lo and self._madvise(lo, hi - lo, self._MADV_DONTNEED) == 0


def merge_cast(model: nn.Module, adapter: Adapter, dtype: torch.dtype) -> None:
    """Merge every module's ``ΔW`` in fp32 and round once to ``dtype``; cast every other floating
    tensor to ``dtype``, one tensor at a time.

    Like :func:`loracompress.runtime.layers.merge_into` (a tied head gets its own copy) but without a
    round trip through the stored dtype: a bf16 base exported as fp16 is rounded once, not twice.
    Each replaced weight's memory-mapped pages are handed back at once (:class:`MappedShards`), so
    the old and the new dtype coexist for one tensor, not for the whole model
    (``model.to(dtype)`` after all merges held both).
    """
    check_fit(model, adapter)
    require_float_weights(model, adapter)
    _untie(model, [f"{p}.weight" for p in adapter.modules])
    merges = {path: m for path, m in adapter.modules.items() if m.rank > 0}
    shards = MappedShards()
    with torch.no_grad():
        for path, module in model.named_modules():
            if path in merges:
                old = module.weight.data
                delta = merges[path].delta().to(module.weight.device)
                if base_shape(module) is not None and type(module).__name__ == "Conv1D":
                    delta = delta.T
                merged = module.weight.float() + delta
                module.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
                del merged, delta
                shards.drop(old, model)
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    old = tensor.data
                    tensor.data = tensor.data.to(dtype)
                    shards.drop(old, model)


def release(model: nn.Module) -> None:
    """Free the model's weights (its structure and config stay) and hand the memory back to the OS."""
    model.to("meta")
    gc.collect()
    try:  # glibc keeps freed heap pages for reuse; ask it to return them (a no-op elsewhere)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
