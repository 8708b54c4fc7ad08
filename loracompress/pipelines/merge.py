"""``merge``: an adapter folded into its base model, written as a Hugging Face model folder.

The merge is done in float32 (``W + B @ A · scale``), checked on a probe batch against the base
model with the adapter attached as LoRA layers, then cast to the output dtype and saved as
sharded safetensors with the config and (when the base has one) the tokenizer. The check's
max abs difference is printed and recorded in ``merge_report.json`` beside the model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracompress.core.adapter import dtype_name, load_adapter, parse_dtype
from loracompress.core.outputs import atomic_output_dir, check_output_path
from loracompress.errors import LoraCompressError
from loracompress.export.probe import applied, max_abs_diff, model_outputs, probe_batch, saved_module_params
from loracompress.export.verify import resolve_tolerance
from loracompress.runtime.data import prepare_model
from loracompress.runtime.layers import merge_into
from loracompress.runtime.model import load_base_model

log = logging.getLogger(__name__)

MERGE_REPORT = "merge_report.json"


@dataclass
class MergeOptions:
    """Everything ``merge`` can be told."""

    base_model: str | None = None
    dtype: str | None = None
    max_shard_size: str = "2GB"
    tolerance: float | None = None
    force: bool = False
    trust_remote_code: bool = False
    allow_nonfinite: bool = False


def _output_dtype(requested: str | None, model: torch.nn.Module) -> torch.dtype:
    """The requested dtype, else the dtype the base model was published in, else fp32."""
    dtype = parse_dtype(requested)
    if dtype is not None:
        return dtype
    config = getattr(model, "config", None)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def merge_adapter(source: str | Path, output: str | Path, options: MergeOptions) -> dict[str, Any]:
    """Merge the adapter at ``source`` into its base model and save the result at ``output``.

    Returns the merge report (also written as ``merge_report.json``).

    Raises:
        LoraCompressError: bad input, or the merged model disagrees with base+adapter beyond the tolerance.
    """
    t0 = time.perf_counter()
    tolerance = resolve_tolerance(options.tolerance, "fp32")
    out = check_output_path(output, force=options.force, inputs=[Path(source)])
    adapter = load_adapter(source, allow_nonfinite=options.allow_nonfinite)
    base = load_base_model(options.base_model, adapter, dtype=torch.float32, trust_remote_code=options.trust_remote_code)
    prepare_model(base)  # classifiers with a decoder body find each sequence's end by the pad id
    model = base.model
    dtype = _output_dtype(options.dtype, model)

    probe = probe_batch(model, base.tokenizer, batch=2, seq=16, seed=0)
    with applied(model, adapter):
        reference = model_outputs(model, probe)
    merge_into(model, adapter)
    diff = max_abs_diff(model_outputs(model, probe, list(reference)), reference, probe["attention_mask"])
    log.debug("merged (fp32) vs base+adapter: max abs difference %.3g on the probe batch", diff)
    if not diff <= tolerance:
        raise LoraCompressError(
            f"the merged model differs from base+adapter by {diff:.3g} (> tolerance {tolerance:.3g}); nothing was written"
        )
    model.to(dtype)
    diff_cast = diff
    if dtype != torch.float32:
        try:
            diff_cast = max_abs_diff(model_outputs(model, probe, list(reference)), reference, probe["attention_mask"])
        except RuntimeError as err:  # an op without a CPU kernel for this dtype: the cast cannot be checked here
            log.warning("could not run the %s model on this device to measure the cast (%s)", dtype_name(dtype), err)
            diff_cast = None
        else:
            log.debug("merged (%s) vs base+adapter: max abs difference %.3g", dtype_name(dtype), diff_cast)

    with atomic_output_dir(out, force=options.force, inputs=[Path(source)]) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=options.max_shard_size)
        if base.tokenizer is not None:
            base.tokenizer.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir())
        report = {
            "source": str(source),
            "output": str(out),
            "base_model": base.source,
            "dtype": dtype_name(dtype),
            "probe_shape": list(probe["input_ids"].shape),
            "outputs": list(reference),
            "max_abs_diff": diff,
            "max_abs_diff_output_dtype": diff_cast,
            "tolerance": tolerance,
            "modules_merged": sum(1 for m in adapter.modules.values() if m.rank > 0),
            "lora_params": adapter.num_params,
            "modules_to_save": sorted(saved_module_params(adapter)),
            "files": files,
            "bytes": sum((tmp / f).stat().st_size for f in files),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
