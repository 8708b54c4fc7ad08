"""How the calibration defaults were chosen: one method, one budget, one setting changed at a time.

Every configuration calibrates on the same 80% of the calibration split and is **selected on the
other 20%** (held-out accuracy / perplexity and KL to the original adapter, measured by ``prune``
itself); the test split is scored too, for information only, so the choice is not fitted to it.

    OMP_NUM_THREADS=1 python benchmarks/defaults_sweep.py --task minilm --method increlora --budget 0.03125
    OMP_NUM_THREADS=1 python benchmarks/defaults_sweep.py ... --configs lr=3e-4,lr=3e-3 --append   # a second process
    python benchmarks/defaults_sweep.py --render

Results: ``benchmarks/results/defaults_sweep.json`` and ``defaults_sweep.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import RESULTS, TASKS, Scorer, _locked, _write_json, task_spec  # noqa: E402

log = logging.getLogger("defaults_sweep")
OUT = RESULTS / "defaults_sweep.json"  # --name NAME writes NAME.json / NAME.md instead

def _lf(**changes: Any) -> dict[str, Any]:
    """A label-free row: the engine's labelled defaults with KD as the only loss, then ``changes``."""
    return {"hidden_weight": 0.0, "pseudo_labels": False, "token_dropout": 0.0, "lr": 1e-3, "epochs": 3.0, **changes}


#: name -> the PruneOptions fields it changes from the engine defaults (lr 1e-3, kd 1, task 1, T 2, 3 epochs)
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "lr=3e-4": {"lr": 3e-4},
    "lr=3e-3": {"lr": 3e-3},
    "kd only": {"task_weight": 0.0},
    "task only": {"kd_weight": 0.0},
    "T=1": {"temperature": 1.0},
    "1 epoch": {"epochs": 1.0},
    "6 epochs": {"epochs": 6.0},
    # the noise floor: another seed changes the shuffle, the init of any new components and the held-out
    # split, so only its test columns compare with the rows above
    "seed=1": {"seed": 1},
    # label-free classification (--task news20 / minilm-nolabels, --name labelfree_sweep): each row pins
    # the settings calibrate.LABEL_FREE now chooses on its own, so that it measures what it says: "logits
    # only" is the engine's labelled defaults (lr 1e-3, 3 epochs) with KD as the only loss
    "logits only": _lf(),
    "logits T=1": _lf(temperature=1.0),
    "logits lr=3e-3": _lf(lr=3e-3),
    "logits 6 epochs": _lf(epochs=6.0),
    "logits lr=1e-2": _lf(lr=1e-2),
    "logits lr=3e-3 6 epochs": _lf(lr=3e-3, epochs=6.0),  # the label-free default before views
    "logits lr=3e-3 12 epochs": _lf(lr=3e-3, epochs=12.0),
    "logits lr=3e-3 T=1 6 epochs": _lf(lr=3e-3, temperature=1.0, epochs=6.0),
    # fresh views (token deletion, the teacher scored on each view): more epochs without refitting the same texts
    "views 0.2 12 epochs": _lf(lr=3e-3, epochs=12.0, token_dropout=0.2),
    "views 0.1 6 epochs": _lf(lr=3e-3, epochs=6.0, token_dropout=0.1),  # the label-free default (LABEL_FREE)
    "views 0.2 6 epochs": _lf(lr=3e-3, epochs=6.0, token_dropout=0.2),
    "views 0.3 6 epochs": _lf(lr=3e-3, epochs=6.0, token_dropout=0.3),
    "pseudo-labels": _lf(pseudo_labels=True),
    "hidden=1": _lf(hidden_weight=1.0),
    "hidden=10": _lf(hidden_weight=10.0),
    "hidden=1 + pseudo-labels": _lf(hidden_weight=1.0, pseudo_labels=True),
}


def run(args: argparse.Namespace) -> None:
    from loracompress.core.reader import load_adapter
    from loracompress.pipelines.evaluate import EvalOptions
    from loracompress.pipelines.inputs import load_base, read_batches
    from loracompress.pipelines.prune import PruneOptions, prune
    from loracompress.runtime.data import task_of

    task = task_spec(args.task)
    torch.set_num_threads(args.threads)
    original = load_adapter(task.adapter)
    test_opts = EvalOptions(data=str(task.test), base_model=task.base, max_samples=args.max_test, seed=0,
                            seq_len=task.seq_len, batch_size=task.batch_size, device="cpu")
    base = load_base(original, test_opts)
    kind = task_of(base)
    test, test_batches = read_batches(base, task.test, test_opts)
    score = Scorer(base, original, test_batches, kind, task.metric)
    command = shlex.join(["python", "benchmarks/defaults_sweep.py", *sys.argv[1:]])
    with _locked(OUT):
        state = json.loads(OUT.read_text()) if args.append and OUT.exists() else {"rows": [], "commands": []}
        state.update(task=task.name, metric=task.metric, method=args.method, budget=args.budget,
                     eval_fraction=args.eval_fraction, test_samples=len(test),
                     device=f"cpu ({platform.machine()}, torch {torch.__version__}, {args.threads} thread(s))")
        state["commands"] = [c for c in state["commands"] if c != command] + [command]
        _write_json(OUT, state)
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        for name in args.configs:
            opts = dict(budget=args.budget, method=args.method, base_model=task.base, data=str(task.calib),
                        seq_len=task.seq_len, batch_size=task.batch_size, max_samples=args.max_calib, seed=0,
                        device="cpu", evaluate=True, eval_fraction=args.eval_fraction, keep_best=False,
                        label_field=task.label_field)
            opts.update(CONFIGS[name])
            t0 = time.perf_counter()
            report = prune(task.adapter, Path(tmp) / name.replace(" ", "-"), PruneOptions(**opts))
            seconds = time.perf_counter() - t0
            q = report["quality"]
            test_score = score(load_adapter(Path(tmp) / name.replace(" ", "-")))
            row = {"config": name, "changes": CONFIGS[name], "steps": report["settings"]["run"]["steps"],
                   "held_agreement": q["agreement"], "test_agreement": test_score["agreement"],
                   # an unlabelled held-out split has no accuracy: agreement and KL only
                   "held_metric": (q.get(task.metric) or {}).get("after"),
                   "held_original": (q.get(task.metric) or {}).get("before"),
                   "held_kl": q["kl"], "test_metric": test_score["metric"], "test_original": test_score["original"],
                   "test_kl": test_score["kl"], "params": report["params_after"], "seconds": round(seconds, 1)}
            log.info("%-10s held agreement %.4f kl %.4f | test %s %.4f kl %.4f | %d steps %.0fs", name,
                     row["held_agreement"], row["held_kl"], task.metric, row["test_metric"], row["test_kl"],
                     row["steps"], seconds)
            with _locked(OUT):
                state = json.loads(OUT.read_text())
                state["rows"] = [r for r in state["rows"] if r["config"] != name] + [row]
                _write_json(OUT, state)
            render()


def render() -> None:
    if not OUT.exists():
        return
    st = json.loads(OUT.read_text())
    higher = st["metric"] == "accuracy"
    order = {n: i for i, n in enumerate(CONFIGS)}
    rows = sorted(st["rows"], key=lambda r: order.get(r["config"], 99))
    fmt = (lambda v: "–" if v is None else f"{v:.3f}") if higher else (lambda v: "–" if v is None else f"{v:.2f}")
    ref_name = "defaults" if any(r["config"] == "defaults" for r in rows) else "logits only"
    ref = next((r for r in rows if r["config"] == ref_name), None)
    lines = [f"# Choosing the calibration defaults: {st['method']} at budget {st['budget']} on {st['task']}", "",
             "Generated by `benchmarks/defaults_sweep.py`. One setting changed at a time from the engine defaults "
             "(lr 1e-3, warm-up 0.1, kd_weight 1, task_weight 1, temperature 2, 3 epochs). Every run calibrates on "
             f"the same {100 * (1 - st['eval_fraction']):.0f}% of the calibration split; **selection uses the other "
             f"{100 * st['eval_fraction']:.0f}% (held-out columns)**; the test columns ({st['test_samples']} test "
             "samples) are for information only.", "",
             "Commands: " + "; ".join(f"`OMP_NUM_THREADS=1 {c}`" for c in st["commands"]),
             f"Device: {st['device']}.", "",
             f"| config | steps | held-out {st['metric']} | held-out agreement | held-out KL | vs {ref_name} "
             f"| test {st['metric']} | test agreement | test KL | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    noise = [r for r in rows if "seed" in r["changes"]]  # another held-out split: held-out columns not comparable
    same_split = [r for r in rows if r not in noise]

    def agree(r: dict[str, Any], split: str) -> str:
        v = r.get(f"{split}_agreement")
        return "–" if v is None else f"{v:.3f}"

    for r in rows:
        ratio = f"{r['held_kl'] / ref['held_kl']:.2f}×" if ref and r in same_split else "–"
        lines.append(f"| {r['config']} | {r['steps']} | {fmt(r['held_metric'])} (orig {fmt(r['held_original'])}) | "
                     f"{agree(r, 'held')} | {r['held_kl']:.4f} | {ratio} | {fmt(r['test_metric'])} "
                     f"(orig {fmt(r['test_original'])}) | {agree(r, 'test')} | {r['test_kl']:.4f} | {r['seconds']:.0f} |")
    if same_split:
        # classifiers: top-1 agreement with the original first, then KL (what --keep-best compares)
        best = min(same_split, key=lambda r: (-r.get("held_agreement", 0.0) if higher else 0.0, r["held_kl"]))
        lines += ["", f"Best on the held-out split ({'agreement, then KL' if higher else 'KL'}): "
                      f"**{best['config']}** (KL {best['held_kl']:.4f})."]
    if noise and ref:
        lines.append(f"Seed-to-seed noise of the defaults on the test split: KL {ref['test_kl']:.4f} (seed 0) vs "
                     + ", ".join(f"{r['test_kl']:.4f} ({r['config']})" for r in noise)
                     + "; a setting must beat the defaults by more than that to count. `seed=1` also draws another "
                       "held-out split, so its held-out columns are not comparable with the others.")
    notes = OUT.with_name(f"{OUT.stem}_notes.md")  # the hand-written reading of these numbers
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="minilm")
    p.add_argument("--name", default="defaults_sweep", help="results file stem under benchmarks/results/")
    p.add_argument("--method", default="increlora")
    p.add_argument("--budget", default="0.0625")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--max-calib", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--append", action="store_true", help="keep the rows of earlier runs (another process may add)")
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    global OUT
    OUT = RESULTS / f"{args.name}.json"
    if args.render:
        render()
        return
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown config(s) {bad}; choose from {', '.join(CONFIGS)}")
    run(args)


if __name__ == "__main__":
    main()
