"""Memory and time against model size: prune, merge, ONNX export and a 2-step calibration.

Synthetic Llama checkpoints (random init, bf16 on disk, sharded) at about 0.25B, 1.1B, 3B and 7B
(Llama-2-7B's shape) parameters, each with a LoRA r=64 on q, k, v, o, gate, up and down, are built once under
``benchmarks/.cache/`` (git-ignored). Every command then runs as its own subprocess, one at a time;
its peak RSS comes from ``/usr/bin/time`` (the kernel's ``ru_maxrss`` of that child) and its wall
time from the clock. A case whose projected peak does not fit the memory available now is skipped with a
note instead of run (the machine is shared). Results: ``benchmarks/results/scale.md`` (ratios to
the bf16 file size), ``scale.png`` (log-log, one line per command) and ``scale.json`` (raw).

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/scale.py                 # all sizes
    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/scale.py --sizes 0.25B,1.1B --append
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/scale.py --sizes 1.1B --commands calibrate,calibrate-fsdp --append
    OMP_NUM_THREADS=2 python benchmarks/scale.py --sizes 7B --commands prune,merge,export,calibrate,calibrate-4bit \
        --append --no-projection --timeout 3600     # about 1 hour on 2 cores and 24 GB

``calibrate-4bit`` is the calibration with the base quantized to NF4 by bitsandbytes on the CPU
(``--load-in-4bit``, QLoRA).

``calibrate-fsdp`` is the same calibration on two CPU processes with the base sharded between them
(``torchrun --nproc-per-node 2 ... --fsdp``): its peak is that of the larger process (``/usr/bin/time``
of torchrun reports its largest descendant), and each process's own peak comes from the report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from synthetic import LlamaShape, lora_parameters, write_llama_checkpoint, write_lora  # noqa: E402

CACHE = HERE / ".cache" / "scale"
RESULTS = HERE / "results"
GiB = 2**30

#: name -> (shape, shard size). Shards scale HF's 2 GB down for the smaller models.
SIZES: dict[str, tuple[LlamaShape, int]] = {
    "0.25B": (LlamaShape(hidden=1024, intermediate=4096, layers=12, heads=16, kv_heads=16), 250_000_000),
    "1.1B": (LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4), 1_000_000_000),
    "3B": (LlamaShape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8), 2_000_000_000),
    # Llama-2-7B's shape (6.74B parameters, 12.55 GiB in bf16): the smallest size our users run
    "7B": (LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32), 2_000_000_000),
}
RANK = 64
COMMANDS = ("baseline", "prune", "merge", "export", "calibrate", "calibrate-4bit", "calibrate-fsdp")
#: processes a command starts (the memory projection counts each)
PROCESSES = {"calibrate-fsdp": 2}
#: Peak RSS as a multiple of the bf16 file, for projecting a case before running it (measured on
#: the smaller sizes when they ran first; these are the issue's figures before the fixes).
PRIOR_RATIO = {"baseline": 0.0, "prune": 0.5, "merge": 3.7, "export": 9.1, "calibrate": 5.4, "calibrate-4bit": 1.5,
               "calibrate-fsdp": 5.4}
SAFETY_BYTES = 3 * GiB  # left free for the other people on the machine
#: What calibration holds per LoRA parameter, in float32 copies, with the default method (IncreLoRA):
#: the teacher (the adapter's own tensors), the student, its gradient, AdamW's two moments and the
#: method's two importance averages. Measured in-process on the 0.25B case (live tensors after a step).
LORA_STATE_COPIES = {"teacher": 1, "student": 1, "gradient": 1, "AdamW moments": 2, "importance averages": 2}
#: Everything from this line on in the results file is hand-written and kept when the table is rewritten.
NOTES_MARKER = "<!-- scale.py keeps everything below this line when it rewrites the file -->"


@dataclass
class Run:
    size: str
    command: str
    params: int
    file_bytes: int
    peak_rss: int | None
    seconds: float | None
    rc: int | None
    argv: list[str]
    note: str = ""
    #: OMP_NUM_THREADS the command ran with (None: rows written before it was recorded)
    omp_threads: str | None = None
    #: several processes (calibrate-fsdp): each one's peak RSS in bytes, and the base bytes each one held
    process_peaks: list[int] | None = None
    shard_bytes: list[int] | None = None


# --------------------------------------------------------------------------- building the cases


def _tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over ``vocab`` made-up words, so probes and calibration have real text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", model_max_length=2048).save_pretrained(str(folder))


def build(size: str) -> tuple[Path, Path, Path]:
    """The cached base, adapter and calibration data of ``size`` (built when missing)."""
    shape, shard = SIZES[size]
    root = CACHE / size
    base, lora, data = root / "base", root / "lora", root / "calib.jsonl"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        write_llama_checkpoint(base, shape, shard_bytes=shard)
        _tokenizer(base, shape.vocab)
        write_lora(lora, base, shape, r=RANK)
        rng = random.Random(0)
        with data.open("w") as fh:
            for _ in range(64):
                fh.write(json.dumps({"text": " ".join(f"w{rng.randrange(shape.vocab - 4)}" for _ in range(48))}) + "\n")
        done.write_text("ok\n")
    return base, lora, data


def file_bytes(base: Path) -> int:
    return sum(p.stat().st_size for p in base.glob("*.safetensors"))


def _prune_flags() -> set[str]:
    """The long options ``loracompress prune --help`` lists (calibration flags arrive over time)."""
    out = subprocess.run([sys.executable, "-m", "loracompress", "prune", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "300"})
    return {w.strip("│ ,") for w in out.stdout.split() if w.startswith("--")}


def argv_for(command: str, base: Path, lora: Path, data: Path, out: Path, flags: set[str]) -> list[str]:
    lc = [sys.executable, "-m", "loracompress"]
    if command == "baseline":  # the interpreter, torch and transformers: what every command starts from
        return [sys.executable, "-c", "import loracompress_cli.app, transformers.models.llama.modeling_llama"]
    if command == "prune":
        return [*lc, "prune", str(lora), "--budget", "0.5", "-o", str(out), "--force"]
    if command == "merge":
        return [*lc, "merge", str(lora), "--base-model", str(base), "-o", str(out), "--verify", "modules", "--force"]
    if command == "export":
        # --engine ort: the merged single-forward graph (genai's generating decoder is its own path).
        return [*lc, "export", str(lora), "--base-model", str(base), "--format", "onnx", "--engine", "ort",
                "--dtype", "fp16", "-o", str(out), "--force"]
    if command in ("calibrate", "calibrate-4bit", "calibrate-fsdp"):
        extra = [f for f in ("--base-dtype", "--gradient-checkpointing") if f in flags]
        if command == "calibrate-fsdp":
            lc = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(PROCESSES[command]),
                  "-m", "loracompress"]
        argv = [*lc, "prune", str(lora), "--budget", "0.5", "--base-model", str(base), "--data", str(data),
                "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--no-eval", "--no-keep-best",
                "--device", "cpu", "-o", str(out), "--force"]
        if "--base-dtype" in extra:
            argv += ["--base-dtype", "bf16"]
        if "--gradient-checkpointing" in extra:
            argv += ["--gradient-checkpointing"]
        if command == "calibrate-4bit":  # QLoRA: the base held in NF4, computing in bf16
            argv += ["--load-in-4bit"]
        return argv + (["--fsdp"] if command == "calibrate-fsdp" else [])
    raise ValueError(command)


# --------------------------------------------------------------------------- measuring


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def measure(argv: list[str], timeout: float) -> tuple[int, int, float, str]:
    """Run ``argv``; returns (exit code, peak RSS bytes of the child, wall seconds, stderr tail).

    Through ``/usr/bin/time``: a child forked straight from this (torch-importing) process would
    inherit its RSS as the starting point of ``ru_maxrss``; ``time`` is small, and forks the command.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        t0 = time.perf_counter()
        # its own process group: on a timeout the command itself is killed, not only ``time`` (whose
        # orphaned child once went on calibrating beside the next case)
        child = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", report.name, *argv], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = child.communicate(timeout=timeout)
            rc, err = child.returncode, stderr.decode(errors="replace")
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            _, stderr = child.communicate()
            rc, err = -9, f"timed out after {timeout:.0f} s {stderr.decode(errors='replace')}"
        seconds = time.perf_counter() - t0
        lines = [ln for ln in Path(report.name).read_text().split() if ln.strip().isdigit()]
    peak = int(lines[-1]) * 1024 if lines else 0  # GNU time reports KiB
    return rc, peak, seconds, err[-600:]


def run_size(size: str, commands: list[str], flags: set[str], ratios: dict[str, float], timeout: float,
             project: bool = True) -> list[Run]:
    shape, _ = SIZES[size]
    base, lora, data = build(size)
    nbytes = file_bytes(base)
    params = shape.parameters()
    runs = []
    for command in commands:
        out = CACHE / size / f"out-{command}"
        argv = argv_for(command, base, lora, data, out, flags)
        projected = (ratios.get(command, PRIOR_RATIO[command]) * nbytes + 0.5 * GiB) * PROCESSES.get(command, 1)
        free = available_memory()
        if project and projected > free - SAFETY_BYTES:
            note = (f"skipped: projected peak {projected / GiB:.1f} GiB, {free / GiB:.1f} GiB available "
                    f"(keeping {SAFETY_BYTES / GiB:.0f} GiB free for others)")
            print(f"{size} {command}: {note}", flush=True)
            runs.append(Run(size, command, params, nbytes, None, None, None, _shown(argv), note))
            continue
        rc, peak, seconds, err = measure(argv, timeout)
        note = "" if rc == 0 else f"exit {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"[:300]
        print(f"{size} {command}: rc={rc} peak {peak / GiB:.2f} GiB ({peak / nbytes:.2f}x) in {seconds:.0f} s {note}",
              flush=True)
        runs.append(Run(size, command, params, nbytes, peak, round(seconds, 1), rc, _shown(argv), note,
                        os.environ.get("OMP_NUM_THREADS", "unset")))
        if rc == 0 and command in PROCESSES:
            sharding = json.loads((out / "compression_report.json").read_text())["settings"]["run"]["sharding"]
            runs[-1].process_peaks = [int(m * 2**20) for m in sharding["peak_rss_mib"]]
            runs[-1].shard_bytes = sharding["shard_bytes"]
        if rc == 0:
            ratios[command] = max(ratios.get(command, 0.0), peak / nbytes) if command != "merge" else peak / nbytes
        shutil.rmtree(out, ignore_errors=True)
    return runs


def measured_ratios(runs: list[Run]) -> dict[str, float]:
    """Each command's largest measured peak / file among earlier rows (kept by ``--append``), to project a
    case from what was measured rather than from :data:`PRIOR_RATIO`; the sharded calibration starts from
    the one-process calibration's (each of its processes holds at most what one process does)."""
    out: dict[str, float] = {}
    for r in runs:
        if r.rc == 0 and r.peak_rss:
            out[r.command] = max(out.get(r.command, 0.0), r.peak_rss / r.file_bytes)
    if "calibrate" in out:
        out.setdefault("calibrate-fsdp", out["calibrate"])
    return out


def _shown(argv: list[str]) -> list[str]:
    """The command as a user would type it, cache paths relative to the repository."""
    repo = str(HERE.parent) + "/"
    shown = [a.replace(repo, "") for a in argv]
    shown = ["python" if i == 0 and (a == sys.executable or a.endswith("/python")) else a for i, a in enumerate(shown)]
    return ["loracompress", *shown[3:]] if shown[:3] == ["python", "-m", "loracompress"] else shown


# --------------------------------------------------------------------------- writing the results


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares of ``y = a + b·x`` (peak RSS against parameters)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def machines(nbytes: float) -> str:
    """The smallest common machine whose RAM holds a peak of ``nbytes`` (with 15% headroom)."""
    need = nbytes * 1.15
    for name, ram in (("16 GB laptop", 16), ("24 GB (this machine)", 24), ("32 GB desktop", 32),
                      ("64 GB workstation", 64), ("128 GB server", 128), ("256 GB server", 256),
                      ("512 GB server", 512), ("1 TB server", 1024)):
        if need <= ram * 10**9:
            return name
    return "more than 1 TB"


TARGET_PARAMS = {"7B": 6.74e9, "70B": 68.98e9}


def write_results(runs: list[Run], out_md: Path, out_png: Path, out_json: Path, flags: set[str]) -> None:
    out_json.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    sizes = [s for s in SIZES if any(r.size == s for r in runs)]
    by = {(r.size, r.command): r for r in runs}
    lines = ["# Scale: peak memory and time against model size", "",
             "Written by `benchmarks/scale.py` (see its docstring for the command). Synthetic Llama checkpoints, "
             f"random init, bf16 on disk, sharded; LoRA r={RANK} on q, k, v, o, gate, up, down (fp32). CPU only, "
             f"{os.cpu_count()} cores, {_threads_text(runs)}, "
             f"{platform.machine()}, Python {platform.python_version()}. Peak RSS of each command's process "
             "(`/usr/bin/time`); wall time on a machine shared with other work, so times are rough.", ""]
    lines += ["## Peak RSS, and as a multiple of the bf16 checkpoint", "",
              "| base | params | bf16 file | shards | " + " | ".join(c for c in COMMANDS) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(COMMANDS)]
    for s in sizes:
        r0 = next(r for r in runs if r.size == s)
        shape, shard = SIZES[s]
        nshards = math.ceil(r0.file_bytes / shard)
        cells = []
        for c in COMMANDS:
            r = by.get((s, c))
            if r is None:
                cells.append("")
            elif r.rc == -9 and "timed out" in r.note:  # killed: /usr/bin/time never reported a peak
                cells.append(f"timed out ({r.seconds:.0f} s)")
            elif r.peak_rss is None or r.rc != 0:
                cells.append("skipped" if r.peak_rss is None else f"failed ({r.peak_rss / GiB:.2f} GiB)")
            else:
                cells.append(f"{r.peak_rss / GiB:.2f} GiB ({r.peak_rss / r.file_bytes:.2f}×)")
        lines.append(f"| {s} | {r0.params / 1e9:.2f}B | {r0.file_bytes / GiB:.2f} GiB | {nshards} × {shard / 1e9:.2g} GB | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Wall time (seconds)", "", "| base | " + " | ".join(COMMANDS) + " |", "|---|" + "---:|" * len(COMMANDS)]
    for s in sizes:
        cells = [f"{by[(s, c)].seconds:.0f}" if (s, c) in by and by[(s, c)].seconds is not None else "" for c in COMMANDS]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    notes = [f"- {r.size} {r.command}: {r.note}" for r in runs if r.note]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += calibration_breakdown(runs)
    lines += sharded_rows(runs)
    lines += ["", "## Extrapolation", "",
              "A straight line through the measured peaks of each command (peak = a + b · parameters, least "
              "squares), evaluated at Llama-2-7B (6.74B) and Llama-2-70B (69.0B) shapes; the machine is the "
              "smallest common RAM size that holds the peak with 15% headroom.", "",
              "| command | slope (bytes per parameter) | 7B | machine | 70B | machine |", "|---|---:|---:|---|---:|---|"]
    extrapolated = {}
    for c in COMMANDS[1:]:
        pts = [(r.params, r.peak_rss) for r in runs if r.command == c and r.rc == 0 and r.peak_rss]
        if len(pts) < 2:
            continue
        a, b = fit([p for p, _ in pts], [m for _, m in pts])
        row = [f"| {c} | {b:.2f} "]
        for name, n in TARGET_PARAMS.items():
            peak = a + b * n
            extrapolated[(c, name)] = peak
            row.append(f"| {peak / GiB:.1f} GiB | {machines(peak)} ")
        lines.append("".join(row) + "|")
    lines += ["", "Commands as run (paths relative to the repository):", ""]
    for c in COMMANDS:  # each command as run on the smallest size that ran it
        first = next((s for s in sizes if (s, c) in by), None)
        if first is not None:
            lines.append(f"- {c}: `{' '.join(_shown(by[(first, c)].argv))}`")
    cal = "with `--base-dtype bf16 --gradient-checkpointing`" if {"--base-dtype", "--gradient-checkpointing"} <= flags \
        else "without `--base-dtype`/`--gradient-checkpointing` (not offered by this `prune` yet)"
    lines += ["", f"Calibration ran {cal}."]
    kept = out_md.read_text().split(NOTES_MARKER, 1)[1] if out_md.exists() and NOTES_MARKER in out_md.read_text() else "\n"
    out_md.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + kept)
    _plot(runs, out_png)


def _threads_text(runs: list[Run]) -> str:
    """``OMP_NUM_THREADS=N``, or the value of each (size, command) when they differ."""
    values = {(r.size, r.command): r.omp_threads or "unrecorded" for r in runs if r.peak_rss}
    if len(set(values.values())) <= 1:
        return f"`OMP_NUM_THREADS={next(iter(values.values()), os.environ.get('OMP_NUM_THREADS', 'unset'))}`"
    groups: dict[str, list[str]] = {}
    for (size, command), t in values.items():
        groups.setdefault(t, []).append(f"{size} {command}")
    return "`OMP_NUM_THREADS` " + "; ".join(f"{t} for {', '.join(g)}" for t, g in groups.items())


def calibration_breakdown(runs: list[Run]) -> list[str]:
    """Where each calibration peak goes: the interpreter floor (the baseline row), the bf16 base, the LoRA
    state (:data:`LORA_STATE_COPIES` float32 copies of the adapter), and the remainder (activations,
    including the vocabulary-sized loss tensors, and what the allocator holds freed)."""
    by = {(r.size, r.command): r for r in runs}
    rows = []
    for size in SIZES:
        cal, floor = by.get((size, "calibrate")), by.get((size, "baseline"))
        if cal is None or floor is None or not cal.peak_rss or cal.rc != 0 or not floor.peak_rss:
            continue
        lora = lora_parameters(SIZES[size][0], RANK)
        state = lora * 4 * sum(LORA_STATE_COPIES.values())
        rest = cal.peak_rss - floor.peak_rss - cal.file_bytes - state
        target = (cal.peak_rss - floor.peak_rss - state) / cal.file_bytes
        rows.append(f"| {size} | {cal.peak_rss / GiB:.2f} GiB ({cal.peak_rss / cal.file_bytes:.2f}×) | "
                    f"{floor.peak_rss / GiB:.2f} GiB | {cal.file_bytes / GiB:.2f} GiB | {lora / 1e6:.1f}M: "
                    f"{state / GiB:.2f} GiB | {rest / GiB:.2f} GiB | {target:.2f}× |")
    if not rows:
        return []
    copies = " + ".join(f"{n} {k}" for k, n in LORA_STATE_COPIES.items())
    return ["", "## Calibration: where the peak goes", "",
            f"LoRA state = LoRA parameters × 4 bytes × {sum(LORA_STATE_COPIES.values())} ({copies}). Remainder = "
            "peak − floor − bf16 file − LoRA state: activations (here 2 × 32 tokens; the loss's vocabulary-sized "
            "float32 tensors are 2 × 32 × vocab × 4 bytes each) and memory the allocator keeps after freeing it. "
            "The last column is the target's measure: (peak − floor − LoRA state) / bf16 file, i.e. the base "
            "plus activations as a multiple of the file.", "",
            "| base | peak (× file) | floor | bf16 file | LoRA params: state | remainder | (peak − floor − LoRA) / file |",
            "|---|---:|---:|---:|---:|---:|---:|", *rows]


def sharded_rows(runs: list[Run]) -> list[str]:
    """Two processes with the base sharded (``--fsdp``) against one process: each process's peak RSS."""
    by = {(r.size, r.command): r for r in runs}
    rows = []
    for size in SIZES:
        two, one = by.get((size, "calibrate-fsdp")), by.get((size, "calibrate"))
        if two is None or two.rc != 0 or not two.process_peaks:
            continue
        peaks = ", ".join(f"{p / GiB:.2f}" for p in two.process_peaks)
        shards = ", ".join(f"{b / GiB:.2f}" for b in two.shard_bytes or [])
        single = f"{one.peak_rss / GiB:.2f} GiB" if one is not None and one.rc == 0 and one.peak_rss else "not run"
        ratio = f"{max(two.process_peaks) / one.peak_rss:.2f}×" if one is not None and one.peak_rss else ""
        rows.append(f"| {size} | {single} | {peaks} GiB | {ratio} | {shards} GiB of {two.file_bytes / GiB:.2f} GiB |")
    if not rows:
        return []
    return ["", "## Calibration on two processes, base sharded (`--fsdp`)", "",
            "`torchrun --nproc-per-node 2 -m loracompress prune ... --fsdp`, the same 2 steps (each process takes "
            "every other batch). Per process: the peak RSS each process reports (`ru_maxrss` at the end of "
            "training) and the base bytes it held after sharding; one process: the `calibrate` row.", "",
            "| base | one process | two processes, each | larger / one | base held by each |",
            "|---|---:|---:|---:|---:|", *rows]


def _plot(runs: list[Run], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    files = sorted({(r.params, r.file_bytes) for r in runs})
    ax.plot([p for p, _ in files], [b / GiB for _, b in files], "k--", lw=1, label="bf16 checkpoint on disk")
    for c, marker in zip(COMMANDS, "os^Dv<>"):
        pts = sorted((r.params, r.peak_rss / GiB) for r in runs if r.command == c and r.rc == 0 and r.peak_rss)
        if pts:
            ax.plot([p for p, _ in pts], [m for _, m in pts], marker=marker, label=c)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("Peak memory against model size (CPU, synthetic Llama, LoRA r=64)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--append", action="store_true", help="keep earlier rows of other sizes/commands")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.md")
    parser.add_argument("--no-projection", action="store_true",
                        help="run every case even where the projected peak exceeds the memory available (a case "
                             "that does not fit is then killed and recorded as failed)")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    unknown = [s for s in sizes if s not in SIZES] + [c for c in commands if c not in COMMANDS]
    if unknown:
        parser.error(f"unknown size or command {unknown[0]!r}")
    out_json = args.out.with_suffix(".json")
    old = [Run(**r) for r in json.loads(out_json.read_text())] if args.append and out_json.exists() else []
    flags = _prune_flags()
    ratios = measured_ratios([r for r in old if r.size in sizes])  # the same sizes' rows say the most
    runs = []
    for size in sizes:
        for command in commands:  # each row is written as soon as it is measured, so a stop loses nothing
            runs += run_size(size, [command], flags, ratios, args.timeout, project=not args.no_projection)
            _write_partial(old, runs, args.out, flags)
    return 0


def _write_partial(old: list[Run], runs: list[Run], out: Path, flags: set[str]) -> None:
    fresh = {(r.size, r.command) for r in runs}
    rows = [r for r in old if (r.size, r.command) not in fresh] + runs
    order = {s: i for i, s in enumerate(SIZES)}
    rows.sort(key=lambda r: (order[r.size], COMMANDS.index(r.command)))
    write_results(rows, out, out.with_suffix(".png"), out.with_suffix(".json"), flags)


if __name__ == "__main__":
    sys.exit(main())
