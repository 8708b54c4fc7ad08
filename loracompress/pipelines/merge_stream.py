"""The streaming merge: a safetensors base model and an adapter folded tensor by tensor.

Only the base's *structure* is built (on the meta device, no weights); the weights are read from
the shards one tensor at a time with plain file reads, each LoRA'd weight gets ``ΔW = B @ A · scale``
added in float32 and is cast back, everything else is copied as it is. Peak memory is one tensor
(plus its fp32 copy when it is merged) plus the adapter, whatever the size of the model. A quantized
base's weight (block FP8, bitsandbytes) is read with its few scale tensors and dequantized to fp32 as
it is read (:mod:`loracompress.runtime.quantized`): the same bound, the largest shard plus the adapter.

The plan (:func:`plan_merge`) decides everything before a byte is written: which output file each
tensor goes to, its dtype and shape, where its value comes from. When the checkpoint does not map
one-to-one onto the model transformers would build (other key names, missing tensors that
transformers would initialise, heads of another size), :func:`plan_merge` returns the reason and
the caller merges in memory instead, exactly as before.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from loracompress.core import jsonio
from loracompress.core.adapter import Adapter, LoraModule, base_param_name
from loracompress.core.safeio import read_header, read_tensor, torch_dtype, write_safetensors_lazy
from loracompress.errors import LoraCompressError
from loracompress.runtime.quantized import Dequantizer, Requantizer

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- the checkpoint on disk


@dataclass
class Checkpoint:
    """A safetensors checkpoint: every tensor's file and header entry, the shard order."""

    folder: Path
    files: list[str]
    entries: dict[str, tuple[str, dict]]  # key -> (file name, header entry)
    data_start: dict[str, int]
    index_metadata: dict[str, Any] = field(default_factory=dict)

    def dtype(self, key: str) -> torch.dtype:
        return torch_dtype(self.entries[key][1]["dtype"])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key][1]["shape"])


def read_checkpoint(folder: Path) -> Checkpoint | None:
    """The safetensors checkpoint in ``folder`` (sharded with an index, or one file), else ``None``."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise LoraCompressError(f"{index}: not a valid safetensors index; re-download or re-save the base model") from None
        files = list(dict.fromkeys(str(f) for f in weight_map.values()))
        metadata = data.get("metadata") or {}
    elif (folder / SINGLE_NAME).is_file():
        weight_map, files, metadata = None, [SINGLE_NAME], {}
    else:
        return None
    entries: dict[str, tuple[str, dict]] = {}
    starts: dict[str, int] = {}
    for name in files:
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise LoraCompressError(f"{index}: names shard {name!r}, which is not in {folder}; re-download the base model")
        header, _, start = read_header(path)
        starts[name] = start
        for key, entry in header.items():
            if weight_map is not None and weight_map.get(key) != name:
                continue  # the index decides where a tensor lives
            entries[key] = (name, entry)
    if weight_map is not None:
        lost = [k for k in weight_map if k not in entries]
        if lost:
            raise LoraCompressError(
                f"{index}: lists {lost[0]} in {weight_map[lost[0]]} but that shard does not hold it; re-download the base model"
            )
    return Checkpoint(folder=folder, files=files, entries=entries, data_start=starts, index_metadata=metadata)


# --------------------------------------------------------------------------- the plan


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
        sizes: dict[torch.dtype, int] = {}
        for t in self.tensors:
            if t.dtype in FLOATS:
                sizes[t.dtype] = sizes.get(t.dtype, 0) + math.prod(t.shape)
        return max(sizes, key=lambda d: sizes[d]) if sizes else torch.float32

    def bytes(self) -> int:
        return sum(math.prod(t.shape) * torch.empty(0, dtype=t.dtype).element_size() for t in self.tensors)


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter name -> every name sharing that tensor (itself included)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {name: names for names in owners.values() for name in names}


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
    tied = _tied_groups(model)
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
        transposed = bool(module is not None and fif and _is_conv1d(model, modules[name]))
        source = Source(key=key if name not in extras else None, extra=extras.get(name), module=module, transposed=transposed)
        planned[name] = Planned(name, file, out_dtype(own), shape, source)

    tensors = list(planned.values())
    files = list(checkpoint.files)
    if max_shard_bytes is not None:
        files = _reshard(tensors, list(state), max_shard_bytes)
    return MergePlan(checkpoint=checkpoint, tensors=tensors, files=files, untied=untied, model=model, config=config,
                     quant=quant)


def _is_conv1d(model: nn.Module, path: str) -> bool:
    return type(model.get_submodule(path)).__name__ == "Conv1D"


def _main_dtype(checkpoint: Checkpoint) -> torch.dtype:
    sizes: dict[torch.dtype, int] = {}
    for key in checkpoint.entries:
        d = checkpoint.dtype(key)
        if d in FLOATS:
            sizes[d] = sizes.get(d, 0) + math.prod(checkpoint.shape(key))
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


# --------------------------------------------------------------------------- checking one module


class ModuleCheck:
    """Each merged module against base + LoRA on random probes, in fp32: ``W'x`` vs ``Wx + B(Ax)·s``.

    Probes are unit-scale rows (``N(0, 1/in)``), so the difference is on the scale of the layer's
    outputs. The cast to the output dtype is measured the same way and recorded.
    """

    def __init__(self, probes: int = 8, seed: int = 0):
        self.probes = probes
        self.generator = torch.Generator().manual_seed(seed)
        self.max_abs_diff = 0.0
        self.max_abs_diff_cast: float | None = None
        self.worst: str | None = None
        self.count = 0

    def inputs(self, m: LoraModule) -> torch.Tensor:
        return torch.randn(self.probes, m.in_features, generator=self.generator) / math.sqrt(max(m.in_features, 1))

    @staticmethod
    def reference(weight: torch.Tensor, m: LoraModule, x: torch.Tensor) -> torch.Tensor:
        """``Wx + B(Ax)·scale`` for a weight in ``[out, in]`` orientation, fp32."""
        return x @ weight.float().T + ((x @ m.A.float().T) @ m.B.float().T) * m.scale

    def record(self, path: str, merged: torch.Tensor, cast: torch.Tensor | None, x: torch.Tensor, ref: torch.Tensor) -> None:
        diff = float((x @ merged.float().T - ref).abs().max()) if ref.numel() else 0.0
        if not diff <= self.max_abs_diff:  # NaN counts as the worst
            self.max_abs_diff, self.worst = diff, path
        if cast is not None:
            cdiff = float((x @ cast.float().T - ref).abs().max()) if ref.numel() else 0.0
            self.max_abs_diff_cast = max(self.max_abs_diff_cast or 0.0, cdiff)
        self.count += 1

    def to_json(self) -> dict[str, Any]:
        return {"modules": self.count, "probes_per_module": self.probes, "max_abs_diff": self.max_abs_diff,
                "max_abs_diff_output_dtype": self.max_abs_diff_cast, "worst_module": self.worst}


# --------------------------------------------------------------------------- writing


@dataclass
class Reader:
    """Open shard files, one handle each, for the duration of the merge."""

    checkpoint: Checkpoint
    stack: ExitStack
    quant: Dequantizer | Requantizer | None = None
    handles: dict[str, BinaryIO] = field(default_factory=dict)

    def read(self, key: str) -> torch.Tensor:
        """``key``'s value; a quantized weight's dequantized, in float32 (one weight and its scales in memory)."""
        if self.quant is not None and key in self.quant.weights:
            return self.quant.value(key, self.raw)
        return self.raw(key)

    def raw(self, key: str) -> torch.Tensor:
        file, entry = self.checkpoint.entries[key]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context((self.checkpoint.folder / file).open("rb"))
        return read_tensor(self.handles[file], entry, self.checkpoint.data_start[file])


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
    weight = value.to(torch.float32, copy=True)  # a new tensor: the adapter's own is never changed
    oriented = weight.T if src.transposed else weight
    x = check.inputs(m)
    ref = check.reference(oriented, m, x)
    oriented += m.delta()  # in place through the view: the stored orientation follows
    cast = weight.to(t.dtype)
    check.record(src.module, oriented, None if t.dtype == torch.float32 else (cast.T if src.transposed else cast), x, ref)
    return cast
