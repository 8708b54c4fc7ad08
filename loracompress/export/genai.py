"""``export --format onnx`` for causal LMs: a folder that onnxruntime-genai generates from as is.

Path in, path out: adapters and their base model in; out a folder with ``model.onnx`` (+ data),
a decoder with a KV cache built by onnxruntime-genai's own model builder, ``genai_config.json``,
the tokenizer and ``export_report.json``. Modes:

* ``merged``: the adapter folded into the base weights; a plain base graph.
* ``adapters``: one base graph whose LoRA factors are inputs with one rank dimension per module,
  and one ``.onnx_adapter`` per adapter (names match the graph), so rank-heterogeneous adapters,
  and no adapter at all, run on that graph through ``og.Adapters``.

Nothing is written unless greedy generation under onnxruntime-genai gives PEFT's tokens and the
first step's logits are within the tolerance (:mod:`loracompress.export.genai_verify`).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracompress.core import jsonio
from loracompress.core.adapter import KEY_PREFIX, Adapter
from loracompress.core.outputs import atomic_output_dir, check_output_path
from loracompress.core.reader import load_adapter
from loracompress.core.units import human_bytes
from loracompress.errors import LoraCompressError
from loracompress.export.genai_graph import (
    GRAPH_NAME,
    GenaiGraphSpec,
    adapter_arrays,
    import_genai,
    make_lora_inputs,
    provider_options,
    run_builder,
)
from loracompress.export.genai_verify import (
    DEFAULT_NEW_TOKENS,
    DEFAULT_PROMPTS,
    DEFAULT_TOLERANCE,
    encode_prompts,
    engine_versions,
    eos_ids,
    peft_references,
    require_passed,
    stop_at_eos,
    verify_folder,
)
from loracompress.export.options import GraphOptions, check_same_base
from loracompress.export.registry import REPORT_NAME, ExportReport

__all__ = ["GenaiOptions", "export_genai", "save_hf", "write_genai_adapter"]

log = logging.getLogger(__name__)

ADAPTER_SUFFIX = ".onnx_adapter"


@dataclass
class GenaiOptions(GraphOptions):
    """What ``export --engine genai`` can be told: the shared graph options, and what to verify with."""

    prompts: Sequence[str] = DEFAULT_PROMPTS
    new_tokens: int = DEFAULT_NEW_TOKENS


def _validate(sources: Sequence[str | Path], options: GenaiOptions) -> None:
    if options.mode not in ("merged", "adapters"):
        raise LoraCompressError(f"unknown --mode {options.mode!r}: use merged or adapters")
    if options.dtype not in DEFAULT_TOLERANCE:
        raise LoraCompressError(f"--engine genai supports --dtype fp32 or fp16, not {options.dtype}")
    if not sources:
        raise LoraCompressError("pass at least one adapter folder")
    if options.mode == "merged" and len(sources) > 1:
        raise LoraCompressError("--mode merged takes one adapter; to serve several adapters of one base use --mode adapters")
    if options.new_tokens < 1 or not options.prompts:
        raise LoraCompressError("verification needs at least one prompt and one new token")


def _check_adapter(adapter: Adapter) -> None:
    if adapter.extra_tensors:
        name = next(iter(adapter.extra_tensors)).removeprefix(KEY_PREFIX)
        raise LoraCompressError(
            f"the adapter saves whole modules ({name}, modules_to_save), which --engine genai cannot carry; "
            "merge it (loracompress merge) and build the merged folder with python -m onnxruntime_genai.models.builder"
        )
    if adapter.fan_in_fan_out:
        raise LoraCompressError("fan_in_fan_out adapters (GPT-2 Conv1D) are not supported by onnxruntime-genai's builder; use --engine ort")
    if not any(m.rank > 0 for m in adapter.modules.values()):
        raise LoraCompressError(f"{adapter.source}: no LoRA module of rank > 0; there is nothing to export")


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model sharing ``model``'s tensors: a GGUF-loaded model refuses ``save_pretrained``.

    Built on the meta device and filled with ``assign=True``, so no second copy of the weights.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain


def save_hf(base: Any, model: torch.nn.Module, directory: Path) -> None:
    """The Hugging Face folder the builder reads: config, weights (float32), tokenizer."""
    plain = _plain_copy(model) if getattr(model, "is_quantized", False) or hasattr(model.config, "quantization_config") else model
    plain.save_pretrained(str(directory))
    base.tokenizer.save_pretrained(str(directory))


def _union_adapter(adapters: Sequence[Adapter], model: torch.nn.Module, directory: Path) -> list[str]:
    """A rank-1 PEFT adapter on every module any adapter has: the builder then makes each one a LoRA path.

    Its values never ship (the factors become inputs with rank-0 defaults); they only need to exist.
    """
    from safetensors.torch import save_file

    paths = [p for p, _ in model.named_modules() if any(a.modules.get(p) is not None and a.modules[p].rank > 0 for a in adapters)]
    tensors = {}
    for path in paths:
        m = next(a.modules[path] for a in adapters if path in a.modules)
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = torch.zeros(1, m.in_features)
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = torch.zeros(m.out_features, 1)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "bias": "none",
              "target_modules": paths, "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": False}
    (directory / "adapter_config.json").write_text(jsonio.dumps(config), encoding="utf-8")
    return paths


def write_genai_adapter(adapter: Adapter, spec: GenaiGraphSpec, path: Path, adapter_version: int = 1) -> int:
    """Write ``adapter`` as an ``.onnx_adapter`` for the graph ``spec``; returns its parameter count."""
    from loracompress.export.onnx_adapters import write_onnx_adapter

    arrays = adapter_arrays(adapter, spec)
    write_onnx_adapter(arrays, path, model_version=spec.version, adapter_version=adapter_version)
    return int(sum(a.size for a in arrays.values()))


class GenaiReport(ExportReport):
    """What ``export --format onnx`` wrote for onnxruntime-genai, and how generation was verified."""

    def lines(self) -> list[str]:
        out = [f"exported {self['mode']} ONNX ({self['dtype']}) for onnxruntime-genai; greedy generation verified "
               f"against PEFT on {self['verified_on']}"]
        for c in self["checks"]:
            ties = f", {len(c['near_ties'])} near-tie divergence(s)" if c["near_ties"] else ""
            out.append(f"  {c['name']}: tokens identical {c['tokens_identical']}{ties}; first-step logits max abs "
                       f"difference {c['first_step_max_abs_diff']:.3g} (tolerance {c['tolerance']:.3g})")
        out += [f"  {name}: {human_bytes(size)}" for name, size in self["file_bytes"].items()]
        return [*out, f"wrote {self['output']} (and {REPORT_NAME})"]


def export_genai(sources: Sequence[str | Path], output: str | Path, options: GenaiOptions,
                 adapters: Sequence[Adapter] | None = None) -> GenaiReport:
    """Build, verify and write the onnxruntime-genai folder; returns the report (also ``export_report.json``).

    ``adapters``: the adapters at ``sources``, when the caller has read them already (``export --format onnx``
    reads them to choose the engine), so that each file is read once.

    Raises:
        LoraCompressError: bad input, a builder failure, or generation that does not match PEFT.
    """
    from loracompress.export.onnx_adapters import adapter_file_names
    from loracompress.merging.inplace import merge_into
    from loracompress.runtime.layers import check_fit
    from loracompress.runtime.model import load_base_model, resolve_base_model
    from loracompress.runtime.quantized import float_model, refuse_packed

    t0 = time.perf_counter()
    _validate(sources, options)
    og = import_genai()
    paths = [Path(s) for s in sources]
    inputs = [*paths, options.base_model]  # --force never replaces an input
    out = check_output_path(output, force=options.force, inputs=inputs)
    if adapters is None:
        adapters = [load_adapter(s, allow_nonfinite=options.allow_nonfinite) for s in paths]
    elif len(adapters) != len(paths):
        raise ValueError(f"export_genai: {len(adapters)} adapters for {len(paths)} sources")
    for adapter in adapters:
        _check_adapter(adapter)
    refuse_packed(resolve_base_model(options.base_model, adapters[0]), "exporting it")
    check_same_base(adapters, options)
    base = load_base_model(options.base_model, adapters[0], dtype=torch.float32, trust_remote_code=options.trust_remote_code)
    base.model = float_model(base.model, "exporting it")  # bitsandbytes layers dequantized, as merge does
    if not base.is_causal_lm:
        raise LoraCompressError("--engine genai exports decoder-only causal LMs; use --engine ort for this model")
    for adapter in adapters[1:]:
        check_fit(base.model, adapter, base_name=f"base model {base.source!r}")
    tolerance = options.tolerance if options.tolerance is not None else DEFAULT_TOLERANCE[options.dtype]
    prompts = encode_prompts(base.tokenizer, options.prompts)
    adapters_mode = options.mode == "adapters"
    refs, base_refs = peft_references(base.model, paths, prompts, options.new_tokens, with_base=adapters_mode)

    with atomic_output_dir(out, force=options.force, inputs=inputs) as tmp, \
            tempfile.TemporaryDirectory(prefix=".genai-work-", dir=str(tmp.parent)) as work_name:
        work = Path(work_name)
        if not adapters_mode:
            merge_into(base.model, adapters[0])
        save_hf(base, base.model, work / "hf")
        union = _union_adapter(adapters, base.model, work / "union") if adapters_mode else None
        command = run_builder(work / "hf", tmp if not adapters_mode else work / "build", options.dtype, work,
                              adapter_dir=work / "union" if adapters_mode else None)
        files: list[str] = []
        adapter_files: list[dict[str, Any]] = []
        spec = None
        if adapters_mode:
            spec = make_lora_inputs(work / "build", tmp, union or [], options.dtype)
            for item in (work / "build").iterdir():
                if not item.name.startswith(GRAPH_NAME):
                    shutil.copy2(item, tmp / item.name)
            for i, (adapter, name) in enumerate(zip(adapters, adapter_file_names(adapters))):
                count = write_genai_adapter(adapter, spec, tmp / name, adapter_version=i + 1)
                adapter_files.append({"file": name, "source": str(adapter.source), "parameters": count,
                                      "ranks": {p: m.rank for p, m in adapter.modules.items() if m.rank > 0}})
        eos = eos_ids(tmp)
        checks = verify_folder(og, tmp, prompts, [stop_at_eos(r, eos) for r in refs],
                               stop_at_eos(base_refs, eos) if base_refs is not None else None,
                               [a["file"] for a in adapter_files], options.new_tokens, tolerance)
        require_passed(checks)
        files = sorted(p.name for p in tmp.iterdir())
        report = {
            "format": "onnx",
            "engine": "onnxruntime-genai",
            "mode": options.mode,
            "dtype": options.dtype,
            "sources": [str(s) for s in sources],
            "output": str(out),
            "base_model": base.source,
            "providers_in_config": provider_options(tmp) or ["cpu"],
            "verified_on": "cpu",
            "tolerance": tolerance,
            "prompts": list(options.prompts),
            "new_tokens": options.new_tokens,
            "first_step_max_abs_diff": max(c.first_step_max_abs_diff for c in checks),
            "tokens_identical": f"{sum(c.identical for c in checks)}/{sum(c.prompts for c in checks)}",
            "checks": [c.to_json() for c in checks],
            "lora_inputs": ({p: {"A": m.a, "B": m.b, "rank_dim": f"r_{p}"} for p, m in spec.modules.items()} if spec else {}),
            "graph_version": spec.version if spec else None,
            "adapters": adapter_files,
            "builder_command": " ".join(command[1:]),
            "files": files,
            "file_bytes": {name: (tmp / name).stat().st_size for name in files},
            "versions": engine_versions(og),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        jsonio.write_json(tmp / REPORT_NAME, report)
    return GenaiReport(report)
