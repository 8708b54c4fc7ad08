"""``loracompress merge``: fold an adapter into its base model (Hugging Face folder, safetensors)."""

from __future__ import annotations

from pathlib import Path

import typer

from loracompress.pipelines.merge import MERGE_REPORT, MergeOptions, merge_adapter
from loracompress_cli.common import console, human_bytes, print_json, skipped_line
from loracompress_cli.options import ALLOW_NONFINITE, BASE_MODEL, FORCE, TRUST_REMOTE_CODE


def merge_cmd(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder to merge."),
    output: Path = typer.Option(..., "--output", "-o", help="Output model folder."),
    base_model: str | None = BASE_MODEL,
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default: each tensor keeps the base's dtype)."),
    max_shard_size: str | None = typer.Option(
        None, "--max-shard-size", help="Re-shard the output, e.g. 2GB, 500MB (default: the base's own shard layout)."),
    verify: str = typer.Option(
        "auto", "--verify", help="modules (every merged module on random probes, no model in memory), full (also the "
        "whole model's logits), auto (full when the model fits in memory comfortably)."),
    tolerance: float | None = typer.Option(None, "--tolerance", help="Largest allowed max abs difference, merged vs base+adapter, in fp32 (default 1e-3)."),
    into: str | None = typer.Option(
        None, "--into", help="dequantized: merge into the weights a 4-bit/FP8 base computes with (dequant(W4) for a "
        "QLoRA adapter); original: into the 16-bit weights as stored. Default: dequantized when the base is quantized "
        "or the adapter was trained on a 4-bit base (its model card, its compression report, or --load-in-4bit)."),
    load_in_4bit: bool = typer.Option(
        False, "--load-in-4bit", metavar="", help="The adapter was trained on this 16-bit base loaded in 4-bit (QLoRA, NF4): merge "
        "into dequant(NF4(W)), written in the base's dtype (needs bitsandbytes; runs on the CPU)."),
    force: bool = FORCE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    allow_nonfinite: bool = ALLOW_NONFINITE,
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the merge report as JSON."),
) -> None:
    """Merge ADAPTER into its base model (streaming, shard by shard, fp32 arithmetic), check it, save it."""
    options = MergeOptions(base_model=base_model, dtype=dtype, max_shard_size=max_shard_size, verify=verify,
                           tolerance=tolerance, force=force, trust_remote_code=trust_remote_code,
                           allow_nonfinite=allow_nonfinite, into=into, load_in_4bit=load_in_4bit)
    report = merge_adapter(adapter, output, options)
    if as_json:
        print_json(report)
        return
    shards = len(report["shards"])
    how = "streamed shard by shard" if report["streamed"] else "in memory"
    console.print(f"merged {report['modules_merged']} LoRA modules into a new copy of the base model "
                  f"{report['base_model']} ({how}; {report['dtype']}, {shards} safetensors shard{'s' if shards != 1 else ''}, "
                  f"{human_bytes(report['bytes'])})")
    if report.get("into") == "dequantized" or report.get("into_reason", "").startswith("--into original, though"):
        console.print(f"merged into the {report['into']} base weights: {report['into_reason']}")
    if report["vocab_resized"]:
        old, new = report["vocab_resized"]
        console.print(f"resized the base's vocabulary from {old} to {new} tokens, the size of the adapter's saved "
                      "embeddings (as PEFT does)")
    if report["untied"]:
        console.print(f"untied {', '.join(report['untied'])} from the input embeddings: the LoRA changes the head only")
    mc = report["module_check"]
    line = f"check of {mc['modules']} merged modules on random probes: max abs difference {mc['max_abs_diff']:.3g} (fp32)"
    if report["dtype"] != "fp32" and mc["max_abs_diff_output_dtype"] is not None:
        line += f", {mc['max_abs_diff_output_dtype']:.3g} ({report['dtype']})"
    console.print(line)
    if report["verify"] == "full":
        line = f"check on a probe batch: max abs difference merged vs base+adapter {report['max_abs_diff']:.3g} (fp32)"
        if report["dtype"] != "fp32" and report["max_abs_diff_output_dtype"] is not None:
            line += f", {report['max_abs_diff_output_dtype']:.3g} ({report['dtype']})"
        console.print(line + f"; tolerance {report['tolerance']:.3g}")
    if line := skipped_line(report.get("skipped"), MERGE_REPORT):
        console.print(line)
    console.print(f"wrote the merged model to {output} (and {MERGE_REPORT}); the base model was not changed")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_cmd)
