"""ONNX export: onnxruntime vs PyTorch eager latency, rank-heterogeneous vs padded adapters, file sizes.

On the bundled sample (MiniLM-L6 sequence classifier with its LoRA adapter, compressed here by
``prune --budget``), in one run:

- PyTorch eager, base + adapter as LoRA layers (what the user had) and merged;
- onnxruntime, ``--mode merged`` graph;
- onnxruntime, ``--mode adapters`` graph (one graph) with: no adapter (base only), the
  compressed adapter with its own per-module ranks, and the same adapter zero-padded to its max
  rank (``export --target uniform``), each activated through ``RunOptions.add_active_adapter``;
- when onnxruntime-gpu and a GPU are there: the ``--dtype fp16`` merged graph on CUDA.

Every export is verified by the library (max abs difference vs PyTorch, recorded below). Runs are
interleaved round by round so load on the machine hits all engines alike; medians are reported.
The same thread count is given to PyTorch and onnxruntime.

    python benchmarks/export_latency.py                     # writes benchmarks/results/export_latency.md
    python benchmarks/export_latency.py --adapter A --base-model B --budget 0.5 --batch 8 --seq 64 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "samples"))

from loracompress.core.reader import load_adapter  # noqa: E402
from loracompress.export.onnx import OnnxOptions, export_onnx  # noqa: E402
from loracompress.export.targets import export_target  # noqa: E402
from loracompress.merging.inplace import merge_into  # noqa: E402
from loracompress.pipelines.prune import PruneOptions, prune  # noqa: E402
from loracompress.runtime.layers import attach  # noqa: E402
from loracompress.runtime.model import load_base_model  # noqa: E402

SAMPLE = ROOT / "samples" / "minilm-rt"
RESULTS = ROOT / "benchmarks" / "results" / "export_latency.md"


def default_base() -> str:
    from base_model_path import base_model_path

    return str(base_model_path("minilm"))


def texts(n: int) -> list[str]:
    path = SAMPLE / "data" / "test.jsonl"
    if path.is_file():
        rows = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return (rows * (n // max(len(rows), 1) + 1))[:n]
    return [f"sample sentence number {i} for timing" for i in range(n)]


def make_inputs(tokenizer: Any, model: torch.nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    if tokenizer is not None:
        enc = tokenizer(texts(batch), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def ort_session(path: Path, threads: int, provider: str = "CPUExecutionProvider") -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [provider]
    return ort.InferenceSession(str(path), options, providers=providers)


def ort_runner(session: Any, inputs: dict[str, torch.Tensor], adapter_file: Path | None = None) -> Callable[[], Any]:
    import onnxruntime as ort

    feeds = {k: v.numpy() for k, v in inputs.items()}
    run_options, lora = None, None
    if adapter_file is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter_file))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(lora)

    def run() -> Any:
        _ = lora  # the closure keeps the adapter alive as long as the options that point to it
        return session.run(None, feeds, run_options)

    return run


def torch_runner(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(**inputs)

    return run


def timed(runners: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(warmup + rounds):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
    return times


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(SAMPLE / "adapter"))
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--budget", default="0.5")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    base_spec = args.base_model or default_base()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        small, padded = tmp / "compressed", tmp / "padded"
        t0 = time.perf_counter()
        prune(args.adapter, small, PruneOptions(budget=args.budget))
        export_target(small, padded, "uniform")
        merged_report = export_onnx([small], tmp / "onnx-merged", OnnxOptions(base_model=base_spec))
        adapters_report = export_onnx([small, padded], tmp / "onnx-adapters", OnnxOptions(base_model=base_spec, mode="adapters"))
        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        fp16_report = None
        if cuda:
            fp16_report = export_onnx([small], tmp / "onnx-fp16", OnnxOptions(base_model=base_spec, dtype="fp16"))
        export_seconds = time.perf_counter() - t0

        adapter = load_adapter(small)
        base = load_base_model(base_spec, adapter)
        inputs = make_inputs(base.tokenizer, base.model, args.batch, args.seq)
        eager_lora = base.model
        eager_merged = copy.deepcopy(eager_lora)
        merge_into(eager_merged, adapter)
        attach(eager_lora, adapter)
        merged_session = ort_session(tmp / "onnx-merged" / "model.onnx", args.threads)
        adapters_session = ort_session(tmp / "onnx-adapters" / "model.onnx", args.threads)
        runners = {
            "PyTorch eager, base + LoRA layers": torch_runner(eager_lora, inputs),
            "PyTorch eager, merged": torch_runner(eager_merged, inputs),
            "onnxruntime, merged graph": ort_runner(merged_session, inputs),
            "onnxruntime, adapters graph, no adapter": ort_runner(adapters_session, inputs),
            "onnxruntime, adapters graph, compressed (own ranks)": ort_runner(
                adapters_session, inputs, tmp / "onnx-adapters" / "compressed.onnx_adapter"),
            "onnxruntime, adapters graph, padded to max rank": ort_runner(
                adapters_session, inputs, tmp / "onnx-adapters" / "padded.onnx_adapter"),
        }
        if fp16_report is not None and fp16_report["provider"] == "CUDAExecutionProvider":
            runners["onnxruntime CUDA, merged fp16 graph"] = ort_runner(
                ort_session(tmp / "onnx-fp16" / "model.onnx", args.threads, "CUDAExecutionProvider"), inputs)
        times = timed(runners, args.rounds, args.warmup)
        sizes = {
            "compressed adapter (PEFT safetensors)": size(small / "adapter_model.safetensors"),
            "padded adapter (PEFT safetensors)": size(padded / "adapter_model.safetensors"),
            "merged graph (model.onnx + data)": sum(merged_report["file_bytes"].get(f, 0) for f in merged_report["files"]),
            "adapters graph (model.onnx + data)": sum(
                adapters_report["file_bytes"][f] for f in adapters_report["files"] if not f.endswith(".onnx_adapter")),
            "compressed.onnx_adapter": adapters_report["file_bytes"]["compressed.onnx_adapter"],
            "padded.onnx_adapter": adapters_report["file_bytes"]["padded.onnx_adapter"],
        }
        text = render(args, base_spec, adapter, load_adapter(args.adapter), times, sizes, merged_report, adapters_report,
                      fp16_report, export_seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)
    return 0


def render(args: argparse.Namespace, base_spec: str, adapter: Any, original: Any, times: dict[str, list[float]],
           sizes: dict[str, int], merged: dict[str, Any], adapters: dict[str, Any], fp16: dict[str, Any] | None,
           export_seconds: float) -> str:
    import onnxruntime as ort

    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["PyTorch eager, base + LoRA layers"]
    ranks = sorted({m.rank for m in adapter.modules.values()})
    lines = [
        "# ONNX export latency and size",
        "",
        f"Generated by `python benchmarks/export_latency.py` on {time.strftime('%Y-%m-%d')} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, 1-min load average {os.getloadavg()[0]:.1f} at the end; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}).",
        "",
        f"- adapter: `{Path(args.adapter).relative_to(ROOT) if Path(args.adapter).is_relative_to(ROOT) else args.adapter}` "
        f"({original.num_params:,} LoRA parameters, max rank {original.max_rank}), compressed with "
        f"`prune --budget {args.budget}` to {adapter.num_params:,} parameters, per-module ranks {ranks[0]}..{ranks[-1]} "
        f"({len(ranks)} distinct) over {len(adapter.modules)} modules",
        f"- base model: `{original.config.get('base_model_name_or_path') or Path(base_spec).name}`; "
        f"batch {args.batch} × {args.seq} tokens of the sample's test texts",
        f"- {args.threads} thread{'s' if args.threads != 1 else ''} for PyTorch and onnxruntime alike; {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up rounds; median and min per forward pass",
        f"- exports (prune, uniform padding, merged + adapters ONNX, each verified): {export_seconds:.0f} s in all",
        "",
        "| engine | median ms | min ms | vs PyTorch eager base + LoRA |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        lines.append(f"| {name} | {med[name]:.3g} | {min(values):.3g} | {med[name] / ref:.3g}× |")
    het = med["onnxruntime, adapters graph, compressed (own ranks)"]
    pad = med["onnxruntime, adapters graph, padded to max rank"]
    lines += [
        "",
        f"onnxruntime merged / PyTorch eager merged: **{med['onnxruntime, merged graph'] / med['PyTorch eager, merged']:.3g}×**; "
        f"adapters graph with the compressed adapter / the same adapter padded to rank {adapter.max_rank}: "
        f"**{het / pad:.2f}×** (latency), "
        f"**{sizes['compressed.onnx_adapter'] / sizes['padded.onnx_adapter']:.2f}×** (adapter file size).",
        "",
        "## Files",
        "",
        "| file | bytes | MiB |",
        "|---|---:|---:|",
    ]
    for name, n in sizes.items():
        lines.append(f"| {name} | {n:,} | {n / 2**20:.2f} |")
    lines += [
        "",
        "## Verification (onnxruntime vs PyTorch base + adapter, fp32, on a probe batch)",
        "",
        "| export | check | max abs difference | tolerance |",
        "|---|---|---:|---:|",
    ]
    for label, report in (("merged", merged), ("adapters", adapters), ("merged fp16 (CUDA)", fp16)):
        for check in (report or {}).get("checks", []):
            lines.append(f"| {label} | {check['name']} | {check['max_abs_diff']:.3g} | {check['tolerance']:.3g} |")
    lines += ["", f"Verification provider: {merged['provider']} ({merged['provider_reason']})."]
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        lines += ["", "The machine was shared (load average above its core count): absolute times are inflated and "
                      "noisy; the ratios come from interleaved rounds and are the numbers to read."]
    if fp16 is None:
        lines += ["", "fp16 CUDA path: not run here (no onnxruntime-gpu / GPU on this machine)."]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
