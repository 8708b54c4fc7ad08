"""The measurements behind ``scripts/gpu_check.sh``: calibration of a 7B-shaped synthetic base on one GPU
(bf16 and 4-bit: peak GPU memory, step time), an fp16 ONNX export for the CUDA execution provider checked
against PyTorch, generation with onnxruntime-genai on CUDA, and a sharded (``--fsdp``) run on one GPU.

Every step runs as its own subprocess (a fresh CUDA context, its own peak, its own time limit); a step
that fails is recorded with its last error line and the others still run. ``--tiny`` runs the same
steps on tiny shapes (on the CPU when there is no GPU) to check the script itself.

    python scripts/gpu_check.py --out benchmarks/results/gpu.md           # what gpu_check.sh runs
    python scripts/gpu_check.py --tiny --out /tmp/gpu_tiny.md              # a dry run, CPU is fine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
from scale import _tokenizer  # noqa: E402
from synthetic import LlamaShape, write_llama_checkpoint, write_lora  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache" / "gpu"
SHAPES = {
    "7B": LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
    "1.1B": LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
    "tiny": LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512),
}
RANK = {"7B": 64, "1.1B": 64, "tiny": 8}
#: calibration steps and tokens per sample; 2 samples per step
STEPS, SEQ_LEN, BATCH = 4, 256, 2


def build(size: str) -> tuple[Path, Path, Path]:
    """The cached synthetic base (bf16, random init), its LoRA and calibration text (built when missing)."""
    shape = SHAPES[size]
    root = CACHE / size
    base, lora, data = root / "base", root / "lora", root / "calib.jsonl"
    if not (root / ".complete").exists():
        write_llama_checkpoint(base, shape, shard_bytes=2_000_000_000)
        _tokenizer(base, shape.vocab)
        write_lora(lora, base, shape, r=RANK[size])
        rng = random.Random(0)
        with data.open("w") as fh:
            for _ in range(64):
                fh.write(json.dumps({"text": " ".join(f"w{rng.randrange(shape.vocab - 4)}" for _ in range(SEQ_LEN))}) + "\n")
        (root / ".complete").write_text("ok\n")
    return base, lora, data


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- the steps (one process each)


def step_calibrate(size: str, quant: str, out: Path) -> dict[str, Any]:
    """A few IncreLoRA steps in this process; peak GPU memory from torch.cuda.max_memory_allocated."""
    import torch

    from loracompress.pipelines.prune import PruneOptions, prune

    base, lora, data = build(size)
    gpu = cuda()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    opts = PruneOptions(budget="0.5", method="increlora", base_model=str(base), data=str(data), steps=STEPS,
                        seq_len=SEQ_LEN, batch_size=BATCH, device="cuda" if gpu else "cpu", evaluate=False,
                        keep_best=False, force=True, gradient_checkpointing=True,
                        base_dtype="bf16", load_in_4bit=quant == "4bit", precision="bf16")
    t0 = time.perf_counter()
    report = prune(lora, out, opts)
    run = report["settings"]["run"]
    steps = run.get("step_seconds") or []
    return {"size": size, "base": quant, "seconds": round(time.perf_counter() - t0, 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
            "step_s_median": round(statistics.median(steps), 3) if steps else run.get("student_seconds_per_step"),
            "first_loss": run.get("first_loss"), "final_loss": run.get("final_loss"), "device": run.get("device")}


def step_export(size: str, out: Path) -> dict[str, Any]:
    """``loracompress export --format onnx --dtype fp16`` (genai, for the CUDA execution provider), which
    checks the graph's first-step logits and greedy tokens against PEFT in PyTorch; then a timed generation."""
    base, lora, _ = build(size)
    dtype = "fp16" if cuda() else "fp32"  # genai's fp16 graph is built for CUDA; a CPU dry run takes fp32
    done = subprocess.run([sys.executable, "-m", "loracompress", "export", str(lora), "--base-model", str(base),
                           "--format", "onnx", "--dtype", dtype, "-o", str(out), "--force", "--json"],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(_last_line(done.stderr))
    report = json.loads(done.stdout)
    result: dict[str, Any] = {"size": size, "dtype": dtype, "verification": _short(report)}
    result.update(_generate(out))
    return result


def _generate(folder: Path) -> dict[str, Any]:
    """Greedy generation of 64 tokens with onnxruntime-genai from ``folder`` (its configured provider)."""
    import onnxruntime_genai as og

    model = og.Model(str(_genai_dir(folder)))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=96, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([[1] + list(range(10, 42))])
    t0, n = time.perf_counter(), 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    seconds = time.perf_counter() - t0
    with open(_genai_dir(folder) / "genai_config.json") as fh:
        providers = json.load(fh)["model"]["decoder"].get("session_options", {}).get("provider_options", [])
    return {"generated_tokens": n, "tokens_per_s": round(n / seconds, 1) if seconds else None,
            "genai_providers": [next(iter(p)) for p in providers] or ["cpu"], "onnxruntime_genai": og.__version__}


def _genai_dir(folder: Path) -> Path:
    found = sorted(folder.rglob("genai_config.json"))
    if not found:
        raise RuntimeError(f"no genai_config.json under {folder}")
    return found[0].parent


def step_fsdp(out: Path) -> dict[str, Any]:
    """``torchrun ... --fsdp`` on the tiny shape: NCCL on one GPU (a world of one), or two gloo processes."""
    base, lora, data = build("tiny")
    gpu = cuda()
    procs = "1" if gpu else "2"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", procs, "-m",
                           "loracompress", "prune", str(lora), "--method", "increlora", "--budget", "0.5",
                           "--base-model", str(base), "--data", str(data), "--steps", "4", "--seq-len", "64",
                           "--batch-size", "2", "--device", "cuda" if gpu else "cpu", "--fsdp", "--no-eval",
                           "--no-keep-best", "-o", str(out), "--force"], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(_last_line(done.stderr))
    run = json.loads((out / "compression_report.json").read_text())["settings"]["run"]
    return {"processes": run["num_processes"], "parallel": run["parallel"], "device": run["device"],
            "backend": "nccl" if gpu else "gloo", "sharding": run.get("sharding")}


def _short(report: dict[str, Any]) -> dict[str, Any]:
    """The verification part of an export report, whatever its exact keys."""
    keep = {}
    for key, value in report.items():
        if any(w in key for w in ("verif", "max_abs", "tolerance", "generation", "provider", "check")):
            keep[key] = value
    for check in keep.get("checks") or []:  # the token ids themselves are too long for the table
        if isinstance(check, dict):
            check.pop("tokens", None)
    return keep or {"keys": sorted(report)}


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:400] if lines else "(no message)"


# --------------------------------------------------------------------------- driving and writing


def run_step(name: str, argv: list[str], timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--step", *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)
        wall = round(time.perf_counter() - t0, 1)
        if done.returncode != 0:
            return {"step": name, "ok": False, "wall_s": wall, "error": _last_line(done.stderr)}
        return {"step": name, "ok": True, "wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}
    except subprocess.TimeoutExpired:
        return {"step": name, "ok": False, "wall_s": round(time.perf_counter() - t0, 1),
                "error": f"timed out after {timeout:.0f} s"}


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if cuda() else None}
    for mod in ("transformers", "accelerate", "bitsandbytes", "onnxruntime", "onnxruntime_genai", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - absent or broken: say which
            info[mod] = f"unavailable ({type(err).__name__})"
    try:
        import onnxruntime

        info["ort_providers"] = onnxruntime.get_available_providers()
    except Exception:  # noqa: BLE001
        pass
    return info


def write_markdown(path: Path, env: dict[str, Any], rows: list[dict[str, Any]], tiny: bool, total: float) -> None:
    lines = ["# GPU check", "", "Written by `scripts/gpu_check.sh`" + (" --tiny (a dry run of the script on tiny shapes; "
             "not a measurement)" if tiny else "") + f", {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{total:.0f} s for the steps below.", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| step | ok | wall (s) | result |", "|---|---|---:|---|"]
    for r in rows:
        rest = {k: v for k, v in r.items() if k not in ("step", "ok", "wall_s")}
        lines.append(f"| {r['step']} | {'yes' if r['ok'] else 'NO'} | {r['wall_s']} | `{json.dumps(rest)}` |")
    lines += ["", "Calibration: IncreLoRA, budget 0.5, LoRA r=64 on all seven projections, "
              f"{STEPS} steps of {BATCH} × {SEQ_LEN} tokens, `--base-dtype bf16 --precision bf16 "
              "--gradient-checkpointing` (4-bit: `--load-in-4bit`); peak GPU memory is "
              "`torch.cuda.max_memory_allocated()` of the step's process, step time the median of the student steps.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a dry run of the script)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu.md")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: calibrate-bf16, calibrate-4bit, "
                                                   "export, fsdp")
    parser.add_argument("--require-gpu", action="store_true", help="refuse to run without a CUDA GPU")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)  # internal: run one step, print its JSON
    args = parser.parse_args(argv)
    if args.step:
        kind, *rest = args.step
        out = CACHE / "out" / "-".join(args.step)
        result = {"build": lambda: {"size": rest[0], "base": str(build(rest[0])[0])},
                  "calibrate": lambda: step_calibrate(rest[0], rest[1], out),
                  "export": lambda: step_export(rest[0], out), "fsdp": lambda: step_fsdp(out)}[kind]()
        print(json.dumps(result, default=str))
        return 0
    big, small = ("tiny", "tiny") if args.tiny else ("7B", "1.1B")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t0 = time.perf_counter()
    env = environment()
    if (args.require_gpu or not args.tiny) and not cuda():
        print("no CUDA GPU here: run with --tiny for a dry run", file=sys.stderr)
        return 2
    plan = [(f"build-{big}", ["build", big], 300), (f"build-{small}", ["build", small], 120),
            ("calibrate-bf16", ["calibrate", big, "bf16"], 240), ("calibrate-4bit", ["calibrate", big, "4bit"], 240),
            ("export", ["export", small], 240), ("fsdp", ["fsdp"], 120)]
    rows = []
    for name, step, limit in plan:
        if name in skip or (name.startswith("build-") and name in {r["step"] for r in rows}):
            continue
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        rows.append(run_step(name, step, limit))
        print(f"[gpu_check] {name}: {json.dumps(rows[-1], default=str)}", file=sys.stderr, flush=True)
        write_markdown(args.out, env, rows, args.tiny, time.perf_counter() - t0)  # after each: a cut-off run keeps its rows
    print(f"[gpu_check] wrote {args.out}", file=sys.stderr)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
