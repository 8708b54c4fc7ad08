"""``export --format onnx``: merged or multi-LoRA ONNX, verified with onnxruntime (or, for causal LMs, a
generating onnxruntime-genai folder: :mod:`loracompress.export.genai`).

``export_onnx`` is a path in, a path out: adapters and a base model in, a verified ONNX folder
out (``model.onnx``, ``*.onnx_adapter``, tokenizer, ``export_report.json``), written atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracompress.core import jsonio
from loracompress.core.adapter import Adapter
from loracompress.core.dtypes import parse_dtype
from loracompress.core.outputs import atomic_output_dir, check_output_path
from loracompress.core.reader import load_adapter
from loracompress.core.units import human_bytes
from loracompress.errors import LoraCompressError
from loracompress.export.options import GraphOptions, check_same_base, shared
from loracompress.export.registry import REPORT_NAME, ExportFormat, ExportReport, register_format

__all__ = ["DEVICES", "ENGINES", "MODES", "OnnxOptions", "OnnxReport", "export_onnx"]

log = logging.getLogger(__name__)

MODES = ("merged", "adapters")
#: ``--engine``: genai (onnxruntime-genai: a generating decoder with KV cache, the default for causal
#: LMs) or ort (one forward pass, plain onnxruntime: encoders, classifiers, scoring).
ENGINES = ("auto", "genai", "ort")
ONNX_DTYPES = ("fp32", "fp16")
#: ``--device``: where onnxruntime verifies the graph (auto: a GPU provider when there is one)
DEVICES = ("auto", "cpu", "cuda")


@dataclass(kw_only=True)
class OnnxOptions(GraphOptions):
    """Everything ``export --format onnx`` can be told: the shared graph options, and these."""

    adapter_only: bool = False
    graph: str | None = None
    device: str = "auto"
    engine: str = "auto"

    @property
    def prefer_gpu(self) -> bool:
        return self.device != "cpu"


class OnnxReport(ExportReport):
    """What ``export --format onnx`` (onnxruntime) wrote and how it was verified."""

    def lines(self) -> list[str]:
        what = "adapter files for the existing graph" if self["adapter_only"] else f"{self['mode']} ONNX ({self['dtype']})"
        out = [f"exported {what}; verified with onnxruntime on {self['provider']} ({self['provider_reason']})"]
        out += [f"  {c['name']}: max abs difference vs PyTorch {c['max_abs_diff']:.3g} (tolerance {c['tolerance']:.3g})"
                for c in self["checks"]]
        out += [f"  {name}: {human_bytes(size)}" for name, size in self["file_bytes"].items()]
        return [*out, f"wrote {self['output']} (and {REPORT_NAME})"]

    def skipped(self) -> list[dict[str, str]]:
        """Every source's left-out keys (the record keeps them per source)."""
        return [key for keys in (self.get("skipped") or {}).values() for key in keys]


def uses_genai(options: OnnxOptions, task_type: str | None) -> bool:
    """Causal LMs go to onnxruntime-genai unless ``--engine ort``; everything else stays on onnxruntime."""
    if options.engine not in ENGINES:
        raise LoraCompressError(f"unknown --engine {options.engine!r}: use genai or ort")
    causal = str(task_type or "").upper() == "CAUSAL_LM"
    if options.engine == "genai" and not causal:
        raise LoraCompressError("--engine genai exports causal LMs (task_type CAUSAL_LM); this adapter is not one: use --engine ort")
    return options.engine == "genai" or (options.engine == "auto" and causal)


def _validate(sources: Sequence[str | Path], options: OnnxOptions) -> torch.dtype:
    if options.device not in DEVICES and not options.device.startswith("cuda:"):
        raise LoraCompressError(f"unknown --device {options.device!r}; use auto, cpu or cuda")
    if options.mode not in MODES:
        raise LoraCompressError(f"unknown --mode {options.mode!r}: use merged or adapters")
    dtype = parse_dtype(options.dtype) or torch.float32
    if dtype not in (torch.float32, torch.float16):
        raise LoraCompressError(f"ONNX export supports --dtype fp32 or fp16, not {options.dtype}")
    if not sources:
        raise LoraCompressError("pass at least one adapter folder")
    if options.mode == "merged" and len(sources) > 1:
        raise LoraCompressError(
            "--mode merged takes one adapter; to serve several adapters of one base use --mode adapters"
        )
    if options.adapter_only and (options.mode != "adapters" or not options.graph):
        raise LoraCompressError("--adapter-only needs --mode adapters and --graph DIR (an existing adapters-mode export)")
    if options.graph and not options.adapter_only:
        raise LoraCompressError("--graph is only used with --adapter-only")
    return dtype


def export_onnx(sources: Sequence[str | Path], output: str | Path, options: OnnxOptions) -> ExportReport:
    """Export adapter(s) and their base model to ONNX, verify with onnxruntime, write atomically.

    Returns the export report (also written as ``export_report.json``).

    Raises:
        LoraCompressError: bad input, or the ONNX model does not match PyTorch within the tolerance.
    """
    from loracompress.export.graph import ExportRun
    from loracompress.export.probe import probe_batch
    from loracompress.export.verify import import_onnxruntime, resolve_tolerance
    from loracompress.runtime.data import prepare_model
    from loracompress.runtime.model import load_base_model, resolve_base_model
    from loracompress.runtime.quantized import float_model, refuse_packed

    t0 = time.perf_counter()
    dtype = _validate(sources, options)
    # The output is checked first, whichever engine: a path that --force may not replace is refused
    # the same way whether or not the engine is installed.
    inputs = [*sources, options.base_model, options.graph]
    out = check_output_path(output, force=options.force, inputs=inputs)
    adapters = [load_adapter(s, allow_nonfinite=options.allow_nonfinite) for s in sources]  # each read once
    check_same_base(adapters, options)
    if uses_genai(options, adapters[0].config.get("task_type")):
        return _export_genai(sources, output, options, adapters)
    import_onnxruntime()
    tasks = {str(a.config.get("task_type")) for a in adapters}
    if len(tasks) > 1:
        raise LoraCompressError(f"the adapters have different task types ({', '.join(sorted(tasks))}); one graph serves one task")
    if str(adapters[0].config.get("task_type") or "").upper() == "SEQ_2_SEQ_LM":
        raise LoraCompressError("ONNX export supports encoder-only and decoder-only models, not SEQ_2_SEQ_LM; use merge instead")
    from loracompress.export.memory import storage_dtype

    # Held in its published 16-bit dtype when it has one (half of fp32); references still run in fp32.
    held = storage_dtype(options.base_model, adapters[0], trust_remote_code=options.trust_remote_code)
    base_name = resolve_base_model(options.base_model, adapters[0])
    refuse_packed(base_name, "exporting it")  # GPTQ, AWQ, ...: by name, not as a failed load
    base = load_base_model(options.base_model, adapters[0], dtype=held, trust_remote_code=options.trust_remote_code)
    base.model = float_model(base.model, "exporting it")  # bitsandbytes layers dequantized, as merge does
    prepare_model(base)  # classifiers with a decoder body find each sequence's end by the pad id
    name = "fp16" if dtype == torch.float16 else "fp32"
    if options.adapter_only:
        from loracompress.export.onnx_adapters import read_graph_spec

        name = read_graph_spec(Path(options.graph))[1].dtype  # the graph decides the dtype
    tolerance = resolve_tolerance(options.tolerance, name)
    # The traced example and the checked probe differ in shape: the check also proves the dynamic axes.
    example = probe_batch(base.model, base.tokenizer, batch=2, seq=16, seed=0)
    probe = probe_batch(base.model, base.tokenizer, batch=3, seq=13, seed=1)

    with atomic_output_dir(out, force=options.force, inputs=inputs) as tmp:
        if options.mode == "merged":
            from loracompress.export.onnx_merged import export_merged

            result = export_merged(adapters[0], ExportRun(base, tmp, dtype, tolerance, example, probe, options.prefer_gpu))
        else:
            from loracompress.export.onnx_adapters import export_adapters

            run = ExportRun(base, tmp, parse_dtype(name) or dtype, tolerance, example, probe, options.prefer_gpu)
            result = export_adapters(adapters, run, graph=Path(options.graph) if options.adapter_only else None)
        if not options.adapter_only:
            _write_model_files(base, tmp)
        report = _report(sources, out, options, name, tolerance, base.source, result, tmp, time.perf_counter() - t0)
        # what PEFT does not load, per source: not exported
        report["skipped"] = {str(s): [k.to_json() for k in a.skipped] for s, a in zip(sources, adapters) if a.skipped}
        jsonio.write_json(tmp / REPORT_NAME, report)
    return OnnxReport(report)


def _export_genai(sources: Sequence[str | Path], output: str | Path, options: OnnxOptions,
                  adapters: Sequence[Adapter]) -> ExportReport:
    """The causal-LM export, on the adapters already read here (each file is read once)."""
    from loracompress.export.genai import GenaiOptions, export_genai

    if options.adapter_only or options.graph:
        raise LoraCompressError("--adapter-only is not supported with --engine genai yet; export all adapters together")
    return export_genai(sources, output, GenaiOptions(**shared(options)), adapters=adapters)


def _write_model_files(base: Any, directory: Path) -> None:
    """config.json and the tokenizer beside the graph, so the folder is all a server needs."""
    config = getattr(base.model, "config", None)
    if config is not None:
        config.save_pretrained(str(directory))
    if base.tokenizer is not None:
        base.tokenizer.save_pretrained(str(directory))


def _report(sources: Sequence[str | Path], out: Path, options: OnnxOptions, dtype: str, tolerance: float,
            base_source: str, result: dict[str, Any], tmp: Path, seconds: float) -> dict[str, Any]:
    import onnx
    import onnxruntime

    sizes = {name: (tmp / name).stat().st_size for name in result["files"] if (tmp / name).exists()}
    return {
        "format": "onnx",
        "mode": "adapters" if options.adapter_only else options.mode,
        "adapter_only": options.adapter_only,
        "dtype": dtype,
        "sources": [str(s) for s in sources],
        "output": str(out),
        "base_model": base_source,
        "tolerance": tolerance,
        "max_abs_diff": max((c["max_abs_diff"] for c in result["checks"]), default=0.0),
        **result,
        "file_bytes": sizes,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "seconds": round(seconds, 2),
    }


register_format(ExportFormat("onnx", "merged or multi-LoRA ONNX, verified with onnxruntime (causal LMs: onnxruntime-genai)",
                             OnnxOptions, export_onnx, many=True))
