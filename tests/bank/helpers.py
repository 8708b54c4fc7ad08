"""Adapters of one tiny base for bank tests: independent ones, and groups that share subspaces."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.tiny import make_adapter


def adapters_of_one_base(root: Path, n: int, kind: str = "llama", r: int = 4, **kw) -> tuple[list[Path], torch.nn.Module]:
    """``n`` stock PEFT adapters with different random weights on the same tiny base."""
    paths = []
    base = None
    for i in range(n):
        path, base = make_adapter(kind, root / f"ad{i}", r=r, lora_seed=100 + i, **kw)
        paths.append(path)
    assert base is not None
    return paths, base


def rewrite(folder: Path, tensors: dict[str, torch.Tensor] | None = None, **config: object) -> None:
    """Replace an adapter folder's weights and/or config fields in place (test inputs only)."""
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))


def grouped_adapters(root: Path, groups: list[int], r: int = 4) -> tuple[list[Path], torch.nn.Module]:
    """Adapter ``i`` lives in subspace group ``groups[i]``: its B in that group's half of each module's output
    rows and its A in that half of the input columns, ``ΔWᵢ = B_g Mᵢ A_g`` with a group-wide ``B_g``, ``A_g``
    and a per-adapter mixing ``Mᵢ``. Groups 0 and 1 are orthogonal; adapters of a group share their spans."""
    paths, base = adapters_of_one_base(root, len(groups), r=r)
    shared: dict[tuple[int, str], torch.Tensor] = {}
    g = torch.Generator().manual_seed(7)
    for i, (path, group) in enumerate(zip(paths, groups)):
        tensors = load_file(str(path / "adapter_model.safetensors"))
        for key, t in tensors.items():
            if ".lora_B." in key:
                out = t.shape[0]
                half = slice(group * out // 2, (group + 1) * out // 2)
                if (group, key) not in shared:
                    Bg = torch.zeros_like(t)
                    Bg[half] = torch.randn(out // 2, r, generator=g) * 0.3
                    shared[(group, key)] = Bg
                mix = torch.randn(r, r, generator=torch.Generator().manual_seed(1000 + i))
                tensors[key] = shared[(group, key)] @ mix
            elif ".lora_A." in key:
                inn = t.shape[1]
                half = slice(group * inn // 2, (group + 1) * inn // 2)
                if (group, key) not in shared:
                    Ag = torch.zeros_like(t)
                    Ag[:, half] = torch.randn(r, inn // 2, generator=g) / (inn // 2) ** 0.5
                    shared[(group, key)] = Ag
                tensors[key] = shared[(group, key)].clone()
        rewrite(path, tensors)
    return paths, base
