"""A bank of adapters against each adapter compressed alone, at equal total parameters, on the test beds.

The test beds are built by ``samples/build_bank_minilm.py`` (12 MiniLM classifier LoRAs, ``--bed minilm``)
and ``samples/build_bank_smollm2.py`` (4 SmolLM2-135M LoRAs on 4 text domains, ``--bed smollm2``). For each
bank budget (a fraction of the N originals' total LoRA parameters) this runs, side by side:

* ``bank``      ``python -m loracompress bank A/ B/ ... --budget F -o OUT/`` (a subprocess: the CLI as a user
  runs it), then scores every expanded PEFT folder ``OUT/adapters/<name>/``;
* ``separate``  today's best training-free cut of each adapter alone (``prune --budget P``, the global SVD
  cut, through the same library call the CLI makes), with ``P`` = the bank's own total parameters / N,
  so the N separate adapters together hold exactly what the whole bank holds (bases + all cores).

Quality per adapter, on its own test split, with loracompress's evaluation
(:func:`loracompress.pipelines.evaluate.evaluate`, the ``eval`` command's code): the % of its original
accuracy (MiniLM), or the % of its perplexity gain over the bare base, ``(ppl_base - ppl) / (ppl_base -
ppl_original)`` (SmolLM2). Also: bytes per added adapter (its cores against a separately compressed
adapter at the same per-adapter share), the shared rank R, and curves of quality against N (banks of
the first N adapters) and against R (``--budget rank=R``).

Rows go to ``benchmarks/results/bank_<bed>.json`` as they finish; ``bank.md`` and ``bank.png`` are re-rendered
from it after each row. The onnxruntime-genai sections (the bank graph's tokens against PEFT, and its tokens/s
against N separate multi-LoRA adapters) come from ``benchmarks/bank_genai.py`` and its ``bank_genai.json``.

    OMP_NUM_THREADS=1 python benchmarks/bank.py --bed minilm
    OMP_NUM_THREADS=1 python benchmarks/bank.py --bed smollm2 --budgets 1/16,1/32 --curve-n "" --ranks ""
    python benchmarks/bank.py --render
    # the bank command from another checkout: --bank-code /work/wt/bank (PYTHONPATH of the subprocesses)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

def bed_json(bed: str) -> Path:
    """One results file per test bed, so that the beds can run at the same time (``bank.md`` shows all)."""
    return RESULTS / f"bank_{bed}.json"

sys.path.insert(0, str(ROOT / "samples"))

log = logging.getLogger("bank")

BEDS = {
    # name: (folder, base model key, metric, seq_len, batch size)
    "minilm": (ROOT / "samples" / "bank-minilm", "minilm", "accuracy", 32, 32),
    "smollm2": (ROOT / "samples" / "bank-smollm2", "smollm2", "perplexity", 64, 16),
}
#: everything from this line on in bank.md is hand-written and kept when the tables are rewritten
NOTES_MARKER = "<!-- bank.py keeps everything below this line when it rewrites the file -->"


# --------------------------------------------------------------------------- helpers


def fraction_text(f: str) -> str:
    """``1/16`` -> ``0.0625`` (the CLI takes decimals and percentages)."""
    return str(float(Fraction(f)))


def _write_json(path: Path, bed: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(bed, indent=1))
    tmp.replace(path)


def run_cli(args: list[str], bank_code: str | None) -> float:
    """``python -m loracompress ARGS`` in a subprocess; returns its wall time. ``bank_code``: a checkout
    whose ``loracompress`` the subprocess imports first (the bank command while it lives on a branch)."""
    env = dict(os.environ)
    if bank_code:
        env["PYTHONPATH"] = os.pathsep.join([bank_code, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loracompress", *args], env=env, capture_output=True, text=True,
                          cwd=bank_code or ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"loracompress {' '.join(args[:1])} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return time.perf_counter() - t0


def bank_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """R (over modules and clusters), clusters and parameter counts from a ``bank.json``."""
    ranks = [r for m in manifest["modules"].values() for r in m["rank"]]
    p = manifest["params"]
    return {"R_max": max(ranks), "R_mean": round(sum(ranks) / len(ranks), 2), "clusters": manifest["clusters"]["count"],
            "bank_params": p["total"], "bases_params": p["bases"], "cores_params": p["cores"],
            "originals_params": p["originals"], "fraction": p["total"] / p["originals"], "dtype": manifest["dtype"]}


# --------------------------------------------------------------------------- scoring


class Scorer:
    """Test-split metric of variants of one adapter against that adapter (its reference pass cached).

    The base is loaded with this adapter's ``modules_to_save`` head (a classifier's own head); a base with
    no heads (the LM) is reused from the previous adapter instead of loaded again.
    """

    _lm_base: Any = None

    def __init__(self, original_dir: Path, base_model: str, test: Path, seq_len: int, batch_size: int,
                 max_test: int | None = None):
        from loracompress.core.reader import load_adapter
        from loracompress.pipelines.evaluate import EvalOptions, ReferenceCache
        from loracompress.pipelines.inputs import load_base, read_batches
        from loracompress.runtime.data import task_of

        self.original = load_adapter(original_dir)
        opts = EvalOptions(data=str(test), base_model=base_model, seq_len=seq_len, batch_size=batch_size,
                           device="cpu", max_samples=max_test, seed=0)
        if self.original.extra_tensors or Scorer._lm_base is None:
            self.base = load_base(self.original, opts)
            if not self.original.extra_tensors:
                Scorer._lm_base = self.base
        else:
            self.base = Scorer._lm_base
        self.task = task_of(self.base)
        self.samples, self.batches = read_batches(self.base, test, opts)
        self.cache = ReferenceCache()

    def _evaluate(self, adapter: Any, reference: str, candidate: str, cache: Any) -> dict[str, Any]:
        from loracompress.pipelines.evaluate import evaluate
        from loracompress.runtime.layers import attach, detach

        attach(self.base.model, adapter, teacher=self.original)
        try:
            return evaluate(self.base.model, self.batches, self.task, reference=reference, candidate=candidate,
                            cache=cache)
        finally:
            detach(self.base.model)

    def reference(self) -> dict[str, float] | None:
        """The bare base's perplexity and the original's (LM); None for a classifier, whose original accuracy
        comes with every scored variant (the reference pass of :meth:`__call__`), at no extra pass."""
        if self.task != "lm":
            return None
        r = self._evaluate(self.original, "base", "teacher", None)
        return {"original": r["perplexity"]["after"], "base": r["perplexity"]["before"]}

    def __call__(self, adapter_dir: Path) -> dict[str, float]:
        from loracompress.core.reader import load_adapter

        r = self._evaluate(load_adapter(adapter_dir), "teacher", "student", self.cache)
        key = "perplexity" if self.task == "lm" else "accuracy"
        return {"metric": r[key]["after"], "original": r[key]["before"], "kl": r["kl"], "agreement": r["agreement"]}


def pct(metric: str, value: float, ref: dict[str, float]) -> float:
    """% of the original accuracy, or % of the original's perplexity gain over the bare base."""
    if metric == "accuracy":
        return 100 * value / ref["original"]
    return 100 * (ref["base"] - value) / (ref["base"] - ref["original"])


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> None:
    from base_model_path import base_model_path

    from loracompress.core.reader import load_adapter
    from loracompress.pipelines.prune import PruneOptions, prune

    folder, key, metric, seq_len, batch_size = BEDS[args.bed]
    torch.set_num_threads(args.threads)
    names = sorted(p.name for p in folder.iterdir() if (p / "adapter" / "adapter_config.json").is_file())
    if args.max_adapters:
        names = names[: args.max_adapters]
    if len(names) < 2:
        raise SystemExit(f"error: {folder} holds {len(names)} adapters; build the test bed first "
                         f"(python samples/build_bank_{args.bed}.py)")
    base_model = str(base_model_path(key))
    bed: dict[str, Any] = {
        "metric": metric, "adapters": names, "seq_len": seq_len, "budgets": args.budgets, "curve_n": args.curve_n,
        "curve_budget": args.curve_budget, "curve_eval": args.curve_eval, "max_test": args.max_test, "ranks": args.ranks, "command": " ".join(["python", "benchmarks/bank.py", *sys.argv[1:]]),
        "device": f"cpu ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
                  f"{args.threads} thread(s); a shared 2-core machine)",
        "bank_code": "branch `bank` (" + args.bank_code + ")" if args.bank_code else "this checkout",
        "references": {}, "banks": {}, "rows": [], "failures": [],
    }
    _write_json(bed_json(args.bed), bed)

    def save() -> None:
        _write_json(bed_json(args.bed), bed)
        render()

    with tempfile.TemporaryDirectory(prefix="bank-bench-") as tmp:
        work = Path(tmp)
        # The bank names each adapter by its folder: give each its task's name (the beds keep <name>/adapter).
        src = work / "src"
        for n in names:
            shutil.copytree(folder / n / "adapter", src / n)

        # 1. every bank (CLI) and every separate cut, before any scoring
        variants: dict[str, dict[str, Path]] = {n: {} for n in names}  # adapter -> label -> folder

        def make_bank(label: str, members: list[str], budget: str, extra: dict[str, Any], score: bool = True) -> None:
            out = work / f"bank-{len(bed['banks'])}"
            try:
                sec = run_cli(["bank", *(str(src / n) for n in members), "--budget", budget, "-o", str(out),
                               "--force"], args.bank_code)
            except RuntimeError as err:
                log.error("%s", err)
                bed["failures"].append(f"bank {label}: {err}")
                return
            manifest = json.loads((out / "bank.json").read_text())
            info = {**bank_summary(manifest), "members": members, "budget": budget, "seconds": round(sec, 1), **extra,
                    "adapters": {a["name"]: {"relative_error": a["relative_error"], "cluster": a["cluster"],
                                             "core_params": a["core_params"], "original_params": a["original_params"]}
                                 for a in manifest["adapters"]}}
            bed["banks"][label] = info
            log.info("bank %-14s R max %d mean %.1f, %d cluster(s), %d params (%.4f), %.0fs", label, info["R_max"],
                     info["R_mean"], info["clusters"], info["bank_params"], info["fraction"], sec)
            if score:  # else the curve point is the reconstruction error that bank.json reports
                for n in members:
                    variants[n][label] = out / "adapters" / n
            save()

        for f in args.budgets:
            make_bank(f"bank@{f}", names, fraction_text(f), {"kind": "budget", "F": f, "N": len(names)})
            info = bed["banks"].get(f"bank@{f}")
            if info is None:
                continue
            info["separate_params_each"] = info["bank_params"] // len(names)
            for n in names:  # cut when scored (below), in the same order
                variants[n][f"separate@{f}"] = work / f"sep-{f.replace('/', '_')}" / n
        # 2. scoring, variant by variant in the order of --budgets (the bank, then the separate cuts), so that
        # an interrupted run has every adapter at the first budgets; one base and reference pass per adapter
        scorers: dict[str, Scorer] = {}
        labels = list(dict.fromkeys(label for n in names for label in variants[n]))
        for label in labels:
            for n in names:
                path = variants[n].get(label)
                if path is None:
                    continue
                if n not in scorers:
                    t0 = time.perf_counter()
                    scorers[n] = Scorer(src / n, base_model, folder / n / "data" / "test.jsonl", seq_len, batch_size,
                                        args.max_test or None)
                    ref = scorers[n].reference()
                    bed["references"][n] = {**(ref or {}), "test_samples": len(scorers[n].samples),
                                            "seconds": round(time.perf_counter() - t0, 1)}
                    if ref:
                        log.info("%-26s original %s %.4f, bare base %.3f", n, metric, ref["original"], ref["base"])
                if label.startswith("separate@"):
                    info = bed["banks"][label.replace("separate@", "bank@")]
                    t0 = time.perf_counter()
                    prune(src / n, path, PruneOptions(budget=str(info["separate_params_each"])))
                    info["separate_seconds"] = round(info.get("separate_seconds", 0.0) + time.perf_counter() - t0, 1)
                s = scorers[n](path)
                ref = bed["references"][n]
                if "original" not in ref:
                    ref["original"] = s["original"]
                    log.info("%-26s original %s %.4f", n, metric, s["original"])
                row = {"adapter": n, "variant": label, "method": label.split("@")[0].split(" ")[0], **s,
                       "pct": pct(metric, s["metric"], ref), "params": load_adapter(path).num_params}
                bed["rows"].append(row)
                log.info("%-26s %-22s %s %.4f  %.1f%%  kl %.4f", n, label, metric, s["metric"], row["pct"], s["kl"])
                save()

        # 3. the curves' banks last: by default they cost no scoring (bank.json's errors are their points)
        for k in args.curve_n:
            if 2 <= k < len(names):
                make_bank(f"bank@{args.curve_budget} N={k}", names[:k], fraction_text(args.curve_budget),
                          {"kind": "N", "F": args.curve_budget, "N": k}, args.curve_eval)
        for r in args.ranks:
            make_bank(f"bank R={r}", names, f"rank={r}", {"kind": "R", "N": len(names), "R": r}, args.curve_eval)
        if args.curve_eval:
            for label in [lb for lb in bed["banks"] if bed["banks"][lb]["kind"] in ("N", "R")]:
                for n in bed["banks"][label]["members"]:
                    s = scorers[n](variants[n][label])
                    row = {"adapter": n, "variant": label, "method": "bank", **s,
                           "pct": pct(metric, s["metric"], bed["references"][n]),
                           "params": load_adapter(variants[n][label]).num_params}
                    bed["rows"].append(row)
                    log.info("%-26s %-22s %s %.4f  %.1f%%", n, label, metric, s["metric"], row["pct"])
                    save()


# --------------------------------------------------------------------------- report


def _stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    v = [r["pct"] for r in rows]
    return {"median": statistics.median(v), "worst": min(v), "mean": statistics.fmean(v), "n": len(v)}


def _paired(rows: list[dict[str, Any]], f: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The bank's and the separate cut's rows at budget ``f``, for the adapters that have both."""
    br = {r["adapter"]: r for r in rows if r["variant"] == f"bank@{f}"}
    sr = {r["adapter"]: r for r in rows if r["variant"] == f"separate@{f}"}
    both = [n for n in br if n in sr]
    return [br[n] for n in both], [sr[n] for n in both]


def _med(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _budget_table(name: str, bed: dict[str, Any]) -> list[str]:
    rows, banks = bed["rows"], bed["banks"]
    metric = bed["metric"]
    unit = "of its original accuracy" if metric == "accuracy" else "of its perplexity gain over the bare base"
    out = [f"## {name}: {len(bed['adapters'])} adapters, quality as % {unit}", "",
           f"Command: `OMP_NUM_THREADS=1 {bed['command']}`. Device: {bed['device']}. Bank code: {bed['bank_code']}.", "",
           "| bank budget | R (max / mean) | clusters | total params (bank = separate) | bank median | bank worst "
           "| separate median | separate worst | margin (median, pts) | bank better on | KL median: bank / separate "
           "| top-1 agreement median: bank / separate | bytes per added adapter: cores / separate | ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in bed["budgets"]:
        b = banks.get(f"bank@{f}")
        br, sr = _paired(rows, f)
        if b is None or not br or not sr:
            out.append(f"| {f} |" + " – |" * 13)
            continue
        bs, ss = _stats(br), _stats(sr)
        by = {r["adapter"]: r["pct"] for r in sr}
        wins = sum(r["pct"] > by.get(r["adapter"], float("inf")) for r in br)
        ties = sum(r["pct"] == by.get(r["adapter"]) for r in br)
        itemsize = 2 if b["dtype"] in ("fp16", "bf16") else 4
        core_bytes = statistics.fmean(a["core_params"] for a in b["adapters"].values()) * itemsize
        sep_bytes = statistics.fmean(r["params"] for r in sr) * 4
        out.append(f"| {f} | {b['R_max']} / {b['R_mean']:.1f} | {b['clusters']} | {b['bank_params']:,} "
                   f"({b['fraction']:.4f}) | {bs['median']:.1f}% | {bs['worst']:.1f}% | {ss['median']:.1f}% | "
                   f"{ss['worst']:.1f}% | {bs['median'] - ss['median']:+.1f} | {wins}/{len(br)}"
                   f"{f' ({ties} ties)' if ties else ''} | {_med(br, 'kl'):.4f} / {_med(sr, 'kl'):.4f} | "
                   f"{_med(br, 'agreement'):.3f} / {_med(sr, 'agreement'):.3f} | {core_bytes / 1024:,.1f} KiB / {sep_bytes / 1024:,.1f} KiB | "
                   + (f"{sep_bytes / core_bytes:.1f}× |" if b["clusters"] < b["N"] else
                      "– (a cluster per adapter: no bases are shared) |"))
    out += ["", "Per adapter (% of original; bank / separate):", "",
            "| adapter | original | " + " | ".join(bed["budgets"]) + " |", "|---|---:|" + "---:|" * len(bed["budgets"])]
    for n in bed["adapters"]:
        ref = bed["references"].get(n)
        if ref is None:
            continue
        cells = []
        for f in bed["budgets"]:
            b = next((r for r in rows if r["adapter"] == n and r["variant"] == f"bank@{f}"), None)
            s = next((r for r in rows if r["adapter"] == n and r["variant"] == f"separate@{f}"), None)
            cells.append("–" if b is None or s is None else f"{b['pct']:.1f} / {s['pct']:.1f}")
        orig = (f"{ref['original']:.3f}" if metric == "accuracy"
                else f"{ref['original']:.2f} (base {ref['base']:.2f})")
        out.append(f"| {n} | {orig} | " + " | ".join(cells) + " |")
    out += ["", "Every bank of the run: the curves against N (banks of the first N adapters at the curve budget) "
            "and against R (`--budget rank=R`, and the budget rows). Relative error: ‖ΔWᵢ − U Σᵢ Vᵀ‖ / ‖ΔWᵢ‖ over "
            "all modules, as `bank.json` reports it (no evaluation); quality where the bank was scored.", "",
            "| bank | N | R (max / mean) | clusters | params (fraction) | rel. error median / max | quality median "
            "| quality worst | CLI s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, b in sorted(banks.items(), key=lambda kv: (kv[1]["kind"], kv[1]["N"], kv[1]["R_mean"])):
        errs = [a["relative_error"] for a in b["adapters"].values() if a["relative_error"] is not None]
        rr = [r for r in rows if r["variant"] == label]
        st = _stats(rr) if rr else None
        out.append(f"| {label} | {b['N']} | {b['R_max']} / {b['R_mean']:.1f} | {b['clusters']} | {b['bank_params']:,} "
                   f"({b['fraction']:.4f}) | {statistics.median(errs):.3f} / {max(errs):.3f} | "
                   + (f"{st['median']:.1f}% | {st['worst']:.1f}%" if st else "– | –") + f" | {b['seconds']} |")
    if bed.get("failures"):
        out += ["", "Failures: " + "; ".join(bed["failures"])]
    return out + [""]


#: a median margin (points of the original's metric) under this is noise on these test sets (one MiniLM test
#: text is 0.5 point): the bank "beats" the separate cut only by more, and with the lower KL
TIE_POINTS = 1.0


def _beats(margin: float, kl_bank: float, kl_separate: float) -> str:
    if margin >= TIE_POINTS and kl_bank <= kl_separate:
        return "**met**"
    return "**tie** (within noise)" if abs(margin) < TIE_POINTS else "**not met**"


def _acceptance(beds: dict[str, Any]) -> list[str]:
    out = ["## Acceptance at a bank budget of 1/16", "",
           "| bed | median ≥ 98% | worst ≥ 95% | bank beats separate (median margin) | KL median: bank / separate "
           "| clusters |", "|---|---|---|---|---:|---:|"]
    for name, bed in beds.items():
        br, sr = _paired(bed["rows"], "1/16")
        if not br or not sr:
            continue
        bs, ss = _stats(br), _stats(sr)
        yes = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
        out.append(f"| {name} | {yes(bs['median'] >= 98)} ({bs['median']:.1f}%) | {yes(bs['worst'] >= 95)} "
                   f"({bs['worst']:.1f}%) | {_beats(bs['median'] - ss['median'], _med(br, 'kl'), _med(sr, 'kl'))} "
                   f"({bs['median'] - ss['median']:+.1f} pts; "
                   f"mean {bs['mean'] - ss['mean']:+.1f}) | {_med(br, 'kl'):.4f} / {_med(sr, 'kl'):.4f} | "
                   f"{bed['banks']['bank@1/16']['clusters']} |")
    return out + [""]


def render() -> None:
    """``bank.md`` and ``bank.png`` from the ``bank_<bed>.json`` files (hand-written notes below the marker are kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beds = {name: json.loads(bed_json(name).read_text()) for name in BEDS if bed_json(name).exists()}
    if not beds:
        return
    lines = ["# A bank of adapters against each adapter compressed alone, at equal total parameters", "",
             "Generated by `benchmarks/bank.py` from `bank_<bed>.json`. `bank`: `loracompress bank` over all N adapters "
             "(shared bases + one core per adapter); `separate`: `loracompress prune --budget P` (the training-free "
             "global SVD cut) of each adapter alone, with P = the bank's total parameters / N, so both hold the "
             "same total. Heads (`modules_to_save`) are kept whole by both and not counted. Bytes per added adapter: "
             "the new adapter's cores in a bank whose bases are already served, against one separately cut "
             "adapter at the same per-adapter share.", ""]
    lines += _acceptance(beds)
    for name, bed in beds.items():
        lines += _budget_table(name, bed)
    from bank_genai import section  # its own results file: bank_genai.json

    lines += section()
    path = RESULTS / "bank.md"
    notes = ""
    if path.exists() and NOTES_MARKER in path.read_text():
        notes = path.read_text().split(NOTES_MARKER, 1)[1]
    path.write_text("\n".join(lines) + "\n" + NOTES_MARKER + notes)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    twins = {ax: ax.twinx() for ax in axes[1:]}  # quality of the scored banks, beside the reconstruction error
    for twin in twins.values():
        twin.set_ylabel("% of original (scored banks, dashed)")
    for name, bed in beds.items():
        rows = bed["rows"]
        xs, bank_med, sep_med, bank_worst = [], [], [], []
        for f in bed["budgets"]:
            br, sr = _paired(rows, f)
            if br and sr:
                xs.append(float(Fraction(f)))
                bank_med.append(_stats(br)["median"])
                bank_worst.append(_stats(br)["worst"])
                sep_med.append(_stats(sr)["median"])
        if xs:
            axes[0].plot(xs, bank_med, "o-", label=f"{name} bank (median)")
            axes[0].plot(xs, bank_worst, "o:", label=f"{name} bank (worst)")
            axes[0].plot(xs, sep_med, "s--", label=f"{name} separate (median)")
        curve_f = bed.get("curve_budget", "1/16")
        on_n = lambda b, f=curve_f: b["kind"] == "N" or (b["kind"] == "budget" and b.get("F") == f)  # noqa: E731
        on_r = lambda b: b["kind"] in ("R", "budget")  # noqa: E731
        for ax, key, keep in ((axes[1], "N", on_n), (axes[2], "R_mean", on_r)):
            pts = sorted((b[key], statistics.median(a["relative_error"] for a in b["adapters"].values()))
                         for b in bed["banks"].values() if keep(b))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name}: median relative error")
            q = sorted((b[key], _stats(rr)["median"]) for label, b in bed["banks"].items() if keep(b)
                       for rr in [[r for r in rows if r["variant"] == label]] if rr)
            if q:
                twins[ax].plot([p[0] for p in q], [p[1] for p in q], "s--", label=f"{name}: median quality %")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("total parameters / originals' (bank budget)")
    axes[0].set_ylabel("% of original (accuracy, or perplexity gain)")
    axes[0].set_title("bank vs separate cut, equal totals")
    axes[1].set_xlabel("N adapters in the bank (at the curve budget)")
    axes[1].set_ylabel("relative error")
    axes[1].set_title("against N")
    axes[2].set_xlabel("R (mean over modules)")
    axes[2].set_ylabel("relative error")
    axes[2].set_title("against R")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for twin in twins.values():
        if twin.get_legend_handles_labels()[0]:
            twin.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "bank.png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bed", choices=sorted(BEDS), default="minilm")
    p.add_argument("--budgets", default="1/8,1/16,1/32", help="bank budgets, fractions of the originals' total")
    p.add_argument("--curve-n", default="4,8", help="banks of the first N adapters (at --curve-budget)")
    p.add_argument("--curve-budget", default="1/16")
    p.add_argument("--ranks", default="", help="banks at --budget rank=R, for the curve against R")
    p.add_argument("--curve-eval", action="store_true", help="score the curves' banks on the test splits too "
                   "(default: their points are bank.json's reconstruction errors, which cost no evaluation)")
    p.add_argument("--max-test", type=int, default=0, help="score on this many test samples (0: the whole split)")
    p.add_argument("--max-adapters", type=int, default=0, help="only the first K adapters (0: all)")
    p.add_argument("--bank-code", default=None, help="a checkout whose loracompress runs the bank command")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render", action="store_true", help="only re-render bank.md / bank.png from the bank_<bed>.json files")
    args = p.parse_args()
    if args.render:
        render()
        return
    args.budgets = [b for b in args.budgets.split(",") if b]
    args.curve_n = [int(k) for k in args.curve_n.split(",") if k]
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run(args)


if __name__ == "__main__":
    main()
