"""One base weight plus its ``ΔW``, and the ties and dtypes around it: written once, used by every merge."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loracompress.core.adapter import Adapter, LoraModule
from loracompress.core.dtypes import FLOATS, MERGEABLE
from loracompress.errors import LoraCompressError
from loracompress.runtime.layers import base_shape


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``, which stores its weight as ``[in, out]`` (``ΔW`` is added transposed)."""
    return type(module).__name__ == "Conv1D" and base_shape(module) is not None


def add_delta(weight: torch.Tensor, module: LoraModule, transposed: bool = False) -> torch.Tensor:
    """``W + ΔW`` in float32, as a new tensor in ``weight``'s orientation (``weight`` is never changed).

    ``transposed``: ``weight`` is stored ``[in, out]`` (:func:`is_conv1d`). The caller rounds the
    result once to the dtype it writes.
    """
    merged = weight.to(torch.float32, copy=True)
    (merged.T if transposed else merged).add_(module.delta().to(merged.device))
    return merged


def oriented_weight(model: nn.Module, path: str) -> torch.Tensor:
    """A module's weight as ``[out, in]`` in float32 (a view of ``Conv1D``'s ``[in, out]``)."""
    target = model.get_submodule(path)
    w = target.weight.detach().float()
    return w.T if is_conv1d(target) else w


def tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter name -> every name sharing that tensor (itself included)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {name: names for names in owners.values() for name in names}


def tied_targets(model: nn.Module, adapter: Adapter) -> list[str]:
    """The weights the adapter changes that share their tensor with another parameter (a tied head)."""
    groups = tied_groups(model)
    return sorted(f"{p}.weight" for p, m in adapter.modules.items() if m.rank and len(groups.get(f"{p}.weight", [])) > 1)


def untie_config(config: Any) -> None:
    """Stop ``config`` declaring tied word embeddings (multimodal configs keep the flag on their text part)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in (config, text):
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


def untie(model: nn.Module, names: list[str]) -> None:
    """Give each named weight that is shared with another parameter (a tied ``lm_head`` and input
    embeddings) its own copy, so a merge changes only the layer the adapter targets.

    The config stops declaring the tie, so the saved model reloads with both tensors as saved.
    """
    groups = tied_groups(model)
    untied = False
    for name in names:
        if len(groups.get(name, [])) > 1:
            module_path, _, attr = name.rpartition(".")
            module = model.get_submodule(module_path)
            weight = getattr(module, attr)
            setattr(module, attr, nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
            untied = True
    config = getattr(model, "config", None)
    if untied and config is not None:
        untie_config(config)


def published_dtype(config: Any) -> torch.dtype | None:
    """The floating dtype a model config says its weights were saved in, else ``None``.

    Read from the config on disk: transformers overwrites a loaded model's with the dtype it loaded in.
    """
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in FLOATS else None


def require_float_weights(model: nn.Module, adapter: Adapter) -> None:
    """Refuse to add ``ΔW`` to a weight that is not a float (FP8 values without their scales, packed
    4-bit or int8): the sum would not be the merged weight, the adapter would be lost."""
    for path, m in adapter.modules.items():
        weight = getattr(model.get_submodule(path), "weight", None)
        if m.rank and weight is not None and weight.dtype not in MERGEABLE:
            raise LoraCompressError(f"{path}.weight is {str(weight.dtype).replace('torch.', '')}: the base is quantized "
                                    "and must be dequantized before a merge; use the unquantized base with --base-model ORIGINAL")
