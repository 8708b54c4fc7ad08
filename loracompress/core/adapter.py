"""PEFT LoRA adapters in memory: :class:`LoraModule`, :class:`Adapter`, and the names of a PEFT folder's files
and of the safetensors metadata loracompress records.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
legacy ``adapter_model.bin``). Keys look like ``base_model.model.<path>.lora_A.weight``; we key
modules by ``<path>``, the module's name in the base model, which is also what PEFT matches
``rank_pattern`` / ``alpha_pattern`` / ``target_modules`` against. Reading is
:mod:`loracompress.core.reader` (``load_adapter``), writing the portable form :mod:`loracompress.core.writer`
(``save_adapter``), dtypes :mod:`loracompress.core.dtypes`.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loracompress.core.dtypes import dtype_name, parse_dtype
from loracompress.core.scope import KEY_PREFIX, Skipped
from loracompress.core.validate import require_finite, require_type
from loracompress.errors import LoraCompressError

__all__ = ["BIN_NAME", "CONFIG_NAME", "KEY_PREFIX", "NESTED_ORDER", "NESTED_RANGE_KEY", "NESTED_VALUES_KEY",
           "ORDER_KEY", "ORIGINAL_PARAMS_KEY", "SAFETENSORS_NAME", "Adapter", "LoraModule", "base_param_name",
           "dtype_name", "natural_key", "parse_dtype"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def base_param_name(key: str) -> str:
    """The base model's parameter name for a non-LoRA tensor of a PEFT file.

    ``modules_to_save`` copies (``classifier.modules_to_save.default.weight``), their originals
    (``.original_module.``) and the full weights PEFT stores for LoRA-targeted embedding layers
    (``save_embedding_layers``: ``lm_head.base_layer.weight``) all belong to ``classifier.weight`` /
    ``lm_head.weight`` of the base model.
    """
    bare = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    for infix in (".modules_to_save.default.", ".original_module.", ".base_layer."):
        bare = bare.replace(infix, ".")
    return bare
#: safetensors metadata key recording how an adapter's rank components are ordered.
ORDER_KEY = "loracompress.order"
#: the ``ORDER_KEY`` value of a nested adapter (DyLoRA): every leading cut of each module works
NESTED_ORDER = "dylora"
#: safetensors metadata of a nested adapter: JSON ``{module path: [value of each component, in order]}``
NESTED_VALUES_KEY = "loracompress.dylora.values"
#: safetensors metadata of a nested adapter: JSON ``{"min_params": .., "max_params": ..}``, the budgets trained
NESTED_RANGE_KEY = "loracompress.dylora.range"
#: safetensors metadata key recording the LoRA parameter count of the adapter a compressed one came from
#: (the first one of a chain: prune, then truncate, keeps the very original's); fractions refer to it
ORIGINAL_PARAMS_KEY = "loracompress.original_params"


def natural_key(path: str) -> list[Any]:
    """``layers.2`` sorts before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]



@dataclass
class LoraModule:
    """One LoRA pair: ``ΔW = scale · B @ A`` with ``A: [r, in]`` and ``B: [out, r]``.

    ``A``/``B`` are always in PEFT's orientation; ``fan_in_fan_out`` (GPT-2 ``Conv1D``) only
    says that the *base* weight is stored transposed, which matters when merging.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        require_type("LoraModule A", self.A, torch.Tensor, "a torch.Tensor [rank, in]")
        require_type("LoraModule B", self.B, torch.Tensor, "a torch.Tensor [out, rank]")
        require_type("LoraModule scale", self.scale, numbers.Real, "a number")
        require_finite("LoraModule scale", float(self.scale))
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise LoraCompressError(f"LoRA factors disagree: A {tuple(self.A.shape)}, B {tuple(self.B.shape)}; "
                                    "A is [rank, in] and B is [out, rank]")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def cost(self) -> int:
        """Parameters one rank component costs: a row of A plus a column of B."""
        return self.in_features + self.out_features

    @property
    def num_params(self) -> int:
        return self.rank * self.cost

    def delta(self) -> torch.Tensor:
        """Dense ``ΔW [out, in]`` in float32. For tests and small modules only."""
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class Adapter:
    """A LoRA adapter: modules keyed by their path in the base model, plus what rides along.

    ``extra_tensors`` holds everything in the file that is not a LoRA factor (for example a
    ``modules_to_save`` classifier head), keyed by the full file key; it is carried unchanged.
    ``skipped``: the LoRA modules and keys of the file PEFT does not load (see :mod:`loracompress.core.scope`),
    left out of ``modules``; reports list them.
    """

    modules: dict[str, LoraModule]
    config: dict[str, Any]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    metadata: dict[str, str] = field(default_factory=dict)
    source: Path | None = None
    skipped: list[Skipped] = field(default_factory=list)

    def __post_init__(self) -> None:
        require_type("Adapter modules", self.modules, dict, "a dict of module path -> LoraModule")
        for path, module in self.modules.items():
            require_type(f"Adapter module {path!r}", module, LoraModule, "a LoraModule")
        require_type("Adapter config", self.config, dict, "a dict (the adapter_config.json)")
        require_type("Adapter extra_tensors", self.extra_tensors, dict, "a dict of file key -> torch.Tensor")
        require_type("Adapter dtype", self.dtype, torch.dtype, "a torch dtype")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def num_params(self) -> int:
        """LoRA parameters (A and B of every module); extra tensors are counted apart."""
        return sum(m.num_params for m in self.modules.values())

    @property
    def extra_params(self) -> int:
        return sum(t.numel() for t in self.extra_tensors.values())

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    def num_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the LoRA factors at ``dtype`` (default: the adapter's own)."""
        itemsize = torch.empty(0, dtype=dtype or self.dtype).element_size()
        return self.num_params * itemsize

    @property
    def original_params(self) -> int | None:
        """LoRA parameters of the original this adapter was compressed from, when its metadata records them."""
        raw = self.metadata.get(ORIGINAL_PARAMS_KEY)
        try:
            n = int(raw) if raw is not None else None
        except ValueError:
            return None
        # A record smaller than this adapter cannot be of its original (compression only removes parameters):
        # a hand-edited or copied metadata value; a fraction of it would cut more than asked.
        if n is None or n <= 0 or n < self.num_params:
            return None
        return n

    def replace(self, modules: dict[str, LoraModule], **changes: Any) -> Adapter:
        """A new adapter with other modules (and optionally other fields); this one is untouched."""
        fields = {
            "config": dict(self.config),
            "extra_tensors": dict(self.extra_tensors),
            "dtype": self.dtype,
            "metadata": dict(self.metadata),
            "source": self.source,
            "skipped": list(self.skipped),
        }
        fields.update(changes)
        return Adapter(modules=modules, **fields)


