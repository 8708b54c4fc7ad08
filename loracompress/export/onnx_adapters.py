"""ONNX ``--mode adapters``: one base graph, LoRA factors as optional inputs, ``.onnx_adapter`` files.

Every LoRA module of the graph has two inputs, ``<path>.lora_A`` ``[r_<path>, in]`` and
``<path>.lora_B`` ``[out, r_<path>]``, each with its OWN rank dimension (one shared rank name
would tell onnxruntime that all modules have the same rank, which breaks adapters whose
modules were compressed to different ranks). Each input also has a default initializer of rank
0, so the graph runs the plain base model when no adapter is active. Saved heads
(``modules_to_save``, e.g. a classifier) are inputs too, defaulting to the first adapter's.

The scale is folded into the factors (our portable form: scale 1), so an ``.onnx_adapter``
holds exactly what is fed. Activate one with ``RunOptions.add_active_adapter``; IO binding
ignores active adapters, so with IO binding bind the factors as inputs instead (docs/serving.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loracompress.core import jsonio
from loracompress.core.adapter import KEY_PREFIX, Adapter
from loracompress.core.dtypes import dtype_name, parse_dtype
from loracompress.core.writer import portable_tensors
from loracompress.errors import LoraCompressError
from loracompress.export.graph import (
    ONNX_NAME,
    ExportRun,
    ServingModule,
    export_onnx_program,
    insert_input_lora,
    model_metadata,
    save_program,
)
from loracompress.export.memory import fp32_compute, release
from loracompress.export.probe import applied, model_outputs, saved_module_params
from loracompress.export.registry import REPORT_NAME
from loracompress.export.verify import (
    DEFAULT_TOLERANCE,
    Check,
    compare,
    import_onnxruntime,
    open_session,
    require_passed,
    run_session,
)
from loracompress.runtime.layers import base_shape, check_fit

log = logging.getLogger(__name__)

ADAPTER_SUFFIX = ".onnx_adapter"
_META = "loracompress.graph"
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def a_name(path: str) -> str:
    return f"{path}.lora_A"


def b_name(path: str) -> str:
    return f"{path}.lora_B"


def rank_dim(path: str) -> str:
    return f"r_{path}"


@dataclass
class GraphSpec:
    """What an adapters-mode graph accepts: LoRA modules ``path -> (in, out)``, saved heads, dtype."""

    lora: dict[str, tuple[int, int]]
    heads: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtype: str = "fp32"

    @property
    def version(self) -> int:
        """A 31-bit fingerprint written as the ``.onnx_adapter`` model version: adapter and graph must agree."""
        text = jsonio.dumps([sorted(self.lora.items()), sorted(self.heads.items()), self.dtype])
        return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF

    def to_json(self) -> dict[str, Any]:
        return {"lora": {k: list(v) for k, v in self.lora.items()}, "heads": {k: list(v) for k, v in self.heads.items()},
                "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GraphSpec:
        return cls(lora={k: (int(v[0]), int(v[1])) for k, v in data["lora"].items()},
                   heads={k: tuple(int(x) for x in v) for k, v in data.get("heads", {}).items()},
                   dtype=str(data.get("dtype", "fp32")))


def graph_spec_for(model: torch.nn.Module, adapters: Sequence[Adapter], dtype: torch.dtype) -> GraphSpec:
    """The union of the adapters' LoRA modules (rank > 0) and saved heads, checked against ``model``."""
    paths: set[str] = set()
    heads: dict[str, tuple[int, ...]] = {}
    params = dict(model.named_parameters())
    for adapter in adapters:
        check_fit(model, adapter)
        paths.update(p for p, m in adapter.modules.items() if m.rank > 0)
        for name, tensor in saved_module_params(adapter).items():
            if name not in params:
                raise LoraCompressError(
                    f"the adapter saves {name} (modules_to_save) but the base model has no such parameter; wrong --base-model?"
                )
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise LoraCompressError(
                    f"{name}: the adapter's saved tensor is {tuple(tensor.shape)} but the model has {tuple(params[name].shape)}; "
                    "adapters served from one graph need heads of the same shape"
                )
            heads[name] = tuple(tensor.shape)
    if not paths:
        raise LoraCompressError("the adapters have no LoRA module of rank > 0; there is nothing to serve as an adapter")
    lora = {}
    for path, module in model.named_modules():  # the model's own order: layer 2 before layer 10
        if path in paths:
            out_f, in_f = base_shape(module) or (0, 0)
            lora[path] = (in_f, out_f)
    return GraphSpec(lora=lora, heads=dict(sorted(heads.items())), dtype=dtype_name(dtype))


def adapter_params(adapter: Adapter, spec: GraphSpec) -> dict[str, np.ndarray]:
    """The tensors an ``.onnx_adapter`` holds for ``adapter``: folded factors and saved heads.

    Modules the adapter does not have (or pruned to rank 0) are left out: the graph's rank-0
    default makes them a no-op.
    """
    np_dtype = _NP_DTYPES[spec.dtype]
    tensors = portable_tensors(adapter, torch.float32)
    params: dict[str, np.ndarray] = {}
    for path, m in adapter.modules.items():
        if m.rank == 0:
            continue
        if path not in spec.lora:
            raise LoraCompressError(
                f"module {path} of the adapter is not a LoRA input of the graph; re-export the graph with this adapter "
                "(export --mode adapters ADAPTER...)"
            )
        if (m.in_features, m.out_features) != spec.lora[path]:
            raise LoraCompressError(
                f"module {path}: the adapter is {m.out_features}×{m.in_features} but the graph expects "
                f"{spec.lora[path][1]}×{spec.lora[path][0]}; this adapter belongs to another base model"
            )
        params[a_name(path)] = tensors[f"{KEY_PREFIX}{path}.lora_A.weight"].numpy().astype(np_dtype)
        params[b_name(path)] = tensors[f"{KEY_PREFIX}{path}.lora_B.weight"].numpy().astype(np_dtype)
    for name, tensor in saved_module_params(adapter).items():
        if spec.heads.get(name) != tuple(tensor.shape):
            raise LoraCompressError(
                f"the adapter saves {name} {tuple(tensor.shape)} but the graph has no input of that shape; "
                "re-export the graph with this adapter"
            )
        params[name] = tensor.float().numpy().astype(np_dtype)
    return params


def write_onnx_adapter(params: dict[str, np.ndarray], path: Path, model_version: int, adapter_version: int = 1) -> None:
    """Write onnxruntime's adapter format (flatbuffers) with ``AdapterFormat``."""
    ort = import_onnxruntime()
    if not hasattr(ort, "AdapterFormat"):
        raise LoraCompressError(
            f"onnxruntime {ort.__version__} cannot write LoRA adapter files; pip install 'onnxruntime>=1.20' for --mode adapters"
        )
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    values = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))


def _make_optional_inputs(program: Any, spec: GraphSpec, head_defaults: dict[str, np.ndarray]) -> None:
    """Give every LoRA input a rank-0 default and every head input the loaded head as default."""
    import onnx_ir as ir

    np_dtype = _NP_DTYPES[spec.dtype]
    graph = program.model.graph
    by_name = {v.name: v for v in graph.inputs}
    for path, (in_f, out_f) in spec.lora.items():
        for name, shape, zero in ((a_name(path), [rank_dim(path), in_f], (0, in_f)),
                                  (b_name(path), [out_f, rank_dim(path)], (out_f, 0))):
            value = by_name[name]
            value.shape = ir.Shape(shape)  # make sure each module has its own named rank dimension
            value.const_value = ir.Tensor(np.zeros(zero, dtype=np_dtype), name=name)
            graph.register_initializer(value)
    for name, default in head_defaults.items():
        value = by_name[name]
        value.const_value = ir.Tensor(np.ascontiguousarray(default.astype(np_dtype)), name=name)
        graph.register_initializer(value)


def build_graph(model: torch.nn.Module, spec: GraphSpec, outputs: list[str], example: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """Export ``model`` (changed in place) with LoRA factors and heads as optional inputs."""
    params = dict(model.named_parameters())
    head_defaults = {name: params[name].detach().float().cpu().numpy() for name in spec.heads}
    layers = insert_input_lora(model, list(spec.lora))
    model.to(dtype)
    names: list[str] = []
    overrides: dict[str, torch.Tensor] = {}
    axes: dict[str, dict[int, str]] = {}
    for path, layer in layers.items():
        names += [a_name(path), b_name(path)]
        overrides[a_name(path)] = layer.lora_A.detach()
        overrides[b_name(path)] = layer.lora_B.detach()
        axes[a_name(path)] = {0: rank_dim(path)}
        axes[b_name(path)] = {1: rank_dim(path)}
    params = dict(model.named_parameters())
    for name in spec.heads:
        names.append(name)
        overrides[name] = params[name].detach()
    program = export_onnx_program(ServingModule(model, outputs, names), example, overrides, axes, optimize=False)
    _make_optional_inputs(program, spec, head_defaults)
    model_metadata(program, {"loracompress.mode": "adapters", _META: jsonio.dumps(spec.to_json())})
    return program


def read_graph_spec(graph: Path) -> tuple[Path, GraphSpec]:
    """The ``model.onnx`` of an adapters-mode export (folder or file) and what it accepts."""
    import onnx

    path = graph / ONNX_NAME if graph.is_dir() else graph
    if not path.is_file():
        raise LoraCompressError(f"{graph}: no {ONNX_NAME} found; pass the folder written by export --mode adapters")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
        raise LoraCompressError(f"{path}: not a readable ONNX model ({str(err)[:120]})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if _META not in meta:
        raise LoraCompressError(
            f"{path} was not written by export --mode adapters (no LoRA inputs recorded); export the graph with --mode adapters first"
        )
    return path, GraphSpec.from_json(json.loads(meta[_META]))


def _recorded_base(graph: Path) -> str:
    """`` (its export_report.json names X)`` when the graph's record says which base it was made from."""
    try:
        base = json.loads((graph / REPORT_NAME).read_text(encoding="utf-8")).get("base_model")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (its {REPORT_NAME} names {base!r})" if isinstance(base, str) and base else ""


def adapter_file_names(adapters: Sequence[Adapter]) -> list[str]:
    """``<adapter folder name>.onnx_adapter``, made unique and file-system safe."""
    names: list[str] = []
    for i, adapter in enumerate(adapters):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", adapter.source.name if adapter.source else f"adapter{i}") or f"adapter{i}"
        name, k = stem, 2
        while f"{name}{ADAPTER_SUFFIX}" in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(f"{name}{ADAPTER_SUFFIX}")
    return names


def export_adapters(adapters: Sequence[Adapter], run: ExportRun, graph: Path | None = None) -> dict[str, Any]:
    """Write the shared graph (unless ``graph`` names an existing one) and one adapter file each.

    Verified on ``probe``: the base-only run against the base model, and each adapter (active
    through ``RunOptions``) against PyTorch base+adapter. ``run.base.model`` is changed in place.
    """
    model, probe, out_dir, dtype, tolerance = run.base.model, run.probe, run.out_dir, run.dtype, run.tolerance
    with fp32_compute(model):  # the reference in fp32 whatever dtype the base is held in
        reference_base = model_outputs(model, probe)
    outputs = list(reference_base)
    references = []
    for adapter in adapters:
        with applied(model, adapter), fp32_compute(model):
            references.append(model_outputs(model, probe, outputs))

    files: list[str] = []
    if graph is None:
        spec = graph_spec_for(model, adapters, dtype)
        program = build_graph(model, spec, outputs, run.example, dtype)
        files += [f.name for f in save_program(program, out_dir)]
        del program
        graph_path = out_dir / ONNX_NAME
    else:
        graph_path, spec = read_graph_spec(graph)
        if spec.dtype != dtype_name(dtype):
            log.info("the graph is %s; writing %s adapter files to match", spec.dtype, spec.dtype)

    adapter_files = []
    names = adapter_file_names(adapters)
    for i, (adapter, name) in enumerate(zip(adapters, names)):
        params = adapter_params(adapter, spec)
        write_onnx_adapter(params, out_dir / name, model_version=spec.version, adapter_version=i + 1)
        files.append(name)
        adapter_files.append({
            "file": name,
            "source": str(adapter.source) if adapter.source else None,
            "ranks": {p: m.rank for p, m in adapter.modules.items() if m.rank > 0},
            "parameters": int(sum(v.size for v in params.values())),
        })

    # An existing graph's heads default to those of the adapter it was made with; the base-only reference
    # has this run's heads (loaded with the base), so they are fed in: what is left to differ is the base.
    named = dict(model.named_parameters())
    head_feeds = {} if graph is None else {  # copies: the model is released next
        name: named[name].detach().to(parse_dtype(spec.dtype)).cpu().clone().numpy() for name in spec.heads if name in named}
    del named
    release(model)  # onnxruntime loads the graph next: never both copies at once
    session = open_session(graph_path, prefer_gpu=run.prefer_gpu)
    checks: list[Check] = []
    got = run_session(session, probe, outputs, extra_feeds=head_feeds)
    base_only = compare("base only (no adapter active)", got, reference_base, probe["attention_mask"], tolerance)
    # Beyond the dtype's default tolerance the graph holds another base's weights than this run's: no
    # --tolerance can make adapter files for it right (below it, a strict --tolerance is reported as such).
    if graph is not None and base_only.max_abs_diff > DEFAULT_TOLERANCE.get(spec.dtype, DEFAULT_TOLERANCE["fp16"]):
        raise LoraCompressError(
            f"the graph in {graph} was exported from another base model than {run.base.source!r} (with no adapter "
            f"active the two differ by {base_only.max_abs_diff:.3g}): the base differs, so adapter files for it would "
            f"be wrong; pass the graph's own base as --base-model{_recorded_base(graph)}, or export a new graph"
        )
    checks.append(base_only)
    for name, ref in zip(names, references):
        got = run_session(session, probe, outputs, adapter_file=out_dir / name)
        checks.append(compare(name, got, ref, probe["attention_mask"], tolerance))
    require_passed(checks, "the exported ONNX adapters graph")
    return {
        "outputs": outputs,
        "graph": str(graph_path) if graph is not None else ONNX_NAME,
        "graph_version": spec.version,
        "lora_modules": len(spec.lora),
        "heads": list(spec.heads),
        "adapters": adapter_files,
        "provider": session.provider,
        "provider_reason": session.why,
        "checks": [c.to_json() for c in checks],
        "files": files,
    }
