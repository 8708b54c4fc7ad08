"""Reading safetensors files defensively.

The header is parsed and checked against the file size before any tensor is read, so a
truncated file, a corrupt header or a header that claims absurd sizes becomes a one-line
:class:`LoraCompressError` instead of a crash, a hang or a huge allocation.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from loracompress.core import jsonio
from loracompress.errors import LoraCompressError

_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
# A LoRA header lists a few thousand tensors at most; 100 MB of JSON is already absurd.
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse and validate a safetensors header. Returns (entries, metadata, data start offset)."""
    fix = "re-download or re-save the file"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise LoraCompressError(f"{path}: truncated ({size} bytes, no safetensors header); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise LoraCompressError(
                    f"{path}: corrupt or truncated safetensors header (claims {n} header bytes, file has {size}); {fix}"
                )
            raw = fh.read(n)
    except OSError as err:
        raise LoraCompressError(f"{path}: cannot be read ({err.strerror or err}); check the path and permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraCompressError(f"{path}: corrupt safetensors header (not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise LoraCompressError(f"{path}: corrupt safetensors header (not an object); {fix}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LoraCompressError(f"{path}: corrupt safetensors metadata; {fix}")
    data_len = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in _ITEMSIZE or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise LoraCompressError(f"{path}: corrupt safetensors header entry for {name!r}; {fix}") from None
        if end > data_len:
            raise LoraCompressError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} but the data holds {data_len}; {fix}"
            )
        if (end - start) != math.prod(shape) * _ITEMSIZE[dtype]:
            raise LoraCompressError(f"{path}: corrupt header: tensor {name!r} size does not match its shape {shape}; {fix}")
    return header, {str(k): str(v) for k, v in metadata.items()}, 8 + n


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, validated first."""
    _, metadata, _ = read_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LoraCompressError(f"{path}: cannot be read as safetensors ({str(err)[:160]}); re-save the file") from None
    return tensors, metadata


_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``"BF16"`` -> ``torch.bfloat16``)."""
    dtype = _CODE_DTYPES.get(code)
    if dtype is None:
        raise LoraCompressError(f"safetensors dtype {code} is not supported here; re-save the weights as F32, F16 or BF16")
    return dtype


def read_tensor(fh: BinaryIO, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor of an open safetensors file, read with plain file reads.

    Plain reads, not a memory map: mapped pages of a multi-GB shard count as resident memory of the
    process until the map is closed, a read buffer is only the tensor itself.
    """
    start, end = entry["data_offsets"]
    buf = bytearray(end - start)
    fh.seek(data_start + start)
    if fh.readinto(buf) != len(buf):
        raise LoraCompressError(f"{getattr(fh, 'name', 'safetensors file')}: truncated while reading; re-download or re-save it")
    dtype = torch_dtype(entry["dtype"])
    if not buf:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file deterministically, streaming one tensor at a time.

    The reference writer keeps metadata in a hash map (key order varies between runs, so the same
    adapter gives different bytes) and builds the whole file in memory first. Here keys are sorted,
    so equal inputs give equal bytes, and each tensor is written straight from its storage.
    """
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    write_safetensors_lazy(path, specs, lambda name: tensors[name], metadata)


def write_safetensors_lazy(
    path: Path,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """:func:`write_safetensors` for tensors made one at a time: ``specs`` gives each name's dtype
    and shape (the header comes first), ``produce(name)`` is called once per name in sorted order,
    right before its bytes are written, so only one tensor needs to be in memory."""
    names = sorted(specs)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for name in names:
        dtype, shape = specs[name]
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"cannot store dtype {dtype} in safetensors")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = jsonio.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            t = produce(name)
            if t.dtype != specs[name][0] or tuple(t.shape) != tuple(specs[name][1]):
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, the header says {specs[name]}")
            t = t.detach().cpu().contiguous().reshape(-1)
            if t.numel():
                fh.write(memoryview(t.view(torch.uint8).numpy()))  # no copy of the data
            del t
        fh.flush()
        os.fsync(fh.fileno())
