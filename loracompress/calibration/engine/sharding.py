"""Sharded calibration: the frozen base split across processes with torch's FSDP2, the LoRA factors whole.

``--fsdp`` (or an accelerate FSDP config) turns it on. Each transformer block, then the rest of the
model, goes through :func:`torch.distributed.fsdp.fully_shard`: every base weight becomes a
``DTensor`` sharded on dim 0, of which each process keeps ``1/world``; a block's weights are gathered
just before it runs and freed after it (again in the backward pass). The student factors ``A``/``B``
of every :class:`~loracompress.runtime.layers.LoraLayer` are passed as ``ignored_params``: they stay
ordinary whole tensors, the same on every process, so the methods read and edit them in place (masks,
rewinds, IncreLoRA's growth) exactly as in one process. The teacher's factors and the masks are
buffers, which FSDP never shards. FSDP does not reduce the gradients of ignored parameters:
:func:`average_gradients` averages them (one ``all_reduce`` per bucket), as DDP would.

No sharding is written here: the split, the gathers and the frees are all ``fully_shard``'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)

QUANTIZED = ("--fsdp shards a bf16/fp16/fp32 base, not a bitsandbytes-quantized one; "
             "drop --fsdp or --load-in-4bit/--load-in-8bit")

#: gradients averaged per collective (DDP's default bucket is 25 MB)
BUCKET_BYTES = 32 * 2**20


@dataclass
class ShardInfo:
    """What the report records of a sharded run (``settings.run.sharding``)."""

    processes: int
    blocks: int  # fully_shard groups below the root (transformer blocks)
    base_bytes: int  # the whole base's parameter bytes (LoRA factors excluded)
    #: per process (by rank): the bytes of the base parameters that process holds (its local shards)
    shard_bytes: list[int] = field(default_factory=list)
    #: per process (by rank): peak resident memory of the process by the end of the run (MiB; None where unknown)
    peak_rss_mib: list[float | None] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"processes": self.processes, "blocks": self.blocks, "base_bytes": self.base_bytes,
                "shard_bytes": self.shard_bytes, "peak_rss_mib": self.peak_rss_mib}


def fsdp_requested(flag: bool, accelerator: Any = None) -> bool:
    """``--fsdp``, or an accelerate FSDP config: ``accelerate launch --use_fsdp`` (which on CPU processes
    accelerate itself ignores) or a GPU run accelerate has put in FSDP mode."""
    from_accelerate = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return flag or from_accelerate or (accelerator is not None and "FSDP" in str(accelerator.distributed_type))


def check_shardable(precision: str) -> None:
    """Refuse what sharded calibration does not run, before any model is touched: no launcher (torchrun and
    accelerate launch set ``LOCAL_RANK``; a library user may have set up the process group instead), fp16."""
    import torch.distributed as dist

    launched = "LOCAL_RANK" in os.environ or (dist.is_available() and dist.is_initialized())
    if not launched:
        raise LoraCompressError("--fsdp shards the base across processes: launch with "
                                "torchrun --nproc-per-node N -m loracompress prune ... --fsdp (or accelerate launch)")
    if precision == "fp16":
        raise LoraCompressError("--fsdp runs with --precision bf16 or fp32 (fp16's loss scaling is not wired to "
                                "the sharded run); use bf16")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, innermost first: the modules transformers names in ``_no_split_modules``
    (``LlamaDecoderLayer``, ``BertLayer``, ...), else the entries of its longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not found:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        found = list(max(lists, key=len)) if lists else []
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(found, key=lambda m: -order[id(m)])  # bottom-up: fully_shard wants children before parents


def shard_base(model: nn.Module, keep: Sequence[nn.Parameter], device: torch.device) -> ShardInfo:
    """Shard ``model``'s parameters block by block over all processes, except ``keep`` (moved to ``device``
    whole). Base weights may start on the CPU: each block is moved to ``device`` as it is sharded, so a
    GPU never holds more than its shards plus one block."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters()):
        raise LoraCompressError(QUANTIZED)
    ignored = set(keep)
    with torch.no_grad():
        for p in ignored:  # FSDP leaves ignored parameters where they are
            if p.device != torch.device(device):
                p.data = p.data.to(device)
    world = dist.get_world_size()
    mesh = init_device_mesh(torch.device(device).type, (world,))
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    base_bytes, local_bytes = _base_bytes(model.parameters(), ignored)
    shard = _gather_int(local_bytes)
    log.info("base sharded over %d processes in %d blocks: %.1f of %.1f MiB on each", world, len(blocks),
             local_bytes / 2**20, base_bytes / 2**20)
    return ShardInfo(processes=world, blocks=len(blocks), base_bytes=base_bytes, shard_bytes=shard)


def _base_bytes(params: Iterable[nn.Parameter], ignored: set[nn.Parameter]) -> tuple[int, int]:
    """(whole, local) bytes of the parameters not in ``ignored``; a DTensor's local part is its shard."""
    whole = local = 0
    for p in params:
        if p in ignored:
            continue
        size = p.element_size()
        whole += p.numel() * size
        local += (p.to_local() if hasattr(p, "to_local") else p).numel() * size
    return whole, local


def _gather_int(value: int) -> list[int]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, int(value))
    return [int(v) for v in out]


def gather_peak_rss(info: ShardInfo) -> None:
    """Fill ``info.peak_rss_mib`` with every process's peak resident memory so far (Linux: ``ru_maxrss``)."""
    import torch.distributed as dist

    try:
        import resource

        mine: float | None = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except (ImportError, OSError):  # not on every platform
        mine = None
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    info.peak_rss_mib = out


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of ``params`` (whole, replicated tensors) over all processes, bucketed."""
    import torch.distributed as dist

    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]  # the same list on every process: one model, one graph
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= BUCKET_BYTES:
            _all_reduce_mean(bucket, world)
            bucket, size = [], 0
    if bucket:
        _all_reduce_mean(bucket, world)


def _all_reduce_mean(grads: list[torch.Tensor], world: int) -> None:
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
