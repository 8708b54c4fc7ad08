"""Calibration overhead: the engine's student step against a plain PEFT LoRA training step.

Both sides train the same LoRA factors of the same model on the same batches with the same loss
(:func:`loracompress.calibration.engine.distillation_loss` against the same fixed teacher logits), the same
optimizer (AdamW on the LoRA A/B only, gradient clipping at 1.0) and no dropout. The PEFT side is
stock ``PeftModel.from_pretrained(..., is_trainable=True)``; the engine side is
:class:`loracompress.calibration.engine.Engine` itself, timed per step by the engine (the student's forward,
backward, optimizer step and the method's hooks; the teacher's no-grad forward is timed apart).
Runs are interleaved round by round so that load on the machine hits both sides alike; the
first round is a warm-up and is dropped; medians are reported.

Model: the bundled sample (MiniLM-L6 sequence classifier with its LoRA adapter) when it is built,
else all-MiniLM-L6-v2 with a fresh PEFT LoRA (r=8, the sample's targets), else the tiny test BERT.

Run::

    python benchmarks/calibration_overhead.py                  # writes benchmarks/results/calibration_overhead.md
    python benchmarks/calibration_overhead.py --threads 1 --steps 20 --rounds 4 --device auto
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loracompress.calibration.engine import Engine, EngineConfig, distillation_loss, svd_student  # noqa: E402
from loracompress.calibration.methods.base import Method  # noqa: E402
from loracompress.calibration.methods.registry import get_method  # noqa: E402
from loracompress.core.adapter import Adapter  # noqa: E402
from loracompress.core.reader import load_adapter  # noqa: E402
from loracompress.runtime.data import make_batches, model_inputs, read_examples  # noqa: E402
from loracompress.runtime.device import resolve_device  # noqa: E402
from loracompress.runtime.model import load_base_model  # noqa: E402

SAMPLE = ROOT / "samples" / "minilm-rt"
RESULTS = ROOT / "benchmarks" / "results" / "calibration_overhead.md"
TARGETS = ["query", "key", "value", "dense"]


class Keep(Method):
    """No hooks at all: the engine's own cost."""

    name = "none"

    def finalize(self) -> dict[str, int]:
        return {p: layer.active_rank for p, layer in self.ctx.layers.items()}


def _minilm_path() -> Path | None:
    sys.path.insert(0, str(ROOT / "samples"))
    from base_model_path import BaseModelNotFound, base_model_path

    try:
        return base_model_path("minilm")
    except BaseModelNotFound:
        return None


def _fresh_adapter(base_dir: Path | None, out: Path) -> tuple[Path, str]:
    """A PEFT LoRA (r=8, random non-zero B) on the base model, saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    if base_dir is None:
        from tests.tiny import make_adapter, save_tiny_base

        make_adapter("bert", out / "adapter", r=8)
        return out / "adapter", str(save_tiny_base("bert", out / "base"))
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=2, local_files_only=True)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft.save_pretrained(str(out / "adapter"))
    return out / "adapter", str(base_dir)


def _setup(tmp: Path, batch_size: int, seq_len: int, steps: int) -> tuple[Path, torch.nn.Module, list[dict[str, torch.Tensor]], str]:
    base_dir = _minilm_path()
    if base_dir is not None and (SAMPLE / "adapter" / "adapter_config.json").is_file():
        adapter_dir, base, what = SAMPLE / "adapter", str(base_dir), "bundled sample samples/minilm-rt (MiniLM-L6)"
    else:
        adapter_dir, base = _fresh_adapter(base_dir, tmp)
        what = "all-MiniLM-L6-v2 + fresh PEFT LoRA r=8" if base_dir else "tiny test BERT (MiniLM not installed)"
    loaded = load_base_model(base, load_adapter(adapter_dir))
    data = SAMPLE / "data" / "calib.jsonl"
    if data.is_file() and base_dir is not None:
        examples = read_examples(data, max_samples=steps * batch_size, seed=0)
    else:
        from loracompress.runtime.data import Example
        from tests.tiny import tiny_sentences

        examples = [Example(text=t, label=i % 2) for i, t in enumerate(tiny_sentences(steps * batch_size, max_words=40))]
    batches = make_batches(examples, loaded.tokenizer, task="cls", seq_len=seq_len, batch_size=batch_size)
    return adapter_dir, loaded.model, batches[:steps], what


def _peft_steps(adapter_dir: Path, base_model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                teacher: list[torch.Tensor], device: torch.device, lr: float) -> list[float]:
    """Plain PEFT training steps (same loss, optimizer, clipping), timed like the engine times its own."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir), is_trainable=True).to(device)
    params = []
    for name, p in model.named_parameters():
        trainable = "lora_A" in name or "lora_B" in name
        p.requires_grad_(trainable)  # the modules_to_save head stays frozen, as in the engine
        if trainable:
            params.append(p)
    model.eval()
    opt = torch.optim.AdamW(params, lr=lr)
    times = []
    for i, raw in enumerate(batches):
        t0 = time.perf_counter()
        inputs = model_inputs(raw, device)
        labels = raw["labels"].to(device) if "labels" in raw else None
        out = model(**inputs)
        loss, _ = distillation_loss(out.logits, teacher[i], labels, inputs.get("attention_mask"), "cls")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        times.append(time.perf_counter() - t0)
    return times


def _teacher_logits(adapter_dir: Path, base_model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                    device: torch.device) -> list[torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).to(device).eval()
    with torch.no_grad():
        return [model(**model_inputs(b, device)).logits.float() for b in batches]


def _engine_steps(method: Method, adapter: Adapter, base_model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                  device: str, lr: float, budget: float) -> tuple[list[float], float]:
    cfg = EngineConfig(steps=len(batches), lr=lr, warmup=0, schedule="constant", device=device, cache_teacher=False)
    target = int(adapter.num_params * budget)
    result = Engine(cfg).run(copy.deepcopy(base_model), adapter, svd_student(adapter), method, target, batches, "cls")
    return result.step_seconds, result.teacher_seconds_per_step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per side per round")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (the first is a warm-up)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lr = 1e-3
    dev = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir, base_model, batches, what = _setup(Path(tmp), args.batch_size, args.seq_len, args.steps)
        adapter = load_adapter(adapter_dir)
        what += f", LoRA r={adapter.max_rank}, {adapter.num_params:,} LoRA parameters, {len(adapter.modules)} modules"
        device = torch.device(dev)
        teacher = _teacher_logits(adapter_dir, base_model, batches, device)
        sides: dict[str, list[float]] = {"peft": [], "none": [], "prilora": [], "lorpa": []}
        paired: dict[str, list[float]] = {"peft": [], "none": [], "prilora": [], "lorpa": []}
        teacher_times: list[float] = []
        for r in range(args.rounds):
            times = {"peft": _peft_steps(adapter_dir, base_model, batches, teacher, device, lr)}
            for name in ("none", "prilora", "lorpa"):
                # PRILoRA prunes every 1/20 of a run: for the sample's default 189 steps, every 9 steps.
                method = Keep() if name == "none" else get_method(name, **({"interval": 9} if name == "prilora" else {}))
                times[name], t_teacher = _engine_steps(method, adapter, base_model, batches, dev, lr,
                                                       1.0 if name == "none" else 0.25)
                teacher_times.append(t_teacher)
            if r > 0:  # round 0 warms up allocators and caches
                for k, v in times.items():
                    sides[k].extend(v[1:])
                    paired[k].append(statistics.median(v[1:]) / statistics.median(times["peft"][1:]))
            print(f"round {r}: " + ", ".join(f"{k} {1e3 * statistics.median(v):.1f} ms" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in sides.items()}
    teacher_ms = 1e3 * statistics.median(teacher_times[len(teacher_times) // args.rounds:] or teacher_times)
    rows = [f"| {name} | {1e3 * med[key]:.1f} | {med[key] / med['peft']:.3f}× | {statistics.median(paired[key]):.3f}× |"
            for name, key in (("plain PEFT LoRA step", "peft"), ("engine, no method hooks", "none"),
                              ("engine + prilora hooks", "prilora"), ("engine + lorpa hooks", "lorpa"))]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [
        "# Calibration overhead: engine student step vs plain PEFT LoRA step",
        "",
        f"Command: `python benchmarks/calibration_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        "",
        f"- model: {what}",
        f"- batch: {args.batch_size} samples, up to {args.seq_len} tokens (calibration data), {args.steps} steps per side per round, "
        f"{args.rounds} interleaved rounds (first dropped), median per step",
        "- same loss (KD, T=2, + CE on labels), AdamW on LoRA A/B only, grad clip 1.0, no dropout, fp32; "
        "prilora with `interval=9` (its default for the sample's 189-step run), lorpa with its defaults",
        f"- device: {dev}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
        f"{platform.processor() or platform.machine()}" + (f", load average {load[0]:.1f} at the end" if load else ""),
        "",
        "| step | ms / step (median of all steps) | vs PEFT | vs PEFT, median of per-round ratios |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"Teacher forward (no grad, one pass through the same base weights in teacher mode), reported apart: "
        f"**{teacher_ms:.1f} ms** per step when not cached; with data reused across epochs the engine caches "
        "the teacher logits per batch (a few KB for a classifier) and pays it once per batch.",
        "",
        "Target: engine step ≤ 1.10× the plain PEFT step.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
