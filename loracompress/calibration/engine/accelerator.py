"""Devices, precision and processes through accelerate: the one place that knows about them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from loracompress.errors import LoraCompressError
from loracompress.runtime.device import resolve_device

log = logging.getLogger(__name__)


def make_accelerator(device: str, precision: str) -> Any:
    """An ``Accelerator`` for ``device`` ("auto", "cpu", "cuda", "cuda:N") and ``precision``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    dev = resolve_device(device)
    if dev.startswith("cuda:"):
        torch.cuda.set_device(int(dev.split(":")[1]))
    cpu = dev == "cpu"
    if precision == "fp16" and cpu:
        raise LoraCompressError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    mixed = "no" if precision == "fp32" else precision
    partial = PartialState._shared_state
    distributed = bool(partial) and partial.get("num_processes", 1) > 1
    state = AcceleratorState._shared_state
    if state and not distributed:
        # One process running several calibrations (a library user, the tests): start afresh
        # rather than refusing another precision or device.
        AcceleratorState._reset_state(reset_partial_state=True)
    # Buffers (masks, teacher factors) are the same on every process: no need to broadcast them.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=[ddp])
    return accelerator


def parallel_kind(accelerator: Any, sharded: bool = False) -> str:
    """``"none"`` (one process), ``"ddp"`` (replicated model, averaged gradients) or ``"fsdp"`` (the base
    sharded by :mod:`.sharding`; also with one process, e.g. ``torchrun --nproc-per-node 1`` on one GPU)."""
    if sharded:
        return "fsdp"
    return "none" if accelerator.num_processes == 1 else "ddp"


def reducer(accelerator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if accelerator.num_processes == 1:
        return lambda t: t
    return lambda t: accelerator.reduce(t.contiguous(), reduction="mean")


def any_process(accelerator: Any, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def place_model(model: torch.nn.Module, device: torch.device) -> None:
    """Move ``model`` onto ``device`` unless it is there already (loaded there through ``device_map``).

    A bitsandbytes-quantized model cannot be moved: it must have been loaded onto the device.
    """
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if all(_same_device(d, device) for d in devices):
        return
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise LoraCompressError(f"the quantized base model is on {sorted(map(str, devices))}, the run on {device}; "
                                "pass the same --device for both (e.g. --device cuda)")
    model.to(device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    b = torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
