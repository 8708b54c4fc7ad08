"""Which base weights a merge goes into: ``--into dequantized|original`` and quantized bases.

- A quantized base folder (block FP8, bitsandbytes 4/8-bit) has no original weights: the merge goes
  into its dequantized weights (:class:`~loracompress.runtime.quantized.Dequantizer`), which is what
  the model computes with. GPTQ, AWQ and the other packed formats are refused by name.
- A 16-bit base whose adapter was trained on its 4-bit quantization (QLoRA: the adapter's model card or
  compression report says so, or ``--load-in-4bit``) is merged into ``dequant(NF4(W))`` by default
  (:class:`~loracompress.runtime.quantized.Requantizer`): the weights the adapter learned against.
  ``--into original`` merges into the 16-bit weights instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from loracompress.core.adapter import Adapter
from loracompress.errors import LoraCompressError
from loracompress.merging.checkpoint import Checkpoint, Reader
from loracompress.merging.plan import MergePlan
from loracompress.runtime.model import BaseModel, BaseStructure, resolve_base_model, restore_modules_to_save
from loracompress.runtime.quantized import (
    Bnb4Settings,
    Dequantizer,
    Requantizer,
    dequantizer,
    detect,
    detect_folder,
    quantized_linears,
    refusal,
    require_bitsandbytes,
    trained_in_4bit,
)


class _BaseChoice(Protocol):
    """What the refusal reads of :class:`~loracompress.pipelines.merge.MergeOptions` (a protocol: the
    merging package does not import the pipelines that call it)."""

    load_in_4bit: bool
    base_model: str | None

log = logging.getLogger(__name__)

INTO = ("dequantized", "original")


@dataclass
class Into:
    """The base weights a merge goes into, why, and the reader of quantized weights (None: as stored)."""

    into: str
    reason: str
    quant: Dequantizer | Requantizer | None = None

    def to_json(self) -> dict[str, Any]:
        return {"into": self.into, "into_reason": self.reason,
                "base_quantization": self.quant.describe() if self.quant is not None else None}


def check_into(value: str | None) -> str | None:
    if value is not None and value not in INTO:
        raise LoraCompressError(f"unknown --into {value!r}: use dequantized or original")
    return value


def choose_base(into: str | None, load_in_4bit: bool, source: str | Path, structure: BaseStructure,
                checkpoint: Checkpoint) -> Into:
    """Decide which weights the merge goes into; refuse a quantized format this tool cannot read."""
    entries = {k: (checkpoint.dtype(k), checkpoint.shape(k)) for k in checkpoint.entries}
    q = detect(structure.config, entries)
    if q is not None:
        if not q.supported:
            raise refusal(q)
        if into == "original":
            raise LoraCompressError(
                f"--into original: the base {structure.source!r} is {q.label}, its original 16-bit weights are not "
                "in it; pass the unquantized base with --base-model ORIGINAL, or drop --into"
            )
        if load_in_4bit and q.method != "bnb-4bit":
            raise LoraCompressError(f"--load-in-4bit: the base {structure.source!r} is {q.label} already; drop the flag")
        with _open(checkpoint) as reader:
            quant = dequantizer(q, entries, reader.raw)
        return Into("dequantized", f"the base is {q.label}: its weights are dequantized, then merged", quant)

    settings = Bnb4Settings(source="--load-in-4bit") if load_in_4bit else trained_in_4bit(source)
    if into is None:
        into = "dequantized" if settings is not None else "original"
    if into == "original":
        if settings is not None:
            log.warning("the adapter was trained on the 4-bit base (%s) but --into original merges it into the 16-bit "
                        "weights, which it was not trained against", settings.source)
            return Into("original", f"--into original, though the adapter was trained on the 4-bit base ({settings.source})")
        return Into("original", "the base is not quantized")
    require_bitsandbytes("--into dequantized")
    settings = settings or Bnb4Settings(source="QLoRA's defaults, --into dequantized")
    names = [n for n in quantized_linears(structure.model) if n in checkpoint.entries]
    quant = Requantizer(settings, {n: checkpoint.shape(n) for n in names})
    return Into("dequantized", f"the adapter was trained on the 4-bit base: merged into dequant(W4), {settings.describe()}",
                quant)


@contextmanager
def _open(checkpoint: Checkpoint) -> Iterator[Reader]:
    """A :class:`Reader` over ``checkpoint`` whose files are closed at the end of the block."""
    with ExitStack() as stack:
        yield Reader(checkpoint, stack)


def refuse_quantized_in_memory(options: _BaseChoice, adapter: Adapter, into: str | None, reason: str) -> None:
    """A base that cannot be streamed is loaded by transformers: never a quantized one (its loaded
    layers are not float weights a merge can add to), nor a merge into dequantized weights."""
    if options.load_in_4bit or into == "dequantized":
        raise LoraCompressError(f"--into dequantized / --load-in-4bit need the base as a local folder of safetensors "
                                f"weights ({reason}); pass --base-model FOLDER")
    path = Path(resolve_base_model(options.base_model, adapter)).expanduser()
    if path.is_dir():
        q = detect_folder(path)
        if q is not None:
            if not q.supported:
                raise refusal(q)
            raise LoraCompressError(f"the base model is {q.label} and cannot be merged shard by shard ({reason}); "
                                    "re-save it as safetensors, or merge into the unquantized base with --base-model ORIGINAL")


def dequantized_base(structure: BaseStructure, plan: MergePlan, adapter: Adapter) -> BaseModel:
    """The base as an fp32 model built from its dequantized weights (the full check's reference).

    transformers would load a quantized base as quantized layers (or not at all): the model is built
    from the config without ``quantization_config`` and every tensor is read through the plan's reader.
    """
    config = structure.config.__class__.from_dict(structure.config.to_dict())
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = type(structure.model)(config).to(torch.float32).eval()
    state = model.state_dict()
    ck = plan.checkpoint.entries
    folded = plan.quant.companions if plan.quant is not None else set()
    with ExitStack() as stack, torch.no_grad():
        reader = Reader(plan.checkpoint, stack, plan.quant)
        for key in ck:
            if key in state and key not in folded:
                value = reader.read(key)
                if tuple(value.shape) == tuple(state[key].shape):  # else resized: the adapter's copy follows
                    state[key].copy_(value.to(torch.float32))
    restore_modules_to_save(model, adapter, structure.source)
    return BaseModel(model=model, tokenizer=structure.tokenizer, source=structure.source, task_type=structure.task_type,
                     vocab_resized=structure.vocab_resized)
