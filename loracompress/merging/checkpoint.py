"""A safetensors checkpoint on disk: where each tensor lives, and reading one tensor at a time.

:func:`read_checkpoint` reads the headers only (and the index of a sharded checkpoint);
:class:`Reader` reads one tensor with plain file reads, a quantized weight dequantized as it is read
(:mod:`loracompress.runtime.quantized`), so nothing but that tensor and its few scales is in memory.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from loracompress.core.safeio import read_header, read_tensor, torch_dtype
from loracompress.errors import LoraCompressError
from loracompress.runtime.quantized import Dequantizer, Requantizer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


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
