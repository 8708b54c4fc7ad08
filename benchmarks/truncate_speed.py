"""Training-free compression speed and memory on a Llama-7B-shaped adapter, side by side.

A synthetic adapter with Llama-7B shapes (32 layers × q,k,v,o,gate,up,down, r=64, fp16,
~320 MB) is compressed to ``--budget 0.5`` by loracompress, and compared in the same run with

- a plain load + save of the same file (safetensors), the floor any tool pays, and
- PEFT's own LoRA→LoRA conversion (``peft.tuners.lora.conversion.convert_to_lora``) on as many
  decoder layers as finish in reasonable time (it forms each dense ``out×in`` delta and runs a
  full SVD on it, and needs the base layers in memory), compared per layer.

Each measurement runs in a fresh subprocess so its peak RSS is its own. Results are written to
``benchmarks/results/truncate_speed.md``.

    python benchmarks/truncate_speed.py [--layers 32] [--peft-layers 1] [--rank 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "truncate_speed.md"
HIDDEN, INTER = 4096, 11008
SHAPES = {  # name -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def make_adapter(directory: Path, layers: int, rank: int, seed: int = 0) -> Path:
    """A PEFT-format adapter with Llama-7B shapes and a decaying spectrum, fp16."""
    from loracompress.core.safeio import write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    decay = torch.tensor([0.93**i for i in range(rank)])
    tensors = {}
    for layer in range(layers):
        for name, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, inp, generator=g) / inp**0.5).half()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * decay * 0.02).half()
    write_safetensors(directory / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "base_model_name_or_path": "synthetic/llama-7b-shapes", "fan_in_fan_out": False}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


# ----------------------------------------------------------------- measured jobs (run in subprocesses)


def _reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (after imports) and return the current RSS in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # "5" resets VmHWM to the current RSS (Linux)
            fh.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    """Peak RSS (MiB) since the last :func:`_reset_peak`."""
    return _status_mb("VmHWM")


def job_load_save(src: Path, dst: Path) -> dict:
    from safetensors.torch import load_file, save_file

    base = _reset_peak()
    t0 = time.perf_counter()
    tensors = load_file(str(src / "adapter_model.safetensors"))
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    return {"seconds": time.perf_counter() - t0, "peak_mb": _rss_mb() - base}


def job_loracompress(src: Path, dst: Path, budget: str) -> dict:
    import loracompress.cuts.svd  # noqa: F401  (imports are not what is measured)
    from loracompress.pipelines.prune import PruneOptions, prune

    base = _reset_peak()
    t0 = time.perf_counter()
    report = prune(src, dst, PruneOptions(budget=budget, force=True))
    return {"seconds": time.perf_counter() - t0, "peak_mb": _rss_mb() - base,
            "params_before": report["params_before"], "params_after": report["params_after"],
            "retained_energy": report["retained_energy"]}


def job_ours_per_layer(src: Path, layers: int, budget: str) -> dict:
    """loracompress's SVD work on the first ``layers`` decoder layers only, for the per-layer comparison."""
    from loracompress.core.budget import Budget
    from loracompress.core.reader import load_adapter
    from loracompress.cuts.svd import compress_svd

    adapter = load_adapter(src)
    keep = {p: m for p, m in adapter.modules.items() if int(p.split(".")[2]) < layers}
    sub = adapter.replace(keep)
    t0 = time.perf_counter()
    compress_svd(sub, Budget.parse(budget))
    return {"seconds": time.perf_counter() - t0, "modules": len(keep)}


def job_peft(src: Path, layers: int, rank: int) -> dict:
    """PEFT's convert_to_lora on a model holding the first ``layers`` Llama-7B decoder layers."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.conversion import convert_to_lora
    from safetensors import safe_open
    from torch import nn

    warnings.filterwarnings("ignore")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.Module()
            self.mlp = nn.Module()
            for name, (out, inp) in SHAPES.items():
                group, leaf = name.split(".")
                # PEFT needs the base layers; made on "meta" and left uninitialised to keep the set-up cheap
                setattr(getattr(self, group), leaf, nn.Linear(inp, out, bias=False, dtype=torch.float16, device="meta"))

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(Block() for _ in range(layers))

    model = Tiny().to_empty(device="cpu")
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[n.split(".")[1] for n in SHAPES])
    peft_model = get_peft_model(model, cfg)
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f, torch.no_grad():
        for name, mod in peft_model.base_model.model.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                mod.lora_A["default"].weight.copy_(f.get_tensor(f"base_model.model.{name}.lora_A.weight").float())
                mod.lora_B["default"].weight.copy_(f.get_tensor(f"base_model.model.{name}.lora_B.weight").float())
    t0 = time.perf_counter()
    convert_to_lora(peft_model, rank // 2)  # rank r/2 everywhere = the same 0.5 budget, uniformly
    return {"seconds": time.perf_counter() - t0, "modules": layers * len(SHAPES)}


def _run_job(name: str, *args: str, timeout: float | None = None) -> dict | None:
    """Run one measurement in a fresh process; ``None`` if it did not finish within ``timeout``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--job", name, *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        raise RuntimeError(f"job {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--peft-layers", type=int, default=1, help="decoder layers PEFT converts (7 modules each)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--peft-timeout", type=float, default=900, help="seconds PEFT may take before it is reported as a bound")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.job:
        fn = {"load_save": lambda s, d: job_load_save(Path(s), Path(d)),
              "loracompress": lambda s, d, b: job_loracompress(Path(s), Path(d), b),
              "ours_per_layer": lambda s, n, b: job_ours_per_layer(Path(s), int(n), b),
              "peft": lambda s, n, r: job_peft(Path(s), int(n), int(r))}[a.job]
        print(json.dumps(fn(*a.args)))
        return

    work = Path(tempfile.mkdtemp(prefix="lc-speed-"))
    try:
        src = make_adapter(work / "adapter", a.layers, a.rank)
        size_mb = (src / "adapter_model.safetensors").stat().st_size / 2**20
        io = _run_job("load_save", str(src), str(work / "copy"))
        ours = _run_job("loracompress", str(src), str(work / "small"), a.budget)
        ours_l = _run_job("ours_per_layer", str(src), str(a.peft_layers), a.budget)
        peft = _run_job("peft", str(src), str(a.peft_layers), str(a.rank), timeout=a.peft_timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n_mod = a.layers * len(SHAPES)
    ours_per_layer = ours_l["seconds"] / a.peft_layers
    finished = peft is not None
    # a run that did not finish is reported as a lower bound
    peft_per_layer = (peft["seconds"] if finished else a.peft_timeout) / a.peft_layers
    bound = "" if finished else "> "
    peft_full_est = peft_per_layer * a.layers
    threads = os.environ.get("OMP_NUM_THREADS")
    command = shlex.join(["python", "benchmarks/truncate_speed.py", *sys.argv[1:]])
    command = f"OMP_NUM_THREADS={threads} {command}" if threads else command
    lines = [
        "# Training-free compression speed (Llama-7B-shaped adapter)",
        "",
        f"Synthetic adapter: {a.layers} layers × q,k,v,o,gate,up,down ({n_mod} modules), r={a.rank}, fp16, "
        f"{size_mb:.0f} MiB; budget `{a.budget}`. One run, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={threads or 'unset'}, torch {torch.__version__}. Command: `{command}`.",
        "",
        "| job | wall time | peak RSS over start | ratio |",
        "|---|---:|---:|---:|",
        f"| plain load + save of the file (safetensors) | {io['seconds']:.2f} s | {io['peak_mb']:.0f} MiB | 1.00× |",
        f"| `loracompress prune --budget {a.budget}` (load, SVD, global allocation, save) | {ours['seconds']:.2f} s | "
        f"{ours['peak_mb']:.0f} MiB | {ours['seconds'] / io['seconds']:.2f}× load+save |",
        "",
        f"Peak memory of loracompress: {ours['peak_mb'] / size_mb:.2f}× the file size (target ≤ 2×). "
        f"Time: {ours['seconds'] / io['seconds']:.2f}× a plain load+save (target ≤ 2×). "
        f"Parameters {ours['params_before']:,} → {ours['params_after']:,}, retained energy {ours['retained_energy']:.4f}.",
        "",
        "## Per decoder layer against PEFT's conversion",
        "",
        "| per decoder layer (7 modules) | seconds | ratio |",
        "|---|---:|---:|",
        f"| PEFT `convert_to_lora` (dense delta + full SVD), {a.peft_layers} layer(s) measured | {bound}{peft_per_layer:.2f} | "
        f"{bound}{peft_per_layer / ours_per_layer:.0f}× slower |",
        f"| loracompress SVD (r×r Gram-reduced, O((in+out)·r²)) | {ours_per_layer:.3f} | 1× |",
        "",
        f"Extrapolated to all {a.layers} layers PEFT would take {bound or '~'}{peft_full_est / 60:.1f} min (plus holding the base "
        f"layers in memory) against {ours['seconds']:.1f} s for the whole loracompress run, I/O included.",
        "",
    ]
    notes = RESULTS.with_name("truncate_speed_notes.md")  # the hand-written reading of these numbers
    if notes.exists():
        lines += [notes.read_text(encoding="utf-8").rstrip(), ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
