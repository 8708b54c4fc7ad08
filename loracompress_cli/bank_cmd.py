"""``loracompress bank`` and ``bank-add``: many adapters of one base as shared bases plus a small core each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from loracompress.bank.build import REFINE_ITERATIONS
from loracompress.pipelines.bank import BankAddOptions, BankOptions, bank, bank_add
from loracompress_cli.common import console, human, print_json
from loracompress_cli.options import ALLOW_NONFINITE, BASE_MODEL, FORCE, TRUST_REMOTE_CODE

_AS_JSON = typer.Option(False, "--json", metavar="", help="Print the bank manifest (bank.json) as JSON.")


def bank_cmd(
    adapters: list[Path] = typer.Argument(..., metavar="ADAPTERS", help="Two or more PEFT adapter folders of one base model."),
    budget: str = typer.Option(..., "--budget", "-b", help="Parameters of the WHOLE bank (shared bases + every core): a "
                               "fraction of the adapters' total LoRA parameters (0.0625, 6.25%), a count (1.2M) or a size "
                               "(4MB); rank=K keeps R=K in every module."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder: bank.safetensors, bank.json, adapters/<name>/."),
    clusters: str = typer.Option("auto", "--clusters", help="auto (the number with the lowest reconstruction error at "
                                 "the budget, 1 to 8) or a number of clusters, each with its own bases."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default: the widest of the adapters')."),
    refine: int = typer.Option(REFINE_ITERATIONS, "--refine", help="Alternating refinements of the bases after the "
                               "ranks are chosen (0: the higher-order SVD as is)."),
    force: bool = FORCE,
    allow_nonfinite: bool = ALLOW_NONFINITE,
    as_json: bool = _AS_JSON,
) -> None:
    """Compress ADAPTERS jointly: per module shared bases U, V and one R×R core per adapter, under --budget.

    Every adapter is also written as a stock PEFT folder of rank R (B = U, A = core·Vᵀ) that PEFT, vLLM and
    llama.cpp read unchanged; those folders save no space one by one: the saving is in a server that shares the bases.
    """
    options = BankOptions(budget=budget, clusters=clusters, dtype=dtype, iterations=refine, force=force,
                          allow_nonfinite=allow_nonfinite)
    _show(bank(adapters, output, options), output, as_json)


def bank_add_cmd(
    bank_dir: Path = typer.Argument(..., help="A bank folder written by `loracompress bank`."),
    adapters: list[Path] = typer.Argument(..., metavar="ADAPTERS", help="PEFT adapter folders to add (same base and target modules)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder: the bank with the new adapters."),
    refit: bool = typer.Option(False, "--refit", metavar="", help="Refit clusters, bases and cores over every adapter at "
                               "the bank's budget (needs the original folders recorded in bank.json, unchanged)."),
    force: bool = FORCE,
    allow_nonfinite: bool = ALLOW_NONFINITE,
    as_json: bool = _AS_JSON,
) -> None:
    """Add ADAPTERS to BANK_DIR: each projected onto the frozen bases of the cluster that captures it best.

    The existing cores and bases are kept; --refit fits everything anew instead.
    """
    _show(bank_add(bank_dir, adapters, output, BankAddOptions(refit=refit, force=force, allow_nonfinite=allow_nonfinite)),
          output, as_json)


def bank_export_cmd(
    bank_dir: Path = typer.Argument(..., help="A bank folder written by `loracompress bank` (causal-LM adapters)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder: cluster-<c>/ (graph + .onnx_adapter files)."),
    base_model: str | None = BASE_MODEL,
    tolerance: float | None = typer.Option(None, "--tolerance", help="Largest allowed first-step logit difference to PEFT (default 1e-3)."),
    force: bool = FORCE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the export report as JSON."),
) -> None:
    """Export BANK_DIR for onnxruntime-genai: one graph per cluster with the shared bases inside, one
    .onnx_adapter per adapter holding only its R×R cores; verified against PEFT's tokens before anything is written.
    The same as `loracompress export BANK_DIR --format bank-genai` (kept for scripts that use it)."""
    from loracompress.export import export
    from loracompress.export.genai_bank import BankExportOptions

    report = export([bank_dir], output, BankExportOptions(base_model=base_model, tolerance=tolerance, force=force,
                                                          trust_remote_code=trust_remote_code))
    if as_json:
        print_json(report)
        return
    for line in report.lines():
        console.print(line)


def _show(manifest: dict[str, Any], output: Path, as_json: bool) -> None:
    if as_json:
        print_json(manifest)
        return
    p = manifest["params"]
    table = Table(title=f"bank of {len(manifest['adapters'])} adapters → {output}")
    for col in ("adapter", "cluster", "relative error", "core params", "original params"):
        table.add_column(col, justify="left" if col == "adapter" else "right")
    for a in manifest["adapters"]:
        err = a["relative_error"]
        table.add_row(a["name"] + (" (added)" if a["added"] else ""), str(a["cluster"]),
                      "" if err is None else f"{err:.4f}", human(a["core_params"]), human(a["original_params"]))
    console.print(table)
    console.print(f"{manifest['clusters']['count']} cluster(s); bases {human(p['bases'])} + cores {human(p['cores'])} = "
                  f"{human(p['total'])} parameters, {p['total'] / p['originals']:.4f} of the originals' {human(p['originals'])}"
                  + (f"; heads {human(p['heads'])} kept per adapter" if p["heads"] else ""))
    console.print(f"wrote {output} (bank.safetensors, bank.json, adapters/<name>/)")


def register(app: typer.Typer) -> None:
    app.command("bank")(bank_cmd)
    app.command("bank-add")(bank_add_cmd)
    app.command("bank-export")(bank_export_cmd)
