"""``loracompress export``: ship an adapter in any registered format (:mod:`loracompress.export.registry`).

Every flag is declared once here; each format takes the ones its options dataclass declares, and its report
prints itself (``ExportReport.lines``), so a new format needs no edit in this file.
"""

from __future__ import annotations

from pathlib import Path

import typer

from loracompress.errors import LoraCompressError
from loracompress.export import REPORT_NAME, export, format_named, formats, options_for
from loracompress_cli.common import console, print_json, skipped_line
from loracompress_cli.options import ALLOW_NONFINITE, BASE_MODEL, FORCE, TRUST_REMOTE_CODE

DEFAULT_FORMAT = "peft"

#: its help lists the registered formats, so it is filled in when the command line is built
#: (:func:`refresh_help`): a format registered by a plugin or a test shows up too
FORMAT = typer.Option(None, "--format", "-f", help="")


def refresh_help() -> None:
    """Fill in ``--format``'s help from the format registry (called before each command-line parse)."""
    listed = "; ".join(f"{name}: {fmt.help}" for name, fmt in formats().items())
    FORMAT.help = f"{listed}. Default: {DEFAULT_FORMAT}."


def _format(fmt: str | None, target: str | None) -> str:
    if fmt and target and fmt != target:
        raise LoraCompressError(f"--format {fmt} and --target {target} disagree; pass --format alone")
    return format_named(fmt or target or DEFAULT_FORMAT).name


def export_cmd(
    adapters: list[Path] = typer.Argument(..., help="PEFT adapter folder(s); several only with --mode adapters. "
                                          "--format bank-genai: a bank folder (loracompress bank)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (default: ADAPTER-FORMAT)."),
    fmt: str | None = FORMAT,
    target: str | None = typer.Option(None, "--target", hidden=True, help="The same as --format (kept for old scripts)."),
    base_model: str | None = BASE_MODEL,
    mode: str | None = typer.Option(None, "--mode", help="ONNX: merged (one graph, adapter folded in; default) or adapters (multi-LoRA)."),
    dtype: str | None = typer.Option(None, "--dtype", help="ONNX: fp32 (default) or fp16 for GPU serving; targets: output dtype."),
    tolerance: float | None = typer.Option(None, "--tolerance", help="ONNX: largest allowed max abs difference vs PyTorch (default 1e-3 fp32, 0.1 fp16)."),
    adapter_only: bool = typer.Option(False, "--adapter-only", metavar="", help="ONNX adapters: write only .onnx_adapter files for the graph in --graph."),
    graph: Path | None = typer.Option(None, "--graph", help="With --adapter-only: an existing --mode adapters export folder."),
    same_base: bool = typer.Option(False, "--same-base", metavar="", help="ONNX adapters: the adapters name different bases but were all trained on --base-model (refused otherwise)."),
    engine: str | None = typer.Option(None, "--engine", help="ONNX: genai (onnxruntime-genai, generating with KV cache; the default for causal LMs) or ort (one forward pass)."),
    device: str | None = typer.Option(None, "--device", help="ONNX: where onnxruntime verifies: auto (a GPU provider when there is one; default) or cpu."),
    cpu: bool = typer.Option(False, "--cpu", metavar="", hidden=True, help="The same as --device cpu (kept for old scripts)."),
    rank: int | None = typer.Option(None, "--rank", help="uniform: the rank every module is padded to (default: the largest)."),
    force: bool = FORCE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    allow_nonfinite: bool = ALLOW_NONFINITE,
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the export report as JSON."),
) -> None:
    """Export ADAPTER as ONNX (verified with onnxruntime), a llama.cpp GGUF, or a peft / vllm / uniform adapter;
    or a bank of adapters for onnxruntime-genai (--format bank-genai)."""
    chosen = format_named(_format(fmt, target))
    out = output or adapters[0].resolve().parent / f"{adapters[0].resolve().name}-{chosen.name}"
    given = {"base_model": base_model, "mode": mode, "dtype": dtype, "tolerance": tolerance, "adapter_only": adapter_only,
             "graph": str(graph) if graph else None, "engine": engine, "device": "cpu" if cpu else device, "rank": rank,
             "same_base": same_base, "force": force, "trust_remote_code": trust_remote_code, "allow_nonfinite": allow_nonfinite}
    report = export(adapters, out, options_for(chosen, given))
    if as_json:
        print_json(report)
        return
    for line in report.lines():
        console.print(line)
    if line := skipped_line(report.skipped(), REPORT_NAME):  # what PEFT does not load, left out
        console.print(line)


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
