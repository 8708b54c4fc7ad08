"""Merging into a model already in memory, one tensor at a time.

:func:`merge_into` adds every ``ΔW`` in place and keeps each weight's dtype (the in-memory ``merge``,
onnxruntime-genai export); :func:`merge_cast` rounds each merged weight once, straight to the export
dtype, and hands a replaced weight's memory-mapped pages back at once (:class:`MappedShards`). Either
holds the model plus one weight in fp32.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from loracompress.core.adapter import Adapter
from loracompress.merging.weights import add_delta, is_conv1d, require_float_weights, untie
from loracompress.runtime.layers import check_fit


def merge_into(model: nn.Module, adapter: Adapter) -> None:
    """Add every module's ΔW to the base weights in place (computed in float32, cast back)."""
    check_fit(model, adapter)
    untie(model, [f"{p}.weight" for p in adapter.modules])
    require_float_weights(model, adapter)
    with torch.no_grad():
        for path, m in adapter.modules.items():
            target = model.get_submodule(path)
            target.weight.copy_(add_delta(target.weight, m, transposed=is_conv1d(target)).to(target.weight.dtype))


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

    Like :func:`merge_into` (a tied head gets its own copy) but without a
    round trip through the stored dtype: a bf16 base exported as fp16 is rounded once, not twice.
    Each replaced weight's memory-mapped pages are handed back at once (:class:`MappedShards`), so
    the old and the new dtype coexist for one tensor, not for the whole model
    (``model.to(dtype)`` after all merges held both).
    """
    check_fit(model, adapter)
    require_float_weights(model, adapter)
    untie(model, [f"{p}.weight" for p in adapter.modules])
    merges = {path: m for path, m in adapter.modules.items() if m.rank > 0}
    shards = MappedShards()
    with torch.no_grad():
        for path, module in model.named_modules():
            if path in merges:
                old = module.weight.data
                merged = add_delta(old, merges[path], transposed=is_conv1d(module))
                module.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
                del merged
                shards.drop(old, model)
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    old = tensor.data
                    tensor.data = tensor.data.to(dtype)
                    shards.drop(old, model)
