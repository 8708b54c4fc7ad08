"""Turning a PyTorch model into an ONNX graph with the torch.onnx dynamo exporter.

Both modes export :class:`ServingModule`: ``input_ids``/``attention_mask`` (dynamic ``batch``
and ``sequence`` axes) in, the model's logits out. In adapters mode, named tensors (LoRA factors
and saved heads) are extra forward inputs that override the model's parameters through
``torch.func.functional_call``, so they become real graph inputs; post-processing the exported
initializers instead would be fragile, because the exporter folds transposes of weights into
new, renamed constants.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loracompress.errors import LoraCompressError
from loracompress.export.fold import fold_weight_transposes
from loracompress.export.probe import INPUT_NAMES, forward_kwargs
from loracompress.runtime.layers import base_shape
from loracompress.runtime.model import BaseModel

log = logging.getLogger(__name__)

#: Models whose initializers exceed this are saved with external data: written tensor by tensor, where one
#: protobuf file is serialized whole in memory (twice the weights at peak); protobuf's hard limit is 2 GiB.
EXTERNAL_DATA_BYTES = 256 * 2**20
ONNX_NAME = "model.onnx"


@dataclass
class ExportRun:
    """What one ONNX export works with, whichever the mode.

    ``example`` is the batch the exporter traces; ``probe`` (another shape, so the check also
    proves the dynamic axes) is what onnxruntime and PyTorch are compared on.
    """

    base: BaseModel
    out_dir: Path
    dtype: torch.dtype
    tolerance: float
    example: dict[str, torch.Tensor]
    probe: dict[str, torch.Tensor]
    prefer_gpu: bool = True


class ServingModule(nn.Module):
    """``(input_ids, attention_mask, *overrides) -> outputs``: the function that is exported."""

    def __init__(self, model: nn.Module, outputs: Sequence[str], override_names: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.outputs = list(outputs)
        self.override_names = list(override_names)
        self.kwargs = forward_kwargs(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *overrides: torch.Tensor) -> Any:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, **self.kwargs}
        if overrides:
            params = dict(zip(self.override_names, overrides))
            out = torch.func.functional_call(self.model, params, args=(), kwargs=kwargs, strict=False)
        else:
            out = self.model(**kwargs)
        values = tuple(getattr(out, n) if not isinstance(out, Mapping) else out[n] for n in self.outputs)
        return values[0] if len(values) == 1 else values


class InputLora(nn.Module):
    """A base layer plus ``x @ Aᵀ @ Bᵀ`` whose factors are overridden by graph inputs (scale 1)."""

    def __init__(self, base: nn.Module, rank: int = 2):
        super().__init__()
        shape = base_shape(base)
        if shape is None:
            raise TypeError(f"LoRA needs a Linear or Conv1D layer, got {type(base).__name__}")
        out_features, in_features = shape
        self.base = base
        weight = base.weight
        # Placeholders for tracing only: the graph reads real factors from its inputs. Rank 2
        # because torch.export specializes dimensions of size 0 and 1.
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=weight.dtype), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T


def insert_input_lora(model: nn.Module, paths: Sequence[str]) -> dict[str, InputLora]:
    """Wrap each Linear/Conv1D at ``paths`` in an :class:`InputLora` (in place)."""
    layers: dict[str, InputLora] = {}
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = InputLora(model.get_submodule(path))
        setattr(parent, name, layer)
        layers[path] = layer
    return layers


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs progress and optional-dependency warnings; keep them at debug level."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir", "torch.export", "torch._dynamo")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if not log.isEnabledFor(logging.DEBUG):
            lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx_program(
    module: ServingModule,
    example: Mapping[str, torch.Tensor],
    overrides: Mapping[str, torch.Tensor] | None = None,
    override_axes: Mapping[str, dict[int, str]] | None = None,
    optimize: bool = True,
) -> Any:
    """Run the dynamo exporter; returns a ``torch.onnx.ONNXProgram``.

    ``example`` holds ``input_ids``/``attention_mask``; ``overrides`` the extra named inputs in
    ``module.override_names`` order, ``override_axes`` their dynamic axes (e.g. a LoRA rank).
    ``optimize=False`` skips the exporter's graph optimizer, whose folded constants (transposed copies
    of every weight) all stay alive until the program is gone; :func:`save_program` folds the weight
    transposes lazily instead, and onnxruntime optimizes the rest when it loads the graph.
    """
    overrides = dict(overrides or {})
    axes = dict(override_axes or {})
    names = list(module.override_names)
    args = (example["input_ids"], example["attention_mask"], *(overrides[n] for n in names))
    token_axes = {0: "batch", 1: "sequence"}
    dynamic_shapes: tuple[Any, ...] = (token_axes, token_axes)
    if names:  # the *overrides varargs take one tuple of per-input specs
        dynamic_shapes += (tuple(axes.get(n) for n in names),)
    log.info("exporting %s with torch.onnx (dynamo)...", type(module.model).__name__)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                verbose=False,
                input_names=[*INPUT_NAMES, *names],
                output_names=list(module.outputs),
                dynamic_shapes=dynamic_shapes,
                external_data=True,
                optimize=optimize,
            )
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export this model"
        # The exporter's message is a long report; its one useful line is the summary of the cause.
        summary = re.search(r"<class '[^']+'>: (.+)", str(err))
        first = summary.group(1) if summary else (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoraCompressError(
            f"torch.onnx could not export {type(module.model).__name__} ({first[:200]}); "
            "rerun with --debug for the exporter's report"
        ) from err
    _check_dynamic(program)
    return program


def _check_dynamic(program: Any) -> None:
    for value in program.model.graph.inputs[: len(INPUT_NAMES)]:
        dims = list(value.shape or [])
        if any(isinstance(d, int) for d in dims):
            log.warning("the exported %s has fixed dimensions %s: this model specialized them during export", value.name, dims)


def initializer_bytes(program: Any) -> int:
    total = 0
    for value in program.model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(tensor.nbytes)
    return total


def save_program(program: Any, directory: Path, name: str = ONNX_NAME) -> list[Path]:
    """Write the graph (with ``<name>.data`` external data past 2 GB); returns the files written.

    Weight transposes are folded into the written weights first (:mod:`loracompress.export.fold`).
    """
    fold_weight_transposes(program.model)
    external = initializer_bytes(program) > EXTERNAL_DATA_BYTES
    path = directory / name
    program.save(str(path), external_data=external)
    files = [path]
    data = directory / f"{name}.data"
    if data.exists():
        files.append(data)
    return files


def model_metadata(program: Any, entries: Mapping[str, str]) -> None:
    """Record ``entries`` as ONNX ``metadata_props`` (visible in onnxruntime's model metadata)."""
    for key, value in entries.items():
        program.model.metadata_props[key] = value
