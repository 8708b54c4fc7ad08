"""``compression_report.json`` and the README card written beside every compressed adapter.

The report is the machine-readable record of a compression: what went in, the budget, the
method and its settings, per-module ranks before/after, parameters and bytes before/after,
retained energy, and quality before/after when it was measured. ``loracompress check`` reads it.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from loracompress._version import __version__
from loracompress.core import jsonio
from loracompress.core.adapter import Adapter
from loracompress.core.dtypes import dtype_name
from loracompress.core.linalg import effective_rank, singular_values

COMPRESSION_REPORT = "compression_report.json"
CARD_NAME = "README.md"


@dataclass
class ModuleStats:
    """One row of ``inspect``: a module's shape, rank, size and where its energy is."""

    path: str
    in_features: int
    out_features: int
    rank: int
    params: int
    bytes: int
    scale: float
    energy: float
    rank90: int
    rank99: int


@dataclass
class AdapterStats:
    modules: list[ModuleStats]
    dtype: str
    params: int
    bytes: int
    extra_params: int
    extra_bytes: int
    max_rank: int
    extra_tensors: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    #: what PEFT does not load, left out (``{"name", "reason"}`` each)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "params": self.params,
            "bytes": self.bytes,
            "max_rank": self.max_rank,
            "extra_params": self.extra_params,
            "extra_bytes": self.extra_bytes,
            "extra_tensors": self.extra_tensors,
            "skipped": self.skipped,
            "task_type": self.config.get("task_type"),
            "base_model": self.config.get("base_model_name_or_path"),
            "modules": [vars(m) for m in self.modules],
        }


def adapter_stats(adapter: Adapter, with_energy: bool = True) -> AdapterStats:
    """Per-module statistics; the SVD for the energy columns costs ``O((in+out)·r²)`` per module."""
    itemsize = torch.empty(0, dtype=adapter.dtype).element_size()
    rows = []
    for path, m in adapter.modules.items():
        if with_energy:
            energy = singular_values(m.B, m.A, m.scale) ** 2  # only S is needed, not U/V
            e, r90, r99 = float(energy.sum()), effective_rank(energy, 0.90), effective_rank(energy, 0.99)
        else:
            e, r90, r99 = float("nan"), -1, -1
        rows.append(
            ModuleStats(path, m.in_features, m.out_features, m.rank, m.num_params, m.num_params * itemsize, m.scale, e, r90, r99)
        )
    extra_bytes = sum(t.numel() * t.element_size() for t in adapter.extra_tensors.values())
    return AdapterStats(
        modules=rows,
        dtype=dtype_name(adapter.dtype),
        params=adapter.num_params,
        bytes=adapter.num_bytes(),
        extra_params=adapter.extra_params,
        extra_bytes=extra_bytes,
        max_rank=adapter.max_rank,
        extra_tensors=sorted(adapter.extra_tensors),
        config=adapter.config,
        skipped=[s.to_json() for s in adapter.skipped],
    )


def compression_report(
    *,
    source: str,
    output: str,
    before: Adapter,
    after: Adapter,
    method: str,
    settings: dict[str, Any],
    budget: str | None,
    target_params: int | None,
    out_dtype: torch.dtype,
    retained_energy: dict[str, float] | None = None,
    total_retained_energy: float | None = None,
    quality: dict[str, Any] | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """The JSON-ready report of one compression."""
    out_item = torch.empty(0, dtype=out_dtype).element_size()
    modules = []
    for path, m in before.modules.items():
        new = after.modules.get(path)
        row = {"module": path, "shape": [m.out_features, m.in_features], "rank_before": m.rank,
               "rank_after": new.rank if new else 0, "params_before": m.num_params,
               "params_after": new.num_params if new else 0}
        if retained_energy is not None:
            row["retained_energy"] = retained_energy.get(path)
        modules.append(row)
    return {
        "tool": f"loracompress {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "source": source,
        "output": output,
        "method": method,
        "settings": settings,
        "budget": {"text": budget, "target_params": target_params},
        "params_before": before.num_params,
        "params_after": after.num_params,
        "param_ratio": after.num_params / before.num_params if before.num_params else None,
        "bytes_before": before.num_bytes(),
        "bytes_after": after.num_params * out_item,
        "dtype_before": dtype_name(before.dtype),
        "dtype_after": dtype_name(out_dtype),
        "max_rank_before": before.max_rank,
        "max_rank_after": after.max_rank,
        "modules_dropped": sum(1 for p in before.modules if p not in after.modules),
        "extra_tensors": sorted(before.extra_tensors),
        # LoRA modules and keys of the input that PEFT does not load (adapter_config.json's scope): left out
        "skipped": [s.to_json() for s in before.skipped],
        "retained_energy": total_retained_energy,
        "quality": quality or {},
        "seconds": seconds,
        "modules": modules,
    }


def report_json(report: dict[str, Any]) -> str:
    return jsonio.dumps(report, indent=2, default=_jsonable) + "\n"


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def card(report: dict[str, Any]) -> str:
    """A short human-readable README for the output folder."""
    r = report
    lines = [
        "# Compressed LoRA adapter",
        "",
        f"Made by {r['tool']} from `{r['source']}` with method `{r['method']}`"
        + (f" under budget `{r['budget']['text']}`." if r["budget"]["text"] else "."),
        "",
        "| | before | after |",
        "|---|---:|---:|",
        f"| LoRA parameters | {r['params_before']:,} | {r['params_after']:,} |",
        f"| bytes ({r['dtype_before']} → {r['dtype_after']}) | {r['bytes_before']:,} | {r['bytes_after']:,} |",
        f"| max rank | {r['max_rank_before']} | {r['max_rank_after']} |",
    ]
    if r.get("retained_energy") is not None:
        lines.append(f"| retained energy (Σσ²) | 1.000 | {r['retained_energy']:.4f} |")
    for name, value in (r.get("quality") or {}).items():
        if isinstance(value, dict) and {"before", "after"} <= set(value):
            lines.append(f"| {name} | {_fmt(value['before'])} | {_fmt(value['after'])} |")
    lines += [
        "",
        "This is a stock PEFT LoRA adapter: the scale is folded into the weights (each module's "
        "`alpha == rank`), so PEFT, vLLM and any reader applying one global `lora_alpha / r` load it "
        "unchanged. Per-module ranks are in `adapter_config.json` (`rank_pattern`) and in "
        "`compression_report.json`.",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, \"<this folder>\")",
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)
