"""ONNX ``--mode merged``: the adapter merged into the base weights, one plain graph."""

from __future__ import annotations

import logging
from typing import Any

from loracompress.core.adapter import Adapter
from loracompress.core.dtypes import dtype_name
from loracompress.export.graph import (
    ONNX_NAME,
    ExportRun,
    ServingModule,
    export_onnx_program,
    model_metadata,
    save_program,
)
from loracompress.export.memory import fp32_compute, release
from loracompress.export.probe import applied, model_outputs
from loracompress.export.verify import compare, open_session, require_passed, run_session
from loracompress.merging.inplace import merge_cast

log = logging.getLogger(__name__)


def export_merged(adapter: Adapter, run: ExportRun) -> dict[str, Any]:
    """Merge (fp32, rounded once to the export dtype), export to ``run.out_dir/model.onnx`` and verify
    against base+adapter computed in fp32.

    ``run.base.model`` is changed in place: merged, cast, and its weights freed (moved to the meta
    device) before onnxruntime loads the graph, so PyTorch and onnxruntime never hold the model at once.
    """
    model, probe, out_dir, dtype = run.base.model, run.probe, run.out_dir, run.dtype
    with applied(model, adapter), fp32_compute(model):
        reference = model_outputs(model, probe)
    outputs = list(reference)
    merge_cast(model, adapter, dtype)
    # Unoptimized: the optimizer's folded weight copies would outlive the program (a second model in memory).
    program = export_onnx_program(ServingModule(model, outputs), run.example, optimize=False)
    model_metadata(program, {"loracompress.mode": "merged", "loracompress.dtype": dtype_name(dtype)})
    files = save_program(program, out_dir)
    del program
    release(model)
    session = open_session(out_dir / ONNX_NAME, prefer_gpu=run.prefer_gpu)
    got = run_session(session, probe, outputs)
    check = compare("merged", got, reference, probe["attention_mask"], run.tolerance)
    require_passed([check], "the exported ONNX model")
    return {
        "outputs": outputs,
        "provider": session.provider,
        "provider_reason": session.why,
        "checks": [check.to_json()],
        "files": [f.name for f in files],
    }
