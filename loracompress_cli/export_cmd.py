"""``loracompress export``: ship an adapter as ONNX (merged or multi-LoRA), a llama.cpp GGUF, or for a serving engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from loracompress.core.adapter import parse_dtype
from loracompress.errors import LoraCompressError
from loracompress.export import REPORT_NAME, TARGETS, OnnxOptions, export_onnx, export_target
from loracompress.export.gguf import export_gguf
from loracompress_cli.common import console, human_bytes, print_json
from loracompress_cli.options import ALLOW_NONFINITE, BASE_MODEL, FORCE, TRUST_REMOTE_CODE

FORMATS = ("onnx", *TARGETS, "gguf")


def _format(fmt: str | None, target: str | None) -> str:
    if fmt and target and fmt != target:
        raise LoraCompressError(f"--format {fmt} and --target {target} disagree; pass --format alone")
    chosen = (fmt or target or "peft").lower()
    if chosen not in FORMATS:
        raise LoraCompressError(f"unknown format {chosen!r}: use one of {', '.join(FORMATS)}")
    return chosen


def export_cmd(
    adapters: list[Path] = typer.Argument(..., help="PEFT adapter folder(s); several only with --mode adapters."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (default: ADAPTER-FORMAT)."),
    fmt: str | None = typer.Option(None, "--format", "-f", help="onnx, peft (default), vllm, uniform or gguf (llama.cpp / Ollama)."),
    target: str | None = typer.Option(None, "--target", hidden=True, help="The same as --format (kept for old scripts)."),
    base_model: str | None = BASE_MODEL,
    mode: str = typer.Option("merged", "--mode", help="ONNX: merged (one graph, adapter folded in) or adapters (multi-LoRA)."),
    dtype: str | None = typer.Option(None, "--dtype", help="ONNX: fp32 (default) or fp16 for GPU serving; targets: output dtype."),
    tolerance: float | None = typer.Option(None, "--tolerance", help="ONNX: largest allowed max abs difference vs PyTorch (default 1e-3 fp32, 0.1 fp16)."),
    adapter_only: bool = typer.Option(False, "--adapter-only", metavar="", help="ONNX adapters: write only .onnx_adapter files for the graph in --graph."),
    graph: Path | None = typer.Option(None, "--graph", help="With --adapter-only: an existing --mode adapters export folder."),
    same_base: bool = typer.Option(False, "--same-base", metavar="", help="ONNX adapters: the adapters name different bases but were all trained on --base-model (refused otherwise)."),
    engine: str = typer.Option("auto", "--engine", help="ONNX: genai (onnxruntime-genai, generating with KV cache; the default for causal LMs) or ort (one forward pass)."),
    device: str = typer.Option("auto", "--device", help="ONNX: where onnxruntime verifies: auto (a GPU provider when there is one) or cpu."),
    cpu: bool = typer.Option(False, "--cpu", metavar="", hidden=True, help="The same as --device cpu (kept for old scripts)."),
    rank: int | None = typer.Option(None, "--rank", help="uniform: the rank every module is padded to (default: the largest)."),
    force: bool = FORCE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    allow_nonfinite: bool = ALLOW_NONFINITE,
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the export report as JSON."),
) -> None:
    """Export ADAPTER as ONNX (verified with onnxruntime) or as a peft / vllm / uniform adapter."""
    chosen = _format(fmt, target)
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise LoraCompressError(f"unknown --device {device!r}; use auto, cpu or cuda")
    prefer_gpu = device != "cpu" and not cpu
    out = output or adapters[0].resolve().parent / f"{adapters[0].resolve().name}-{chosen}"
    if chosen != "onnx" and len(adapters) != 1:
        raise LoraCompressError(f"--format {chosen} takes one adapter folder")
    if chosen == "gguf":
        record = export_gguf(adapters[0], out, base_model=base_model, dtype=parse_dtype(dtype), force=force,
                             trust_remote_code=trust_remote_code, allow_nonfinite=allow_nonfinite)
        _print_gguf(record, as_json)
        return
    if chosen != "onnx":
        record = export_target(adapters[0], out, chosen, rank=rank, dtype=parse_dtype(dtype), force=force,
                               allow_nonfinite=allow_nonfinite)
        _print_target(record, as_json)
        return
    options = OnnxOptions(base_model=base_model, mode=mode, dtype=dtype or "fp32", tolerance=tolerance,
                          adapter_only=adapter_only, graph=str(graph) if graph else None, force=force, same_base=same_base,
                          trust_remote_code=trust_remote_code, prefer_gpu=prefer_gpu, allow_nonfinite=allow_nonfinite, engine=engine)
    report = export_onnx(adapters, out, options)
    if report.get("engine") == "onnxruntime-genai":
        _print_genai(report, out, as_json)
        return
    if as_json:
        print_json(report)
        return
    what = "adapter files for the existing graph" if report["adapter_only"] else f"{report['mode']} ONNX ({report['dtype']})"
    console.print(f"exported {what}; verified with onnxruntime on {report['provider']} ({report['provider_reason']})")
    for check in report["checks"]:
        console.print(f"  {check['name']}: max abs difference vs PyTorch {check['max_abs_diff']:.3g} "
                      f"(tolerance {check['tolerance']:.3g})")
    for name, size in report["file_bytes"].items():
        console.print(f"  {name}: {human_bytes(size)}")
    console.print(f"wrote {out} (and {REPORT_NAME})")


def _print_genai(report: dict[str, Any], out: Path, as_json: bool) -> None:
    if as_json:
        print_json(report)
        return
    console.print(f"exported {report['mode']} ONNX ({report['dtype']}) for onnxruntime-genai; greedy generation verified "
                  f"against PEFT on {report['verified_on']}")
    for check in report["checks"]:
        ties = f", {len(check['near_ties'])} near-tie divergence(s)" if check["near_ties"] else ""
        console.print(f"  {check['name']}: tokens identical {check['tokens_identical']}{ties}; first-step logits "
                      f"max abs difference {check['first_step_max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g})")
    for name, size in report["file_bytes"].items():
        console.print(f"  {name}: {human_bytes(size)}")
    console.print(f"wrote {out} (and {REPORT_NAME})")


def _print_target(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(record)
        return
    line = f"{record['target']} adapter: {record['modules']} modules, {human_bytes(record['bytes'])}"
    if record["target"] == "vllm":
        line += f"; global r = lora_alpha = {record['max_lora_rank']}: serve with --max-lora-rank {record['max_lora_rank']} (or more)"
    elif record["target"] == "uniform":
        line += f"; every module at rank {record['rank']}"
    console.print(line)
    for key in record.get("dropped", []):
        console.print(f"  left out {key.removeprefix('base_model.model.')}: PEFT's copy of the base model's layer "
                      "(save_embedding_layers); vLLM uses the base model's own")
    console.print(f"wrote {record['output']} (and {REPORT_NAME})")


def _print_gguf(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(record)
        return
    check = record["check"]
    console.print(f"llama.cpp LoRA GGUF ({record['dtype']}, {record['architecture']}): {record['modules']} modules, "
                  f"ranks {min(record['ranks'].values())}-{record['max_rank']}, adapter.lora.alpha = {record['lora_alpha']:g}, "
                  f"{human_bytes(record['bytes'])}")
    console.print(f"  read back: max relative ΔW error {check['max_rel_error']:.3g} (tolerance {check['tolerance']:.3g})")
    console.print(f"wrote {record['output']}/{record['file']}; serve with: llama-server -m BASE.gguf --lora "
                  f"{record['output']}/{record['file']}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
