"""``loracompress prune``: compress an adapter under a budget."""

from __future__ import annotations

from pathlib import Path

import typer
from loracompress_cli.common import console, human, human_bytes, print_json

from loracompress.api import PruneOptions, default_output, prune


def prune_cmd(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder to compress."),
    budget: str | None = typer.Option(None, "--budget", "-b", help="0.5, 50%, 1.2M, 300k, 4MB, 4MiB or rank=8."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (default: ADAPTER-compressed)."),
    method: str = typer.Option("svd", "--method", "-m", help="svd (training-free)."),
    select: str | None = typer.Option(None, "--select", help="Per-module cap: energy:0.95, fro:0.9 or ratio:10."),
    min_rank: int = typer.Option(0, "--min-rank", help="Keep at least this rank in every module."),
    max_rank: int | None = typer.Option(None, "--max-rank", help="Keep at most this rank in any module."),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype fp32/fp16/bf16 (default: the input's)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Zero out NaN/Inf weights instead of refusing."),
    as_json: bool = typer.Option(False, "--json", help="Print the compression report as JSON."),
) -> None:
    """Compress ADAPTER under --budget (training-free global SVD allocation by default)."""
    options = PruneOptions(budget=budget, method=method, select=select, min_rank=min_rank, max_rank=max_rank,
                           dtype=dtype, force=force, allow_nonfinite=allow_nonfinite)
    report = prune(adapter, output, options)
    if as_json:
        print_json(report)
        return
    out = output or default_output(adapter)
    console.print(
        f"{report['method']}: {human(report['params_before'])} → {human(report['params_after'])} parameters "
        f"({report['param_ratio']:.3f}), {human_bytes(report['bytes_before'])} → {human_bytes(report['bytes_after'])}, "
        f"max rank {report['max_rank_before']} → {report['max_rank_after']}"
        + (f", retained energy {report['retained_energy']:.4f}" if report.get("retained_energy") is not None else "")
    )
    for name, value in (report.get("quality") or {}).items():
        if isinstance(value, dict) and "before" in value:
            console.print(f"  {name}: {value['before']:.4g} → {value['after']:.4g}")
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_cmd)
