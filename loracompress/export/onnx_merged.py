"""ONNX ``--mode merged``: the adapter merged into the base weights, one plain graph."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from loracompress.adapter import Adapter, dtype_name
from loracompress.export.graph import (
    ONNX_NAME,
    ServingModule,
    export_onnx_program,
    model_metadata,
    save_program,
)
from loracompress.export.probe import applied, model_outputs
from loracompress.export.verify import compare, open_session, require_passed, run_session
from loracompress.layers import merge_into
from loracompress.model import BaseModel

log = logging.getLogger(__name__)


def export_merged(
    adapter: Adapter,
    base: BaseModel,
    out_dir: Path,
    *,
    dtype: torch.dtype,
    tolerance: float,
    example: dict[str, torch.Tensor],
    probe: dict[str, torch.Tensor],
    prefer_gpu: bool = True,
) -> dict[str, Any]:
    """Merge (fp32), cast, export to ``out_dir/model.onnx`` and verify against base+adapter.

    ``base.model`` is changed in place (merged and cast). ``example`` is the batch the exporter
    traces; ``probe`` (a different shape, to prove the dynamic axes) is what is compared.
    """
    model = base.model
    with applied(model, adapter):
        reference = model_outputs(model, probe)
    outputs = list(reference)
    merge_into(model, adapter)
    model.to(dtype)
    program = export_onnx_program(ServingModule(model, outputs), example)
    model_metadata(program, {"loracompress.mode": "merged", "loracompress.dtype": dtype_name(dtype)})
    files = save_program(program, out_dir)
    session = open_session(out_dir / ONNX_NAME, prefer_gpu=prefer_gpu)
    got = run_session(session, probe, outputs)
    check = compare("merged", got, reference, probe["attention_mask"], tolerance)
    require_passed([check], "the exported ONNX model")
    return {
        "outputs": outputs,
        "provider": session.provider,
        "provider_reason": session.why,
        "checks": [check.to_json()],
        "files": [f.name for f in files],
    }
