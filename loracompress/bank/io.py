"""A bank on disk: ``bank.safetensors`` (bases, cores, heads), ``bank.json`` (the manifest), and every
adapter expanded as a stock PEFT folder ``adapters/<name>/``.

Tensor names in ``bank.safetensors``: ``bases.<cluster>.<module>.U`` [out, R] and ``….V`` [in, R],
``cores.<i>.<module>`` [R, R] and ``heads.<i>.<file key>`` (``modules_to_save`` tensors, unchanged), where
``<i>`` is the adapter's index in ``bank.json``'s ``adapters`` list. The bank alone rebuilds every
expanded folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loracompress.bank.build import Bank
from loracompress.bank.checks import BankShape
from loracompress.core.adapter import BIN_NAME, ORIGINAL_PARAMS_KEY, SAFETENSORS_NAME, Adapter
from loracompress.core.dtypes import dtype_name, parse_dtype
from loracompress.core.records import report_json
from loracompress.core.safeio import read_safetensors, write_safetensors
from loracompress.core.writer import write_adapter_files
from loracompress.errors import LoraCompressError

MANIFEST_NAME = "bank.json"
TENSORS_NAME = "bank.safetensors"
ADAPTERS_DIR = "adapters"
FORMAT = "loracompress.bank"
VERSION = 1


@dataclass
class Member:
    """One adapter of the bank, beside its cores: where it came from and what rides along."""

    name: str
    source: str
    sha256: str
    config: dict[str, Any]
    original_params: int
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    relative_error: float | None = None
    added: bool = False  # projected onto the frozen bases after they were fitted (bank-add)


@dataclass
class BankFile:
    """Everything a bank folder holds. ``info``: the rest of the manifest (budget, cluster search, settings)."""

    bank: Bank
    members: list[Member]
    shape: BankShape
    dtype: torch.dtype
    info: dict[str, Any] = field(default_factory=dict)

    def expanded(self, index: int) -> Adapter:
        """Adapter ``index`` as the portable PEFT adapter its folder holds."""
        m = self.members[index]
        return Adapter(modules=self.bank.expand(index, self.dtype), config=dict(m.config), extra_tensors=dict(m.heads),
                       dtype=self.dtype, metadata={ORIGINAL_PARAMS_KEY: str(m.original_params), "loracompress.bank": "1"})


def weights_sha256(folder: Path) -> str:
    """sha256 of an adapter folder's weights file (safetensors, else the legacy .bin), streamed."""
    path = folder / SAFETENSORS_NAME if (folder / SAFETENSORS_NAME).is_file() else folder / BIN_NAME
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(bf: BankFile) -> dict[str, Any]:
    bank = bf.bank
    originals = sum(m.original_params for m in bf.members)
    return {
        "format": FORMAT,
        "version": VERSION,
        "base_model_name_or_path": bf.shape.base_model,
        "fan_in_fan_out": bf.shape.fan_in_fan_out,
        "dtype": dtype_name(bf.dtype),
        **bf.info,
        "params": {"bases": bank.base_params, "cores": bank.core_params, "total": bank.num_params,
                   "heads": sum(t.numel() for m in bf.members for t in m.heads.values()),
                   "originals": originals, "fraction_of_originals": bank.num_params / originals if originals else None},
        "clusters": {**bf.info.get("clusters", {}), "count": len(bank.bases),
                     "members": [bank.members(c) for c in range(len(bank.bases))]},
        "modules": {p: {"out": o, "in": i, "rank": [bank.rank(c, p) for c in range(len(bank.bases))]}
                    for p, (o, i) in bank.shapes.items()},
        "adapters": [{"name": m.name, "source": m.source, "sha256": m.sha256, "cluster": bank.clusters[i],
                      "relative_error": m.relative_error, "original_params": m.original_params,
                      "core_params": sum(c.numel() for c in bank.cores[i].values()), "added": m.added,
                      "folder": f"{ADAPTERS_DIR}/{m.name}", "config": m.config}
                     for i, m in enumerate(bf.members)],
    }


def write_bank(bf: BankFile, folder: Path) -> None:
    """Write the bank into an existing (temporary) folder."""
    tensors: dict[str, torch.Tensor] = {}
    for c, bases in enumerate(bf.bank.bases):
        for path, (U, V) in bases.items():
            tensors[f"bases.{c}.{path}.U"] = U.to(bf.dtype).contiguous()
            tensors[f"bases.{c}.{path}.V"] = V.to(bf.dtype).contiguous()
    for i, (cores, member) in enumerate(zip(bf.bank.cores, bf.members)):
        for path, core in cores.items():
            tensors[f"cores.{i}.{path}"] = core.to(bf.dtype).contiguous()
        for key, t in member.heads.items():
            tensors[f"heads.{i}.{key}"] = t.contiguous()
    write_safetensors(folder / TENSORS_NAME, tensors, {"format": "pt", "loracompress.bank": str(VERSION)})
    (folder / MANIFEST_NAME).write_text(report_json(manifest(bf)), encoding="utf-8")
    for i, member in enumerate(bf.members):
        target = folder / ADAPTERS_DIR / member.name
        target.mkdir(parents=True)
        write_adapter_files(bf.expanded(i), target, bf.dtype)


def read_bank(path: str | Path) -> BankFile:
    """Read a bank folder written by :func:`write_bank`; the cores and bases come back as stored."""
    folder = Path(path)
    mpath, tpath = folder / MANIFEST_NAME, folder / TENSORS_NAME
    if not mpath.is_file() or not tpath.is_file():
        raise LoraCompressError(f"{folder}: no {MANIFEST_NAME} and {TENSORS_NAME}; pass the -o folder of `loracompress bank`")
    try:
        info = json.loads(mpath.read_text(encoding="utf-8"))
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise ValueError
        shapes = {p: (int(m["out"]), int(m["in"])) for p, m in info["modules"].items()}
        entries = info["adapters"]
        n_clusters = int(info["clusters"]["count"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise LoraCompressError(f"{mpath}: not a bank manifest this version reads; rebuild the bank with `loracompress bank`") from None
    tensors, _ = read_safetensors(tpath)
    dtype = parse_dtype(info.get("dtype")) or torch.float32
    bases: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(n_clusters)]
    cores: list[dict[str, torch.Tensor]] = [{} for _ in entries]
    heads: list[dict[str, torch.Tensor]] = [{} for _ in entries]
    try:
        for c in range(n_clusters):
            for p in shapes:
                bases[c][p] = (tensors.pop(f"bases.{c}.{p}.U"), tensors.pop(f"bases.{c}.{p}.V"))
        for i in range(len(entries)):
            for p in shapes:
                cores[i][p] = tensors.pop(f"cores.{i}.{p}")
    except KeyError as err:
        raise LoraCompressError(f"{tpath}: tensor {err.args[0]} is missing; the bank is incomplete: rebuild it") from None
    for key, t in tensors.items():
        kind, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if kind != "heads" or not index.isdigit() or int(index) >= len(entries):
            raise LoraCompressError(f"{tpath}: unexpected tensor {key!r}; the bank is corrupt: rebuild it")
        heads[int(index)][name] = t
    bank = Bank(shapes=shapes, clusters=[int(e["cluster"]) for e in entries], bases=bases, cores=cores)
    members = [Member(name=e["name"], source=e["source"], sha256=e["sha256"], config=e["config"],
                      original_params=int(e["original_params"]), heads=h, relative_error=e.get("relative_error"),
                      added=bool(e.get("added", False))) for e, h in zip(entries, heads)]
    shape = BankShape(base_model=info.get("base_model_name_or_path"), fan_in_fan_out=bool(info.get("fan_in_fan_out")),
                      shapes=shapes)
    kept = {k: info[k] for k in ("budget", "clusters", "settings") if k in info}
    return BankFile(bank=bank, members=members, shape=shape, dtype=dtype, info=kept)
