"""``merge``: an adapter folded into its base model, written as a Hugging Face model folder.

A base given as a folder of safetensors (or a cached hub id) is merged **streaming**
(:mod:`loracompress.merging.stream`): shard by shard, one tensor in memory at a time, each
LoRA'd weight gets ``ΔW = B @ A · scale`` added in fp32 and is cast back to its own dtype, the output
keeps the base's shard layout and dtype. Any other base (a ``.gguf`` file, ``.bin`` weights, a
checkpoint whose tensors do not map one-to-one onto the model) is loaded whole in fp32, merged in
memory and written as plain safetensors.

Verification (``verify``): ``modules`` checks every merged module on random probes
(``W'x`` against ``Wx + B(Ax)``, fp32, before the cast) and needs no model in memory; ``full`` also
compares the whole model's logits on a probe batch with the base running the adapter as LoRA
layers, then the written model's (after the cast); ``auto`` is ``full`` when the model fits in
memory comfortably. The figures are recorded in ``merge_report.json`` beside the model.

A quantized base (block FP8, bitsandbytes 4/8-bit) is dequantized one weight at a time as it is
read, the merged weights are written in its float dtype and the output's config loses its
``quantization_config``; packed formats (GPTQ, AWQ, ...) are refused by name
(:mod:`loracompress.merging.quantized`, :mod:`loracompress.runtime.quantized`).
"""

from __future__ import annotations

import gc
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracompress.core import jsonio
from loracompress.core.adapter import Adapter
from loracompress.core.dtypes import FLOATS, dtype_name, parse_dtype
from loracompress.core.outputs import atomic_output_dir, check_output_path
from loracompress.core.reader import load_adapter
from loracompress.core.units import parse_size
from loracompress.core.validate import reject_nonfinite
from loracompress.errors import LoraCompressError
from loracompress.export.probe import applied, max_abs_diff, model_outputs, probe_batch, saved_module_params
from loracompress.export.verify import resolve_tolerance
from loracompress.merging.check import ModuleCheck
from loracompress.merging.checkpoint import read_checkpoint
from loracompress.merging.inplace import merge_into
from loracompress.merging.plan import MergePlan, plan_merge
from loracompress.merging.quantized import (
    Into,
    check_into,
    choose_base,
    dequantized_base,
    refuse_quantized_in_memory,
)
from loracompress.merging.stream import write_plan
from loracompress.merging.weights import oriented_weight, published_dtype, tied_targets, untie_config
from loracompress.runtime.data import prepare_model
from loracompress.runtime.model import BaseModel, BaseStructure, load_base_model, load_base_structure

log = logging.getLogger(__name__)

MERGE_REPORT = "merge_report.json"
VERIFY_MODES = ("auto", "modules", "full")
#: ``auto`` runs the full check when the fp32 model takes at most this share of the available memory.
FULL_CHECK_SHARE = 1 / 3
_COPIED_FILES = ("generation_config.json",)


@dataclass
class MergeOptions:
    """Everything ``merge`` can be told."""

    base_model: str | None = None
    dtype: str | None = None
    #: None keeps the base's shard layout (streaming) or uses 2GB shards (in memory).
    max_shard_size: str | None = None
    tolerance: float | None = None
    verify: str = "auto"
    force: bool = False
    trust_remote_code: bool = False
    allow_nonfinite: bool = False
    #: None: stream whenever the base allows it; False: always merge in memory (tests compare the two).
    streaming: bool | None = None
    #: "dequantized" (into the weights a quantized base computes with), "original" (the 16-bit
    #: weights as stored), None: dequantized when the base, the adapter's records or load_in_4bit say 4-bit.
    into: str | None = None
    #: the adapter was trained on this 16-bit base loaded in 4-bit (QLoRA): merge into dequant(NF4(W)).
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        reject_nonfinite(self)


def max_shard_bytes(text: str) -> int:
    """``--max-shard-size`` as bytes: ``"2GB"``, ``"500MB"``, ``"1.5GiB"``, ``"100KB"`` or a byte count
    (:func:`~loracompress.core.units.parse_size`; a bare ``2G`` is 2 GB), at least one byte."""
    size = parse_size(text, bare=True)
    if size is None or not 1 <= size < math.inf:
        raise LoraCompressError(f"--max-shard-size {text!r} is not a size; use e.g. 2GB, 500MB or 1.5GiB")
    return int(size)


def _check_verify(mode: str) -> str:
    if mode not in VERIFY_MODES:
        raise LoraCompressError(f"unknown --verify {mode!r}: use auto, modules or full")
    return mode


def _available_memory() -> int | None:
    try:
        import psutil
    except ImportError:  # accelerate depends on it; without it, play safe
        return None
    return int(psutil.virtual_memory().available)


def _resolve_verify(mode: str, params: int) -> str:
    """``auto`` -> ``full`` when the fp32 model fits comfortably in the memory available now."""
    if mode != "auto":
        return mode
    available = _available_memory()
    return "full" if available is not None and params * 4 <= available * FULL_CHECK_SHARE else "modules"


def merge_inputs(source: str | Path, options: MergeOptions) -> list[str | Path | None]:
    """What a merge reads: ``-o BASE --force`` must never replace the base model."""
    return [source, options.base_model]


def merge_adapter(source: str | Path, output: str | Path, options: MergeOptions) -> dict[str, Any]:
    """Merge the adapter at ``source`` into its base model and save the result at ``output``.

    Returns the merge report (also written as ``merge_report.json``).

    Raises:
        LoraCompressError: bad input, or the merged model disagrees with base+adapter beyond the tolerance.
    """
    t0 = time.perf_counter()
    verify = _check_verify(options.verify)
    requested = parse_dtype(options.dtype)
    max_shard = max_shard_bytes(options.max_shard_size) if options.max_shard_size is not None else None
    tolerance = resolve_tolerance(options.tolerance, "fp32")
    out = check_output_path(output, force=options.force, inputs=merge_inputs(source, options))
    adapter = load_adapter(source, allow_nonfinite=options.allow_nonfinite)

    into = check_into(options.into)

    plan: MergePlan | str = "streaming turned off"
    structure: BaseStructure | str = "streaming turned off"
    base = Into("original", "the base is not quantized")
    if options.streaming is not False:
        structure = load_base_structure(options.base_model, adapter, trust_remote_code=options.trust_remote_code)
        if isinstance(structure, BaseStructure):
            checkpoint = read_checkpoint(structure.folder)
            if checkpoint is not None:
                base = choose_base(into, options.load_in_4bit, source, structure, checkpoint)
            plan = ("the base has no safetensors weights" if checkpoint is None else
                    plan_merge(checkpoint, structure.model, structure.config, adapter, requested, max_shard, base.quant))
        else:
            plan = structure
    if isinstance(plan, str):
        refuse_quantized_in_memory(options, adapter, into, plan)
        log.info("merging in memory: %s", plan)
        return _merge_in_memory(source, out, adapter, options, verify, requested, max_shard, tolerance, plan, t0)
    assert isinstance(structure, BaseStructure)
    return _merge_streaming(source, out, adapter, options, verify, structure, plan, tolerance, t0, base)


# --------------------------------------------------------------------------- streaming


def _merge_streaming(source: str | Path, out: Path, adapter: Adapter, options: MergeOptions, verify: str,
                     structure: BaseStructure, plan: MergePlan, tolerance: float, t0: float,
                     base: Into) -> dict[str, Any]:
    params = sum(int(torch.Size(t.shape).numel()) for t in plan.tensors if t.dtype in FLOATS)
    verify = _resolve_verify(verify, params)
    check = ModuleCheck()
    with atomic_output_dir(out, force=options.force, inputs=merge_inputs(source, options)) as tmp:
        shards = write_plan(plan, adapter, tmp, check)
        _require_modules(check, tolerance)
        dropped = _drop_unused_auto_map(structure.model)
        _write_config(structure, plan, tmp)
        full: dict[str, Any] = {}
        if verify == "full":
            full = _full_check_of_files(options, adapter, tmp, plan.dtype, tolerance,
                                        dequantized_base(structure, plan, adapter) if plan.quant is not None else None)
        report = _report(source, out, adapter, structure.source, plan.dtype, verify, check, full, tolerance, tmp, t0,
                         streamed=True, reason=None, untied=plan.untied, vocab_resized=structure.vocab_resized,
                         layout="base" if options.max_shard_size is None else "max_shard_size", shards=shards)
        report["auto_map_dropped"] = dropped
        report.update(base.to_json())
        jsonio.write_json(tmp / MERGE_REPORT, report)
    return report


def _write_config(structure: BaseStructure, plan: MergePlan, directory: Path) -> None:
    """config.json as the merged model really is, the tokenizer and the generation config."""
    config = structure.model.config
    config.architectures = [type(structure.model).__name__]
    config.dtype = plan.dtype  # the dtype the output really has (not what transformers set on load)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # every weight was dequantized: the output is a float model
    if plan.untied:
        untie_config(config)
    prepare_model(structure)  # the pad id, as the in-memory merge records it
    config.save_pretrained(str(directory))
    for name in _COPIED_FILES:
        if (structure.folder / name).is_file():
            shutil.copyfile(structure.folder / name, directory / name)
    if structure.tokenizer is not None:
        structure.tokenizer.save_pretrained(str(directory))


def _require_modules(check: ModuleCheck, tolerance: float) -> None:
    if not check.max_abs_diff <= tolerance:
        raise LoraCompressError(
            f"merged module {check.worst} differs from base+adapter by {check.max_abs_diff:.3g} on random probes "
            f"(> tolerance {tolerance:.3g}); nothing was written"
        )


def _full_check_of_files(options: MergeOptions, adapter: Adapter, written: Path, dtype: torch.dtype,
                         tolerance: float, base: BaseModel | None = None) -> dict[str, Any]:
    """The whole-model check: base+adapter (fp32) against the fp32 merge, then against the files written.

    One model is in memory at a time: the base (merged in place for the fp32 figure), then the written one.
    ``base`` is a quantized base's dequantized fp32 model (:func:`dequantized_base`), else the base is loaded.
    """
    if base is None:
        base = load_base_model(options.base_model, adapter, dtype=torch.float32, trust_remote_code=options.trust_remote_code)
    prepare_model(base)
    probe = probe_batch(base.model, base.tokenizer, batch=2, seq=16, seed=0)
    with applied(base.model, adapter):
        reference = model_outputs(base.model, probe)
    merge_into(base.model, adapter)
    diff = max_abs_diff(model_outputs(base.model, probe, list(reference)), reference, probe["attention_mask"])
    if not diff <= tolerance:
        raise LoraCompressError(
            f"the merged model differs from base+adapter by {diff:.3g} (> tolerance {tolerance:.3g}); nothing was written"
        )
    auto = type(base.model)
    del base
    gc.collect()
    # Read the written files as a user would (upcast to fp32, so the figure is the cast's cost alone).
    merged = auto.from_pretrained(str(written), dtype=torch.float32).eval()
    got = model_outputs(merged, probe, list(reference))
    del merged
    gc.collect()
    written_diff = max_abs_diff(got, reference, probe["attention_mask"])
    if dtype == torch.float32 and not written_diff <= tolerance:
        raise LoraCompressError(
            f"the written model differs from base+adapter by {written_diff:.3g} (> tolerance {tolerance:.3g}); nothing was written"
        )
    return {"probe_shape": list(probe["input_ids"].shape), "outputs": list(reference), "max_abs_diff": diff,
            "max_abs_diff_output_dtype": written_diff}


# --------------------------------------------------------------------------- in memory


def _published_dtype(base: BaseModel) -> torch.dtype:
    """The dtype the base was published in (its config on disk; transformers overwrites the loaded one), else fp32."""
    if base.gguf_file:
        return torch.float32  # dequantized: no published float dtype to keep
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base.source, local_files_only=True)
    except (OSError, ValueError):
        return torch.float32
    return published_dtype(config) or torch.float32


def _merge_in_memory(source: str | Path, out: Path, adapter: Adapter, options: MergeOptions, verify: str,
                     requested: torch.dtype | None, max_shard: int | None, tolerance: float, reason: str,
                     t0: float) -> dict[str, Any]:
    base = load_base_model(options.base_model, adapter, dtype=torch.float32, trust_remote_code=options.trust_remote_code)
    prepare_model(base)  # classifiers with a decoder body find each sequence's end by the pad id
    model = base.model
    dtype = requested or _published_dtype(base)
    verify = "full" if verify == "auto" else verify  # the model is in memory already

    check = ModuleCheck()
    probes = {}
    for path, m in adapter.modules.items():
        if m.rank:
            x = check.inputs(m)
            probes[path] = (x, check.reference(oriented_weight(model, path), m, x))
    full: dict[str, Any] = {}
    probe = reference = None
    if verify == "full":
        probe = probe_batch(model, base.tokenizer, batch=2, seq=16, seed=0)
        with applied(model, adapter):
            reference = model_outputs(model, probe)
    untied = tied_targets(model, adapter)
    merge_into(model, adapter)
    for path, (x, ref) in probes.items():
        check.record(path, oriented_weight(model, path), None, x, ref)
    _require_modules(check, tolerance)
    if verify == "full":
        diff = max_abs_diff(model_outputs(model, probe, list(reference)), reference, probe["attention_mask"])
        log.debug("merged (fp32) vs base+adapter: max abs difference %.3g on the probe batch", diff)
        if not diff <= tolerance:
            raise LoraCompressError(
                f"the merged model differs from base+adapter by {diff:.3g} (> tolerance {tolerance:.3g}); nothing was written"
            )
        full = {"probe_shape": list(probe["input_ids"].shape), "outputs": list(reference), "max_abs_diff": diff,
                "max_abs_diff_output_dtype": diff}
    model.to(dtype)
    if dtype != torch.float32:
        cast_check = ModuleCheck()
        for path, (x, ref) in probes.items():
            cast_check.record(path, oriented_weight(model, path), None, x, ref)
        check.max_abs_diff_cast = cast_check.max_abs_diff if probes else None
        if verify == "full":
            try:
                full["max_abs_diff_output_dtype"] = max_abs_diff(model_outputs(model, probe, list(reference)), reference,
                                                                 probe["attention_mask"])
            except RuntimeError as err:  # an op without a CPU kernel for this dtype: the cast cannot be checked here
                log.warning("could not run the %s model on this device to measure the cast (%s)", dtype_name(dtype), err)
                full["max_abs_diff_output_dtype"] = None

    dropped = _drop_unused_auto_map(model)
    with atomic_output_dir(out, force=options.force, inputs=merge_inputs(source, options)) as tmp:
        _save_plain(model, tmp, max_shard if max_shard is not None else "2GB")
        if base.tokenizer is not None:
            base.tokenizer.save_pretrained(str(tmp))
        shards = sorted(p.name for p in tmp.iterdir() if p.name.endswith(".safetensors"))
        report = _report(source, out, adapter, base.source, dtype, verify, check, full, tolerance, tmp, t0,
                         streamed=False, reason=reason, untied=untied, vocab_resized=base.vocab_resized,
                         layout="max_shard_size", shards=shards)
        report["auto_map_dropped"] = dropped
        report.update((Into("dequantized", "the GGUF base is dequantized on load") if base.gguf_file else
                       Into("original", "the base is not quantized")).to_json())
        jsonio.write_json(tmp / MERGE_REPORT, report)
    return report


def _drop_unused_auto_map(model: torch.nn.Module) -> bool:
    """Take ``auto_map`` out of the config to be written when the merge did not use the base's custom code.

    A config with ``auto_map`` and a built-in ``model_type`` is loaded (without --trust-remote-code) by
    transformers' own class, which is what was merged and checked; the written config would still send a
    reader with trust_remote_code to the base's ``.py`` files, which the merged folder does not hold.
    Returns whether it was dropped.
    """
    config = model.config
    if not getattr(config, "auto_map", None) or not type(model).__module__.startswith("transformers."):
        return False
    log.warning("the base's config.json has auto_map, but the merge used transformers' built-in %s (no "
                "--trust-remote-code): the merged config.json leaves auto_map out", type(model).__name__)
    del config.auto_map
    return True


def _save_plain(model: torch.nn.Module, directory: Path, max_shard_size: int | str) -> None:
    """``save_pretrained`` as plain weights: a model loaded from GGUF is dequantized already, but
    transformers still marks it quantized and refuses to serialize it."""
    config = model.config
    if getattr(model, "hf_quantizer", None) is not None or getattr(config, "quantization_config", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)


# --------------------------------------------------------------------------- report


def _report(source: str | Path, out: Path, adapter: Adapter, base_source: str, dtype: torch.dtype, verify: str,
            check: ModuleCheck, full: dict[str, Any], tolerance: float, tmp: Path, t0: float, *, streamed: bool,
            reason: str | None, untied: list[str], vocab_resized: tuple[int, int] | None, layout: str,
            shards: list[str]) -> dict[str, Any]:
    files = sorted(p.name for p in tmp.iterdir() if p.name != MERGE_REPORT)
    return {
        "source": str(source),
        "output": str(out),
        "base_model": base_source,
        "dtype": dtype_name(dtype),
        "streamed": streamed,
        "in_memory_reason": reason,
        "verify": verify,
        "probe_shape": full.get("probe_shape"),
        "outputs": full.get("outputs", []),
        # The whole-model figures when verify is full, else the module check's.
        "max_abs_diff": full.get("max_abs_diff", check.max_abs_diff),
        "max_abs_diff_output_dtype": full.get("max_abs_diff_output_dtype", check.max_abs_diff_cast),
        "module_check": check.to_json(),
        "tolerance": tolerance,
        "modules_merged": sum(1 for m in adapter.modules.values() if m.rank > 0),
        "skipped": [s.to_json() for s in adapter.skipped],  # what PEFT does not load: not merged
        "lora_params": adapter.num_params,
        "modules_to_save": sorted(saved_module_params(adapter)),
        "untied": untied,
        "vocab_resized": list(vocab_resized) if vocab_resized else None,
        "shard_layout": layout,
        "shards": shards,
        "files": files,
        "bytes": sum((tmp / f).stat().st_size for f in files if (tmp / f).is_file()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
