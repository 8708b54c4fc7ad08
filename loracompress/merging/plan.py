"""The streaming merge's plan: every output tensor's file, dtype, shape and source, decided before a byte is written.

When the checkpoint does not map one-to-one onto the model transformers would build (other key
names, missing tensors that transformers would initialise, heads of another size), :func:`plan_merge`
returns the reason and the caller merges in memory instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loracompress.core.adapter import Adapter, base_param_name
from loracompress.core.dtypes import FLOATS
from loracompress.merging.checkpoint import SINGLE_NAME, Checkpoint
from loracompress.merging.weights import is_conv1d, tied_groups
from loracompress.runtime.quantized import Dequantizer, Requantizer


@dataclass
class Source:
    """Where one output tensor's value comes from."""

    key: str | None = None  # a checkpoint tensor
    extra: str | None = None  # or an adapter tensor (modules_to_save, save_embedding_layers)
    module: str | None = None  # the adapter module whose ΔW is added to it
    transposed: bool = False  # the base stores this weight as [in, out] (GPT-2 Conv1D)


@dataclass
class Planned:
    """One output tensor: its file, dtype, shape and source."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: Source


@dataclass
class MergePlan:
    """Everything the streaming merge will write, decided before anything is read."""

    checkpoint: Checkpoint
    tensors: list[Planned]
    files: list[str]
    untied: list[str]  # output heads that were tied to another tensor and get their own copy
    model: nn.Module  # the model's structure on the meta device
    config: Any
    vocab_resized: tuple[int, int] | None = None
    #: the quantized base's weights, dequantized as they are read (None: a float base)
    quant: Dequantizer | Requantizer | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The output's dtype: the floating dtype holding the most bytes."""
        return _largest_float((t.dtype, t.shape) for t in self.tensors)

    def bytes(self) -> int:
        return sum(math.prod(t.shape) * torch.empty(0, dtype=t.dtype).element_size() for t in self.tensors)


def plan_merge(
    checkpoint: Checkpoint,
    model: nn.Module,
    config: Any,
    adapter: Adapter,
    dtype: torch.dtype | None,
    max_shard_bytes: int | None,
    quant: Dequantizer | Requantizer | None = None,
) -> MergePlan | str:
    """The streaming plan, or the reason (a string) why this checkpoint must be merged in memory.

    ``model`` is the structure transformers builds for the adapter's task (meta device, vocabulary
    already resized to the adapter's embeddings when they differ). ``dtype`` overrides every floating
    tensor's dtype; by default each keeps its own. With ``quant``, its weights are planned in their
    float shape and the base's float dtype (they are dequantized when read) and the tensors folded
    into them (scales, quantization states) are not written.
    """
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = tied_groups(model)
    ck = checkpoint.entries

    def present(name: str) -> str | None:
        """The checkpoint key holding ``name``'s value (itself, or a tied partner)."""
        for candidate in [name, *tied.get(name, [])]:
            if candidate in ck:
                return candidate
        return None

    quantized = quant.weights if quant is not None else {}
    folded = quant.companions if quant is not None else set()
    # A dequantized weight is written in the dtype the base computes in (its float tensors' dtype).
    main_dtype = _main_dtype(checkpoint)
    float_dtype = main_dtype if any(checkpoint.dtype(k) in FLOATS for k in ck) else torch.bfloat16

    def shape_of(key: str) -> tuple[int, ...]:
        return quantized.get(key) or checkpoint.shape(key)

    def dtype_of(key: str) -> torch.dtype:
        return float_dtype if key in quantized and isinstance(quant, Dequantizer) else checkpoint.dtype(key)

    extras: dict[str, str] = {}
    for key, tensor in adapter.extra_tensors.items():
        bare = base_param_name(key)
        if bare not in state:
            return f"the adapter's {bare} is not a tensor of {type(model).__name__}"
        if tuple(tensor.shape) != state[bare]:
            return f"the adapter's {bare} is {tuple(tensor.shape)}, the model's {state[bare]}"
        extras[bare] = key
    # A tied group shares one value: a saved copy of any member replaces it for every member.
    for bare in list(extras):
        for partner in tied.get(bare, []):
            extras.setdefault(partner, extras[bare])

    fif = adapter.fan_in_fan_out
    modules: dict[str, str] = {}
    for path, m in adapter.modules.items():
        if m.rank == 0:
            continue
        name = f"{path}.weight"
        if name not in state:
            return f"{name} is not a parameter of {type(model).__name__}"
        modules[name] = path

    # Every tensor of the model must come from the checkpoint or the adapter; anything else would
    # be initialised by transformers (in memory, as before).
    for name, shape in state.items():
        key = present(name)
        if name in extras:
            continue
        if key is None:
            return f"the checkpoint has no {name}"
        if shape_of(key) != shape:
            return f"the checkpoint's {key} is {shape_of(key)}, the model's {shape}"

    # A LoRA on a tensor that shares storage with another (a tied head) changes that one alone.
    untied = sorted(n for n in modules if len(tied.get(n, [])) > 1)

    def out_dtype(own: torch.dtype) -> torch.dtype:
        return dtype if (dtype is not None and own in FLOATS) else own

    planned: dict[str, Planned] = {}
    for key, (file, _) in ck.items():
        if key in folded:
            continue
        if key not in state:  # not part of the model (a stale buffer): copied as it is
            planned[key] = Planned(key, file, out_dtype(checkpoint.dtype(key)), checkpoint.shape(key), Source(key=key))
    for name, shape in state.items():
        key = present(name)
        is_shared_copy = key is not None and key != name and name not in untied
        if is_shared_copy:
            continue  # a tied duplicate: the checkpoint stores it once, so does the output
        own = dtype_of(key) if key is not None else main_dtype
        file = ck[key][0] if key is not None else checkpoint.files[-1]
        module = modules.get(name)
        transposed = bool(module is not None and fif and is_conv1d(model.get_submodule(module)))
        source = Source(key=key if name not in extras else None, extra=extras.get(name), module=module, transposed=transposed)
        planned[name] = Planned(name, file, out_dtype(own), shape, source)

    tensors = list(planned.values())
    files = list(checkpoint.files)
    if max_shard_bytes is not None:
        files = _reshard(tensors, list(state), max_shard_bytes)
    return MergePlan(checkpoint=checkpoint, tensors=tensors, files=files, untied=untied, model=model, config=config,
                     quant=quant)


def _main_dtype(checkpoint: Checkpoint) -> torch.dtype:
    return _largest_float((checkpoint.dtype(k), checkpoint.shape(k)) for k in checkpoint.entries)


def _largest_float(tensors: Iterable[tuple[torch.dtype, tuple[int, ...]]]) -> torch.dtype:
    """The floating dtype holding the most elements (float32 when there is none)."""
    sizes: dict[torch.dtype, int] = {}
    for dtype, shape in tensors:
        if dtype in FLOATS:
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    return max(sizes, key=lambda d: sizes[d]) if sizes else torch.float32


def _reshard(tensors: list[Planned], order: list[str], max_bytes: int) -> list[str]:
    """Assign tensors to ``model-0000i-of-0000N.safetensors`` of at most ``max_bytes`` each (a
    tensor larger than that gets a file of its own), in the model's parameter order."""
    rank = {n: i for i, n in enumerate(order)}
    ordered = sorted(tensors, key=lambda t: (rank.get(t.name, len(rank)), t.name))
    groups: list[list[Planned]] = [[]]
    size = 0
    for t in ordered:
        nbytes = math.prod(t.shape) * torch.empty(0, dtype=t.dtype).element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    if len(groups) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        for t in group:
            t.file = name
    return names
