#!/usr/bin/env python
"""Peak host memory and step time of a short calibration on a bf16-stored base, with and without the
memory flags (``--base-dtype bf16``, ``--gradient-checkpointing``, ``--teacher-top-k``).

A synthetic Llama (random init, saved in bf16, like the checkpoints people download) gets a random
stock-PEFT LoRA on all seven projections. Each setting runs ``loracompress prune --steps N`` in its own
subprocess; peak RSS is that subprocess's ``ru_maxrss``, measured by a small wrapper process so that
runs never see each other's peak. The floor row is a process that only imports the CLI and torch.
The same run compares the result of the bf16-stored base with the fp32 one (relative Frobenius
difference of each module's ΔW) and the engine's own step timings.

    python benchmarks/calibration_memory.py            # writes benchmarks/results/calibration_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Runs CMD..., prints the child's peak RSS in KiB on the last line of stderr.
_WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
         "sys.stderr.write('\\nPEAK_KIB %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
         "sys.exit(r)")

SETTINGS = [
    ("fp32 base, full-vocabulary teacher targets (calibration before these flags)", ["--teacher-top-k", "0"]),
    ("fp32 base, defaults (the CPU default; targets auto)", []),
    ("--base-dtype bf16", ["--base-dtype", "bf16"]),
    ("--base-dtype bf16 --gradient-checkpointing", ["--base-dtype", "bf16", "--gradient-checkpointing"]),
]


def build(root: Path, hidden: int, layers: int, inter: int, vocab: int, rank: int) -> tuple[Path, Path, Path, int]:
    """A bf16 Llama folder (with the tests' tiny tokenizer), a random PEFT LoRA on it, calibration text."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import LLAMA_TARGETS, tiny_sentences, tiny_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    base = root / "base"
    model.save_pretrained(str(base))
    tok = tiny_tokenizer("llama")
    tok.model_max_length = cfg.max_position_embeddings  # the tests' tokenizer says 64
    tok.save_pretrained(str(base))
    params = sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LLAMA_TARGETS,
                                            task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in peft.modules():
            if hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_B", {}):
                B = mod.lora_B["default"].weight
                B.copy_(torch.randn(B.shape, generator=g, dtype=torch.float32).to(B.dtype) * 0.02)
    adapter = root / "adapter"
    peft.save_pretrained(str(adapter))
    data = root / "calib.jsonl"
    words = tiny_sentences(256, seed=1, min_words=60, max_words=120)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in words), encoding="utf-8")
    del peft, model
    return base, adapter, data, params


def peak_run(cmd: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    done = subprocess.run([sys.executable, "-c", _WRAP, *cmd], env=env, capture_output=True, text=True)
    peak = int(done.stderr.strip().splitlines()[-1].split()[1]) / 2**20  # GiB
    return done.returncode, peak, done.stderr


def delta_gap(a: Path, b: Path) -> float:
    """Largest relative Frobenius difference of a module's ΔW between two outputs."""
    import torch

    from loracompress.core.reader import load_adapter

    x, y = load_adapter(a), load_adapter(b)
    gaps = []
    for path, m in x.modules.items():
        if path in y.modules:
            d = m.delta()
            gaps.append(float(torch.linalg.norm(y.modules[path].delta() - d) / torch.linalg.norm(d)))
    return max(gaps) if gaps else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration_memory.md")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter, data, params = build(root, args.hidden, args.layers, args.intermediate, args.vocab, args.rank)
        file_gib = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30
        _, floor, _ = peak_run([sys.executable, "-c", "import torch, transformers, loracompress_cli.app"], env)
        rows = []
        for label, extra in SETTINGS:
            out = root / f"out{len(rows)}"
            cmd = [sys.executable, "-m", "loracompress", "prune", str(adapter), "--budget", "0.25", "--method", "lorpa",
                   "--base-model", str(base), "--data", str(data), "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--seq-len", str(args.seq_len), "--device", "cpu", "--no-eval", "--json",
                   "-o", str(out), *extra]
            code, peak, err = peak_run(cmd, env)
            if code != 0:
                raise SystemExit(f"{label}: exit {code}\n{err[-3000:]}")
            run = json.loads((out / "compression_report.json").read_text())["settings"]["run"]
            rows.append((label, peak, run, out))
            print(f"{label}: peak {peak:.2f} GiB", file=sys.stderr)
        gap = delta_gap(rows[1][3], rows[2][3])
    lines = [
        "# Calibration memory on a bf16-stored base (CPU)",
        "",
        f"Synthetic Llama, {params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab "
        f"{args.vocab}), saved in bf16: {file_gib:.3f} GiB of safetensors; LoRA r={args.rank} on q/k/v/o/gate/up/down. "
        f"`prune --method lorpa --budget 0.25 --steps {args.steps} --batch-size {args.batch_size} --seq-len "
        f"{args.seq_len} --device cpu --no-eval`, each in its own subprocess, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}. "
        f"Peak RSS of the subprocess; the floor (python + torch + transformers + the CLI imported) is {floor:.2f} GiB.",
        "",
        "| setting | peak RSS GiB | above the floor, × bf16 file | student s/step | teacher s/step | teacher targets |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, peak, run, _ in rows:
        t = run.get("teacher_targets", {})
        kind = t.get("kind", "?") + (f" {t['top_k']}" if t.get("top_k") else "")
        lines.append(f"| {label} | {peak:.2f} | {(peak - floor) / file_gib:.2f} | {run['student_seconds_per_step']:.2f} "
                     f"| {run['teacher_seconds_per_step']:.2f} | {kind} |")
    lines += ["", f"Result of the bf16-stored base against the fp32 one (rows 2 and 3) after {args.steps} steps: largest relative "
              f"Frobenius difference of a module's ΔW {gap:.4f}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
