"""``bank`` and ``bank-add``: many adapters of one base in, one bank folder out.

Everything is checked before anything is written: the output path, the budget, the clusters, and
that the adapters share a base, target modules and orientation. The whole output (bank files and
every expanded adapter) is written under a temporary sibling and renamed into place.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracompress.bank.build import (
    REFINE_ITERATIONS,
    Bank,
    FitResult,
    assign_clusters,
    fit_bank,
    project_cores,
    relative_errors,
)
from loracompress.bank.checks import BankShape, check_adapters, folder_names
from loracompress.bank.io import BankFile, Member, manifest, read_bank, weights_sha256, write_bank
from loracompress.core.adapter import CONFIG_NAME, Adapter
from loracompress.core.budget import Budget
from loracompress.core.dtypes import parse_dtype
from loracompress.core.outputs import atomic_output_dir, check_output_path
from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError


@dataclass(kw_only=True)
class BankOptions:
    """What ``bank`` can be told. ``clusters``: ``auto`` or a number of clusters."""

    budget: str
    clusters: str = "auto"
    dtype: str | None = None  # None: the widest of the adapters'
    iterations: int = REFINE_ITERATIONS
    force: bool = False
    allow_nonfinite: bool = False


@dataclass(kw_only=True)
class BankAddOptions:
    """What ``bank-add`` can be told: ``refit`` refits clusters, bases and cores over every adapter."""

    refit: bool = False
    force: bool = False
    allow_nonfinite: bool = False


def parse_clusters(text: str | int) -> int | None:
    """``auto`` -> None; a positive integer -> itself."""
    raw = str(text).strip().lower()
    if raw == "auto":
        return None
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise LoraCompressError(f"--clusters {text!r}: give auto or a number of clusters (1, 2, ...)")


def _folder(source: str | Path) -> Path:
    """An adapter given by one of its files stands for its folder."""
    path = Path(source)
    return path.parent if path.is_file() and path.name in (CONFIG_NAME, "adapter_model.safetensors", "adapter_model.bin") else path


def _load(sources: Sequence[Path], allow_nonfinite: bool) -> list[Adapter]:
    return [load_adapter(s, allow_nonfinite=allow_nonfinite) for s in sources]


def _widest(adapters: Sequence[Adapter]) -> torch.dtype:
    return max((a.dtype for a in adapters), key=lambda d: torch.empty(0, dtype=d).element_size())


def _members(adapters: Sequence[Adapter], names: Sequence[str], sources: Sequence[Path], errors: Sequence[float],
             added: bool = False) -> list[Member]:
    return [Member(name=n, source=str(s.resolve()), sha256=weights_sha256(s), config=dict(a.config),
                   original_params=a.num_params, heads=dict(a.extra_tensors), relative_error=e, added=added)
            for a, n, s, e in zip(adapters, names, sources, errors)]


def _info(options: BankOptions, budget: Budget, fit: FitResult, original: int, seconds: float) -> dict[str, Any]:
    return {
        # the bank's own count and share are in the manifest's "params", recomputed when adapters are added
        "budget": {"text": budget.text, "kind": budget.kind, "target_params": fit.target, "of": "originals",
                   "original_params": original},
        "clusters": {"requested": options.clusters,
                     "search": [{"k": s.k, "labels": s.labels, "params": s.params, "mean_sq_error": s.mean_sq_error}
                                for s in fit.search]},
        "settings": {"refine_iterations": options.iterations, "choice": "lowest mean relative squared error at the budget",
                     "seconds": round(seconds, 3)},
    }


def bank(sources: Sequence[str | Path], output: str | Path, options: BankOptions) -> dict[str, Any]:
    """Compress the adapters at ``sources`` jointly into a bank at ``output``; returns its manifest."""
    t0 = time.perf_counter()
    folders = [_folder(s) for s in sources]
    if len(folders) < 2:
        raise LoraCompressError("a bank needs at least two adapters; for one adapter use `loracompress prune`")
    names = folder_names(folders)
    budget = Budget.parse(options.budget)
    clusters = parse_clusters(options.clusters)
    if options.iterations < 0:
        raise LoraCompressError("--refine must be 0 or more iterations")
    out = check_output_path(output, force=options.force, inputs=folders)
    adapters = _load(folders, options.allow_nonfinite)
    shape = check_adapters(adapters, names)
    dtype = parse_dtype(options.dtype) or _widest(adapters)
    original = sum(a.num_params for a in adapters)
    fit = fit_bank([a.modules for a in adapters], budget, original, torch.empty(0, dtype=dtype).element_size(),
                   clusters=clusters, iterations=options.iterations, dtype=dtype)
    bf = BankFile(bank=fit.bank, members=_members(adapters, names, folders, fit.errors), shape=shape, dtype=dtype,
                  info=_info(options, budget, fit, original, time.perf_counter() - t0))
    with atomic_output_dir(out, force=options.force, inputs=folders) as tmp:
        write_bank(bf, tmp)
    return manifest(bf)


def bank_add(bank_dir: str | Path, sources: Sequence[str | Path], output: str | Path,
             options: BankAddOptions) -> dict[str, Any]:
    """A new bank at ``output``: the bank at ``bank_dir`` plus the adapters at ``sources``.

    By default each new adapter is projected onto the frozen bases of the cluster that captures most of
    it (the old cores are kept as they are): the same cores a refit with frozen bases gives. ``refit``
    fits clusters, bases and cores anew over every adapter, at the bank's budget, from the original
    folders recorded in ``bank.json`` (refused if one is missing or changed).
    """
    t0 = time.perf_counter()
    folders = [_folder(s) for s in sources]
    if not folders:
        raise LoraCompressError("give at least one adapter to add")
    bf = read_bank(bank_dir)
    names = folder_names(folders)
    taken = {m.name for m in bf.members}
    for name, folder in zip(names, folders):
        if name in taken:
            raise LoraCompressError(f"the bank already holds an adapter named {name!r}; rename or copy the folder {folder}")
    out = check_output_path(output, force=options.force, inputs=[bank_dir, *folders])
    adapters = _load(folders, options.allow_nonfinite)
    for adapter, name in zip(adapters, names):
        bf.shape.check(adapter, name, f"the bank {bank_dir}")
    if options.refit:
        return _refit(bf, adapters, names, folders, out, options, [bank_dir, *folders], t0)
    bases = [{p: (U.double(), V.double()) for p, (U, V) in b.items()} for b in bf.bank.bases]
    mods = [a.modules for a in adapters]
    clusters = assign_clusters(mods, bases)
    cores = project_cores(mods, bases, clusters, bf.dtype)
    bank = Bank(shapes=bf.bank.shapes, clusters=bf.bank.clusters + clusters, bases=bf.bank.bases,
                cores=bf.bank.cores + cores)
    errors = relative_errors(mods, bank, range(len(bf.members), len(bank.clusters)))
    members = bf.members + _members(adapters, names, folders, errors, added=True)
    new = BankFile(bank=bank, members=members, shape=bf.shape, dtype=bf.dtype, info=bf.info)
    with atomic_output_dir(out, force=options.force, inputs=[bank_dir, *folders]) as tmp:
        write_bank(new, tmp)
    return manifest(new)


def _refit(bf: BankFile, adapters: list[Adapter], names: list[str], folders: list[Path], out: Path,
           options: BankAddOptions, inputs: list[str | Path], t0: float) -> dict[str, Any]:
    """``bank-add --refit``: the originals, checked against their recorded sha256, and the new adapters, banked anew."""
    old_folders = [Path(m.source) for m in bf.members]
    for m, folder in zip(bf.members, old_folders):
        if not (folder / CONFIG_NAME).is_file():
            raise LoraCompressError(f"--refit needs the original of {m.name!r} at {folder}, which is gone; restore it there "
                                    "or add without --refit")
        if weights_sha256(folder) != m.sha256:
            raise LoraCompressError(f"the original of {m.name!r} at {folder} changed since the bank was built (sha256 differs); "
                                    "restore it or build a new bank with `loracompress bank`")
    old = _load(old_folders, options.allow_nonfinite)
    every = old + adapters
    shape: BankShape = check_adapters(every, [m.name for m in bf.members] + names)
    recorded = bf.info.get("budget", {})
    settings = bf.info.get("settings", {})
    bank_options = BankOptions(budget=str(recorded.get("text")), clusters=str(bf.info.get("clusters", {}).get("requested", "auto")),
                               iterations=int(settings.get("refine_iterations", REFINE_ITERATIONS)))
    budget = Budget.parse(bank_options.budget)
    original = sum(a.num_params for a in every)
    fit = fit_bank([a.modules for a in every], budget, original, torch.empty(0, dtype=bf.dtype).element_size(),
                   clusters=parse_clusters(bank_options.clusters), iterations=bank_options.iterations, dtype=bf.dtype)
    members = (_members(old, [m.name for m in bf.members], old_folders, fit.errors[:len(old)])
               + _members(adapters, names, folders, fit.errors[len(old):]))
    new = BankFile(bank=fit.bank, members=members, shape=shape, dtype=bf.dtype,
                   info=_info(bank_options, budget, fit, original, time.perf_counter() - t0))
    inputs = [*inputs, *old_folders]
    with atomic_output_dir(out, force=options.force, inputs=inputs) as tmp:
        write_bank(new, tmp)
    return manifest(new)
