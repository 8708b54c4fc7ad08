"""Keeping ONNX export at about one copy of the model.

- The base is loaded in the 16-bit dtype it was published in (:func:`storage_dtype`), not in fp32;
  :func:`fp32_compute` runs the reference forward in fp32 anyway, one module's weights upcast at a
  time, so the reference is exactly the fp32 base + adapter of before.
- :func:`~loracompress.merging.inplace.merge_cast` adds each ``ΔW`` in fp32 and rounds once, straight to
  the export dtype, handing each replaced weight's pages back as it goes.
- :func:`release` frees the PyTorch weights (and hands the memory back) before onnxruntime loads
  the written graph, so the two never coexist.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from loracompress.core.adapter import Adapter
from loracompress.merging.weights import published_dtype

log = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


def storage_dtype(spec: str | Path | None, adapter: Adapter, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype to hold the base in: its published 16-bit dtype (exact, half of fp32), else fp32."""
    from loracompress.runtime.model import load_base_structure

    structure = load_base_structure(spec, adapter, trust_remote_code=trust_remote_code)
    if isinstance(structure, str):  # GGUF, uncached id, ...: as before
        return torch.float32
    stored = published_dtype(structure.config)
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


def release(model: nn.Module) -> None:
    """Free the model's weights (its structure and config stay) and hand the memory back to the OS."""
    model.to("meta")
    gc.collect()
    try:  # glibc keeps freed heap pages for reuse; ask it to return them (a no-op elsewhere)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
