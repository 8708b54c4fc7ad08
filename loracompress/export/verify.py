"""Running an exported graph in onnxruntime and checking it against PyTorch.

The execution provider is CUDA when onnxruntime-gpu is installed and a GPU answers, CPU
otherwise; :func:`open_session` reports which one actually runs (onnxruntime falls back to CPU
silently when CUDA cannot start, so the session is asked, not the wish list).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loracompress.errors import LoraCompressError
from loracompress.export.probe import max_abs_diff

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: Default ``--tolerance`` (max abs difference, fp32 reference) by the exported dtype.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-1}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise LoraCompressError(
            "onnxruntime is not installed; pip install 'loracompress[onnx]' (or '[gpu]' for onnxruntime-gpu)"
        ) from None
    return onnxruntime


@dataclass
class Session:
    """An onnxruntime session and the execution provider that really runs it."""

    session: Any
    provider: str
    why: str

    def describe(self) -> str:
        return f"{self.provider} ({self.why})"


def open_session(path: Path, prefer_gpu: bool = True) -> Session:
    """Open ``path`` on CUDA when onnxruntime-gpu and a GPU are there, else on CPU."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    # LoRA inputs are initializers that are also graph inputs (overridable defaults), which
    # onnxruntime warns about once per input; that is the design, not a problem.
    options.log_severity_level = 3
    available = ort.get_available_providers()
    if prefer_gpu and CUDA in available:
        try:
            session = ort.InferenceSession(str(path), options, providers=[CUDA, CPU])
        except Exception as err:  # noqa: BLE001 - any CUDA start-up failure means: run on CPU
            log.debug("CUDA execution provider failed to start: %s", err)
        else:
            if session.get_providers()[0] == CUDA:
                return Session(session, CUDA, "onnxruntime-gpu with a GPU")
            return Session(session, CPU, "onnxruntime-gpu is installed but no GPU answered")
    why = "onnxruntime-gpu is not installed" if CUDA not in available else "CPU requested (--cpu)"
    return Session(ort.InferenceSession(str(path), lean_cpu_options(ort, options), providers=[CPU]), CPU, why)


def lean_cpu_options(ort: Any, options: Any) -> Any:
    """Session options that hold an exported graph on the CPU at about its own size.

    The CPU execution provider has no fp16 kernels for most ops, so onnxruntime wraps them in Casts.
    With the default optimizations those Casts of weights are constant-folded into fp32 copies of
    every weight (3x an fp16 model), and in the default order every weight's Cast runs before the
    first MatMul. Unoptimized, in priority order, each weight is upcast just before its node and
    freed after it. Verification runs a few probes, so the speed this costs does not matter; what
    is checked is the graph as written, not onnxruntime's rewrite of it.
    """
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return options


def run_session(
    session: Session,
    inputs: Mapping[str, torch.Tensor | np.ndarray],
    output_names: list[str],
    adapter_file: Path | None = None,
    extra_feeds: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Run once; ``adapter_file`` is activated through ``RunOptions.add_active_adapter``."""
    ort = import_onnxruntime()
    feeds = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    feeds.update(extra_feeds or {})
    run_options = None
    if adapter_file is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter_file))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(lora)
    outs = session.session.run(output_names, feeds, run_options)
    return {n: np.asarray(o, dtype=np.float32) for n, o in zip(output_names, outs)}


@dataclass
class Check:
    """One onnxruntime-vs-PyTorch comparison on the probe batch."""

    name: str
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def compare(name: str, got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], attention_mask: Any, tolerance: float) -> Check:
    check = Check(name=name, max_abs_diff=max_abs_diff(got, ref, attention_mask), tolerance=tolerance)
    log.debug("%s: max |onnxruntime - PyTorch| = %.3g (tolerance %.3g)", name, check.max_abs_diff, tolerance)
    return check


def require_passed(checks: list[Check], what: str) -> None:
    """Raise (nothing is written) when any check exceeds its tolerance."""
    failed = [c for c in checks if not c.passed]
    if failed:
        worst = max(failed, key=lambda c: c.max_abs_diff)
        raise LoraCompressError(
            f"{what} does not match PyTorch: {worst.name} max abs difference {worst.max_abs_diff:.3g} > tolerance "
            f"{worst.tolerance:.3g}; nothing was written (raise --tolerance if this is expected, e.g. for fp16)"
        )


def resolve_tolerance(tolerance: float | None, dtype_name: str) -> float:
    if tolerance is None:
        return DEFAULT_TOLERANCE.get(dtype_name, DEFAULT_TOLERANCE["fp16"])
    if not tolerance > 0:
        raise LoraCompressError(f"--tolerance must be a positive number, got {tolerance}")
    return float(tolerance)
