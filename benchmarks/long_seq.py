#!/usr/bin/env python
"""Peak memory of a short calibration at a long sequence (2,048 tokens), with the loss in chunks and without.

The 0.25B synthetic Llama of ``benchmarks/scale.py`` (32k vocabulary, LoRA r=64 on all seven
projections), eight calibration texts of 2,100 words (the word-level tokenizer makes each word a
token), ``--seq-len 2048 --batch-size 1 --steps 2 --gradient-checkpointing`` on the CPU, with the
teacher's targets automatic (top-k: eight batches' full targets exceed the 1 GiB cache cap) and full
(``--teacher-top-k 0``). Each run is its own subprocess; peak RSS by ``/usr/bin/time`` as in
``scale.py``. ``--code DIR`` runs another checkout of loracompress (``python -m loracompress`` from
that folder), e.g. the commit before the chunked loss, to measure "before" on the same case:

    git archive <commit> | tar -x -C /tmp/before
    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/long_seq.py --code /tmp/before --label "before (whole logits)"
    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/long_seq.py --label "after (chunked loss)"

Rows are appended to ``benchmarks/results/long_seq.json`` and the table ``long_seq.md`` is rewritten
from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scale import CACHE, SIZES, build, measure  # noqa: E402

GiB = 2**30
SEQ = 2048
RESULTS = HERE / "results"
SETTINGS = {"targets auto (top-k 64)": [], "full-vocabulary targets": ["--teacher-top-k", "0"]}


def long_data(size: str, rows: int = 8, words: int = 2100) -> Path:
    """``rows`` texts of ``words`` made-up words of the ``size`` case's tokenizer (one token each)."""
    vocab = SIZES[size][0].vocab
    path = CACHE / size / f"long{SEQ}.jsonl"
    if not path.exists():
        rng = random.Random(0)
        path.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(words))}) + "\n"
                                for _ in range(rows)), encoding="utf-8")
    return path


# One loss and its backward, in a fresh process: the head [H -> V] on hidden states [1, L, H] that need gradients,
# full or top-64 teacher targets. Prints the growth of peak RSS over the process's RSS before the loss.
_LOSS = """
import resource, sys, torch
from loracompress.calibration.engine import distillation_loss
from loracompress.calibration.engine.loss import chunked_lm_loss
from loracompress.calibration.engine.config import EngineConfig
from loracompress.calibration.engine.teacher import TargetPlan
L, H, V, mode, targets = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.manual_seed(0)
head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
h = torch.randn(1, L, H, requires_grad=True)
plan = TargetPlan(None if targets == "full" else 64, V)
chunk = EngineConfig().chunk_tokens(V)
with torch.no_grad():
    t = plan.make_chunked(torch.randn(1, L, H), head, 2.0, chunk)
def run(h):
    if mode == "plain":
        return distillation_loss(head(h), t[:, :h.shape[1]], None, None, "lm")[0]
    return chunked_lm_loss(h, head.forward, t[:, :h.shape[1]], None, None, chunk=chunk)[0]
run(h[:, :4].detach().requires_grad_()).backward()  # imports and first-call set-up: not the loss's memory
before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
run(h).backward()
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print((peak - before) / 1024)  # KiB -> MiB
"""


def loss_rows(lengths: list[int], hidden: int = 1024, vocab: int = 32000) -> list[dict]:
    """Peak memory of the loss alone (forward and backward) against the sequence length, plain and chunked."""
    import subprocess

    rows = []
    for targets in ("top-64", "full"):
        for length in lengths:
            row = {"targets": targets, "tokens": length}
            for mode in ("plain", "chunked"):
                done = subprocess.run([sys.executable, "-c", _LOSS, str(length), str(hidden), str(vocab), mode, targets],
                                      capture_output=True, text=True, cwd=HERE.parent)
                row[mode] = float(done.stdout.split()[-1]) if done.returncode == 0 else None
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, default=HERE.parent, help="checkout whose loracompress runs")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--size", default="0.25B", choices=list(SIZES))
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    ap.add_argument("--steps", type=int, default=2, help="calibration steps (LoRPA needs 2)")
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument("--loss-only", default="", help="comma-separated sequence lengths: measure the loss alone")
    args = ap.parse_args()
    if args.loss_only:
        rows = loss_rows([int(x) for x in args.loss_only.split(",")])
        (RESULTS / "long_seq_loss.json").write_text(json.dumps(rows, indent=2) + "\n")
        write_md(json.loads((RESULTS / "long_seq.json").read_text()) if (RESULTS / "long_seq.json").exists() else [],
                 RESULTS / "long_seq.md")
        return
    base, lora, _ = build(args.size)
    data = long_data(args.size)
    out_json = RESULTS / "long_seq.json"
    rows = json.loads(out_json.read_text()) if out_json.exists() else []
    for name in args.settings.split(","):
        out = CACHE / args.size / "out-long"
        argv = [sys.executable, "-m", "loracompress", "prune", str(lora), "--budget", "0.5", "--method", "lorpa",
                "--base-model", str(base), "--data", str(data), "--steps", str(args.steps), "--seq-len", str(SEQ),
                "--batch-size", "1", "--no-eval", "--no-keep-best", "--device", "cpu", "--gradient-checkpointing",
                "-o", str(out), "--force", *SETTINGS[name]]
        cwd = os.getcwd()
        os.chdir(args.code)  # ``python -m loracompress`` imports the package of the working folder first
        try:
            rc, peak, seconds, err = measure(argv, args.timeout)
        finally:
            os.chdir(cwd)
        report = out / "compression_report.json"
        run = json.loads(report.read_text())["settings"]["run"] if rc == 0 and report.exists() else {}
        row = {"label": args.label, "setting": name, "size": args.size, "seq_len": SEQ, "steps": args.steps, "rc": rc,
               "peak_rss_gib": round(peak / GiB, 3), "wall_s": round(seconds, 1),
               "student_s_per_step": run.get("student_seconds_per_step"),
               "targets": run.get("teacher_targets"), "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
               "note": "" if rc == 0 else err.strip().splitlines()[-1][:300] if err.strip() else f"exit {rc}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        out_json.write_text(json.dumps(rows, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
    write_md(rows, RESULTS / "long_seq.md")


def write_md(rows: list[dict], path: Path) -> None:
    lines = ["# Long sequences: peak memory of a short calibration at 2,048 tokens", "",
             "Written by `benchmarks/long_seq.py` (its docstring has the commands). The 0.25B synthetic Llama of "
             "`benchmarks/scale.py` (fp32 base on the CPU, 32k vocabulary, LoRA r=64 on all seven projections), "
             "`prune --method lorpa --budget 0.5 --steps N --seq-len 2048 --batch-size 1 --gradient-checkpointing "
             "--no-eval --no-keep-best --device cpu`, eight texts of 2,048+ tokens. Peak RSS of the command's process "
             "(`/usr/bin/time`); times on a 2-core machine shared with other work.", "",
             "| code | teacher targets | steps | peak RSS | student s/step | wall | loss chunk (tokens) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r.get("targets") or {}
        chunk = t.get("loss_chunk_tokens")
        lines.append(f"| {r['label']} | {r['setting']} | {r.get('steps', 2)} | {r['peak_rss_gib']:.2f} GiB | "
                     f"{r['student_s_per_step'] if r['student_s_per_step'] is not None else '—'} | {r['wall_s']:.0f} s | "
                     f"{chunk if chunk else 'whole logits'} |" + (f" {r['note']}" if r["rc"] else ""))
    loss_json = RESULTS / "long_seq_loss.json"
    if loss_json.exists():
        lines += ["", "## The loss alone against the sequence length", "",
                  "`python benchmarks/long_seq.py --loss-only 1024,2048,4096`: one loss and its backward in a fresh process, "
                  "hidden states [1, tokens, 1024] that need gradients, a 1024 → 32,000 head, teacher targets made "
                  "beforehand; growth of peak RSS during the loss (MiB).", "",
                  "| teacher targets | tokens | plain loss | chunked loss | chunk |", "|---|---:|---:|---:|---:|"]
        for r in json.loads(loss_json.read_text()):
            cell = [f"{r[m]:.0f} MiB" if r.get(m) is not None else "—" for m in ("plain", "chunked")]
            lines.append(f"| {r['targets']} | {r['tokens']:,} | {cell[0]} | {cell[1]} | {r.get('chunk_mb', 64)} MiB |")
        lines += ["", "32 MiB chunks sit just under glibc's largest dynamic mmap threshold (32 MiB): served from the heap, "
                  "they fragmented it and RSS grew with the number of chunks; 64 MiB chunks are mapped and unmapped, so "
                  "the default is 64 MiB. With `MALLOC_MMAP_THRESHOLD_=4194304` the 32 MiB chunks gave 175 and 193 MiB "
                  "at 2,048 and 4,096 tokens. The full-vocabulary rows at 4,096 tokens were not run (time)."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
