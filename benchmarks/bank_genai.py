"""onnxruntime-genai on a bank: its graph's tokens against PEFT, and its tokens/s against N separate adapters.

Two measurements on a causal-LM test bed (``--bed smollm2``: the 4 SmolLM2-135M LoRAs of
``samples/build_bank_smollm2.py``), each through the CLI as a user runs it:

* ``check``  ``loracompress bank`` of the bed at ``--budget`` (1/16 as in ``bank.md``, clusters auto), then
  ``loracompress bank-export``, whose own verification IS the check: per adapter, onnxruntime-genai
  generates 3 prompts × 20 greedy tokens from the bank graph with that adapter's cores active and
  stock PEFT does the same on the expanded folder ``OUT/adapters/<name>/`` (and the bare base with
  none active); the export writes nothing unless every sequence is identical and the first step's
  logits are within 1e-3. The rows are its ``export_report.json``, per adapter.
* ``speed``  greedy tokens/s under onnxruntime-genai (CPU), N adapters loaded from ONE bank graph
  (``--clusters 1``: the bases in the graph, an R×R core per module in each ``.onnx_adapter``) against
  N separate multi-LoRA adapters (``loracompress export --format onnx --engine genai --mode adapters``
  of each adapter cut alone by ``prune --budget P``, P = the bank's total parameters / N, as in
  ``bank.py``), plus the separate graph with no adapter active. Same prompts, same token counts
  (``min_length`` = ``max_length``: no early stop), cycling through the N adapters for every
  prompt; both graphs open in one process and measured in alternating rounds. Also the bytes on disk
  of each side's graph and adapter files.

Rows go to ``benchmarks/results/bank_genai.json`` as they finish, one entry per measurement, bank budget and
clusters (a rerun replaces its own entry only), and ``bank.md`` is re-rendered (``bank.py --render`` too)::

    OMP_NUM_THREADS=1 python benchmarks/bank_genai.py check --bed smollm2 --budget 1/16
    OMP_NUM_THREADS=1 python benchmarks/bank_genai.py speed --bed smollm2 --budget 1/16 --clusters 1
    # any adapters of one base instead of a bed:
    python benchmarks/bank_genai.py speed --adapters A/ B/ --base-model BASE/ --new-tokens 8 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bank import BEDS, RESULTS, _write_json, bank_summary, fraction_text, render, run_cli  # noqa: E402

log = logging.getLogger("bank_genai")

GENAI_JSON = RESULTS / "bank_genai.json"
GRAPH_PREFIX = "model.onnx"
SPEED_COMMAND = "OMP_NUM_THREADS=1 python benchmarks/bank_genai.py speed --bed smollm2 --budget 1/16 --clusters 1"


# --------------------------------------------------------------------------- inputs


def sources(args: argparse.Namespace, work: Path) -> tuple[list[Path], str, str]:
    """The adapters (each in a folder named after it: the bank names adapters by folder), base model, label."""
    if args.adapters:
        if not args.base_model:
            raise SystemExit("error: --adapters needs --base-model")
        return [Path(a) for a in args.adapters], args.base_model, "adapters " + " ".join(Path(a).name for a in args.adapters)
    from base_model_path import base_model_path

    folder, key, _, _, _ = BEDS[args.bed]
    names = sorted(p.name for p in folder.iterdir() if (p / "adapter" / "adapter_config.json").is_file())
    if len(names) < 2:
        raise SystemExit(f"error: {folder} holds {len(names)} adapters; build the test bed first "
                         f"(python samples/build_bank_{args.bed}.py)")
    for n in names:
        shutil.copytree(folder / n / "adapter", work / "src" / n, dirs_exist_ok=True)
    return [work / "src" / n for n in names], args.base_model or str(base_model_path(key)), f"bed {args.bed}"


def make_bank(srcs: list[Path], out: Path, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """``loracompress bank`` (CLI); returns ``bank.json`` and the wall time."""
    sec = run_cli(["bank", *map(str, srcs), "--budget", fraction_text(args.budget), "--clusters", args.clusters,
                   "-o", str(out), "--force"], None)
    return json.loads((out / "bank.json").read_text()), sec


def graph_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(GRAPH_PREFIX))


def header(args: argparse.Namespace, what: str) -> dict[str, Any]:
    import onnxruntime_genai as og
    import torch

    return {"inputs": what, "budget": args.budget, "clusters_asked": args.clusters,
            "command": " ".join(["python", "benchmarks/bank_genai.py", *sys.argv[1:]]),
            "device": f"cpu ({platform.processor() or platform.machine()}; a shared 2-core machine)",
            "versions": {"onnxruntime-genai": og.__version__, "torch": torch.__version__},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


class Results:
    """``bank_genai.json``: ``check`` (one entry per bank budget and clusters) and ``speed``; saved after every row."""

    def __init__(self, path: Path, kind: str, entry: dict[str, Any], key: str | None = None):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        if key is None:
            self.data[kind] = entry
        else:
            self.data.setdefault(kind, {})[key] = entry
        self.entry = entry
        self.save()

    def save(self) -> None:
        _write_json(self.path, self.data)
        if self.path == GENAI_JSON:
            render()


def _differs(tokens: list[list[int]], base: list[list[int]]) -> int:
    """How many of an adapter's sequences are not the base's: the adapter visibly acts on the graph."""
    return sum(t != b for t, b in zip(tokens, base))


# --------------------------------------------------------------------------- check


def check(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bank-genai-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        srcs, base_model, what = sources(args, work)
        res = Results(Path(args.results), "check", {**header(args, what), "adapters": [], "failure": None},
                      key=f"{args.budget}, clusters {args.clusters}")
        manifest, sec = make_bank(srcs, work / "bank", args)
        res.entry["bank"] = {**bank_summary(manifest), "seconds": round(sec, 1)}
        res.save()
        log.info("bank: %d cluster(s), R max %d, %.0fs", manifest["clusters"]["count"], res.entry["bank"]["R_max"], sec)
        out = work / "bank-onnx"
        try:
            sec = run_cli(["bank-export", str(work / "bank"), "--base-model", base_model, "-o", str(out), "--force"], None)
        except RuntimeError as err:  # the export refuses to write when a token differs: say which
            res.entry["failure"] = str(err)
            res.save()
            raise SystemExit(f"error: {err}") from None
        report = json.loads((out / "export_report.json").read_text())
        res.entry["export_seconds"] = round(sec, 1)
        res.entry.update({k: report[k] for k in ("prompts", "new_tokens", "tolerance", "tokens_identical",
                                                 "first_step_max_abs_diff", "versions")})
        checks = {c["name"]: c for c in report["checks"]}
        base_checks = [c for c in report["checks"] if c["name"].startswith("base only")]
        for k, cluster in enumerate(report["clusters"]):
            ranks = list(cluster["ranks"].values())
            base = base_checks[k]  # one "base only" check per graph, in cluster order
            for f in cluster["adapters"]:
                c = checks[Path(f["file"]).name]
                res.entry["adapters"].append({
                    "adapter": f["adapter"], "cluster": cluster["cluster"], "R_max": max(ranks),
                    "R_mean": round(sum(ranks) / len(ranks), 2), "modules": len(ranks),
                    "tokens_identical": c["tokens_identical"], "near_ties": len(c["near_ties"]),
                    "first_step_max_abs_diff": c["first_step_max_abs_diff"], "passed": c["passed"],
                    "differs_from_base": _differs(c["tokens"], base["tokens"]),
                    "adapter_bytes": f["bytes"], "graph_bytes": cluster["graph_bytes"]})
            c = base
            res.entry["adapters"].append({
                "adapter": f"(none active: the base) on {cluster['folder']}", "cluster": cluster["cluster"],
                "tokens_identical": c["tokens_identical"], "near_ties": len(c["near_ties"]),
                "first_step_max_abs_diff": c["first_step_max_abs_diff"], "passed": c["passed"]})
        res.save()
        for row in res.entry["adapters"]:
            log.info("%-40s tokens identical %s, first-step max abs diff %.2e", row["adapter"], row["tokens_identical"],
                     row["first_step_max_abs_diff"])


# --------------------------------------------------------------------------- speed


class Side:
    """One graph under onnxruntime-genai (CPU, ``threads`` intra-op threads) with its adapters loaded."""

    def __init__(self, label: str, folder: Path, files: dict[str, str], threads: int):
        import onnxruntime_genai as og

        self.label, self.folder = label, folder
        config = og.Config(str(folder))
        config.clear_providers()
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.adapters = og.Adapters(self.model)
        self.names = list(files)  # adapter -> file name in the folder
        for name, file in files.items():
            self.adapters.load(str(folder / file), name)

    def generate(self, prompt: list[int], new_tokens: int, name: str | None) -> int:
        """Greedy, exactly ``new_tokens`` tokens (no early stop); returns how many were generated."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        length = len(prompt) + new_tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(self.model, params)
        if name is not None:
            gen.set_active_adapter(self.adapters, name)
        gen.append_tokens(prompt)
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        return n

    def run(self, prompts: list[list[int]], new_tokens: int, active: list[str | None]) -> tuple[int, float]:
        """Every prompt, each time with every adapter of ``active`` in turn; returns (tokens, seconds)."""
        t0, n = time.perf_counter(), 0
        for prompt in prompts:
            for name in active:
                n += self.generate(prompt, new_tokens, name)
        return n, time.perf_counter() - t0


SETUP_JSON = "speed_setup.json"


def speed_setup(args: argparse.Namespace, work: Path, srcs: list[Path], base_model: str) -> dict[str, Any]:
    """The bank graph and the separate multi-LoRA export of the same adapters, in ``work``; what was made."""
    from loracompress.core.reader import load_adapter
    from loracompress.pipelines.prune import PruneOptions, prune

    secs: dict[str, float] = {}
    manifest, secs["bank"] = make_bank(srcs, work / "bank", args)
    summary = bank_summary(manifest)
    if summary["clusters"] != 1:
        raise SystemExit(f"error: the bank has {summary['clusters']} clusters, so {summary['clusters']} graphs; "
                         "tokens/s from one bank graph needs --clusters 1")
    secs["bank-export"] = run_cli(["bank-export", str(work / "bank"), "--base-model", base_model,
                                   "-o", str(work / "bank-onnx"), "--force"], None)
    bank_report = json.loads((work / "bank-onnx" / "export_report.json").read_text())
    cluster = bank_report["clusters"][0]
    each = summary["bank_params"] // len(srcs)
    t0 = time.perf_counter()
    for src in srcs:  # the cut bank.py calls "separate", at the same total parameters
        prune(src, work / "sep" / src.name, PruneOptions(budget=str(each), force=True))
    secs["prune"] = time.perf_counter() - t0
    secs["export"] = run_cli(["export", *(str(work / "sep" / s.name) for s in srcs), "-f", "onnx", "--engine", "genai",
                              "--mode", "adapters", "--base-model", base_model, "-o", str(work / "sep-onnx"),
                              "--force"], None)
    sep_report = json.loads((work / "sep-onnx" / "export_report.json").read_text())
    setup: dict[str, Any] = {
        "setup_seconds": {k: round(v, 1) for k, v in secs.items()},
        "folders": {"bank": str(work / "bank-onnx" / cluster["folder"]), "separate": str(work / "sep-onnx")},
        "files": {"bank": {f["adapter"]: Path(f["file"]).name for f in cluster["adapters"]},
                  "separate": {Path(a["source"]).name: a["file"] for a in sep_report["adapters"]}},
        "sides": {}}
    for label, report in (("bank", bank_report), ("separate", sep_report)):
        folder = Path(setup["folders"][label])
        sizes = [(folder / f).stat().st_size for f in setup["files"][label].values()]
        setup["sides"][label] = {"graph_bytes": graph_bytes(folder), "adapter_bytes": sum(sizes),
                                 "adapter_bytes_each": sizes, "tokens_identical": report["tokens_identical"]}
    setup["sides"]["bank"].update(R_max=summary["R_max"], R_mean=summary["R_mean"], params=summary["bank_params"])
    setup["sides"]["separate"].update(params=sum(load_adapter(work / "sep" / s.name).num_params for s in srcs),
                                      params_each=each)
    _write_json(work / SETUP_JSON, setup)
    return setup


def speed(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from loracompress.export.genai_verify import DEFAULT_PROMPTS

    with tempfile.TemporaryDirectory(prefix="bank-genai-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        srcs, base_model, what = sources(args, work)
        entry = {**header(args, what), "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": args.threads,
                 "prompts": list(DEFAULT_PROMPTS), "N": len(srcs), "rows": []}
        res = Results(Path(args.results), "speed", entry, key=f"{args.budget}, clusters {args.clusters}")
        reuse = args.reuse and (work / SETUP_JSON).is_file()
        setup = json.loads((work / SETUP_JSON).read_text()) if reuse else speed_setup(args, work, srcs, base_model)
        entry.update(sides=setup["sides"], setup_seconds=setup["setup_seconds"], setup_reused=reuse)
        res.save()
        b, sep = setup["sides"]["bank"], setup["sides"]["separate"]
        log.info("bank graph %.1f MB + %d adapter files %.1f KB; separate graph %.1f MB + %.1f KB",
                 b["graph_bytes"] / 1e6, len(srcs), b["adapter_bytes"] / 1e3, sep["graph_bytes"] / 1e6,
                 sep["adapter_bytes"] / 1e3)

        sides = {label: Side(label, Path(setup["folders"][label]), setup["files"][label], args.threads)
                 for label in ("bank", "separate")}
        tokenizer = AutoTokenizer.from_pretrained(setup["folders"]["bank"])  # the ids bank-export verified with
        prompts = [list(tokenizer(p)["input_ids"]) for p in DEFAULT_PROMPTS]
        names = [s.name for s in srcs]
        runs: list[tuple[str, Side, list[str | None]]] = [
            ("bank", sides["bank"], list(names)), ("separate", sides["separate"], list(names)),
            ("none active (separate graph)", sides["separate"], [None])]
        for _, side, active in runs:  # warm-up, not timed: first-run allocations and adapter uploads
            side.run(prompts[:1], 2, active)
        for r in range(args.rounds):
            for label, side, active in (runs if r % 2 == 0 else runs[::-1]):  # alternate the order: drift hits both
                n, sec = side.run(prompts, args.new_tokens, active)
                entry["rows"].append({"round": r, "side": label, "generations": len(prompts) * len(active),
                                      "tokens": n, "seconds": round(sec, 3), "tokens_per_s": round(n / sec, 2)})
                res.save()
                log.info("round %d %-30s %d tokens in %.1fs: %.1f tokens/s", r, label, n, sec, n / sec)


# --------------------------------------------------------------------------- bank.md


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _check_lines(c: dict[str, Any]) -> list[str]:
    b = c.get("bank", {})
    out = [f"### Bank budget {c['budget']}, clusters {c['clusters_asked']}: {b.get('clusters', '?')}", "",
           f"Command: `OMP_NUM_THREADS=1 {c['command']}` ({c['date']}; {c['device']}). `loracompress bank` of the "
           f"{c['inputs']}, then `loracompress bank-export`, whose own verification is the check: per adapter, "
           "onnxruntime-genai decodes each prompt greedily from the bank graph with that adapter's cores active, and "
           "stock PEFT does the same on the expanded folder `OUT/adapters/<name>/`; one graph per cluster, and on "
           "each the base with no adapter active.", ""]
    if c.get("failure"):
        out += [f"**Failed**: {c['failure']}", ""]
    if not c["adapters"]:
        return out
    out += [f"{len(c['prompts'])} prompts × {c['new_tokens']} greedy tokens; all together {c['tokens_identical']} "
            f"sequences identical, first-step logits within {c['tolerance']:g}. Bank {b['seconds']} s, export and "
            f"check {c['export_seconds']} s. R over the modules of the adapter's cluster with R > 0 (their number in "
            "brackets). `differs from the base`: the adapter's sequences that are not the bare base's (the cores act).",
            "",
            "| adapter | cluster | R (max / mean over its modules) | tokens identical to PEFT | first-step logits max abs diff "
            "| differs from the base | adapter file | graph |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in c["adapters"]:
        same, total = r["tokens_identical"].split("/")
        ident = ("yes" if same == total else "**no**") + f" ({r['tokens_identical']}"
        ident += f", {r['near_ties']} near tie(s))" if r["near_ties"] else ")"
        if "R_max" in r:
            out.append(f"| {r['adapter']} | {r['cluster']} | {r['R_max']} / {r['R_mean']:.1f} ({r['modules']}) | {ident} | "
                       f"{r['first_step_max_abs_diff']:.2e} | {r['differs_from_base']}/{total} | "
                       f"{_kib(r['adapter_bytes'])} | {_mib(r['graph_bytes'])} |")
        else:
            out.append(f"| {r['adapter']} | {r['cluster']} | – | {ident} | {r['first_step_max_abs_diff']:.2e} | – | – | – |")
    return out + [""]


def section(path: Path = GENAI_JSON) -> list[str]:
    """The onnxruntime-genai sections of ``bank.md`` from ``bank_genai.json``."""
    data = json.loads(path.read_text()) if path.exists() else {}
    out = ["## onnxruntime-genai generates from the bank graph: tokens against PEFT", ""]
    checks = data.get("check") or {}
    if not checks:
        out += ["Not run yet: `OMP_NUM_THREADS=1 python benchmarks/bank_genai.py check --bed smollm2 --budget 1/16`.", ""]
    for c in checks.values():
        out += _check_lines(c)
    out += ["## onnxruntime-genai tokens/s: N adapters from one bank graph against N separate multi-LoRA adapters", ""]
    speeds = {k: v for k, v in (data.get("speed") or {}).items() if v.get("rows")}
    if not speeds:
        out += [f"Not measured yet: `{SPEED_COMMAND}` (about 10 minutes; `--budget 1/32` is the bank whose one "
                "cluster `--clusters auto` chooses).", ""]
    for entry in speeds.values():
        out += _speed_lines(entry)
    return out


def _speed_lines(s: dict[str, Any]) -> list[str]:
    sides = s["sides"]
    out = [f"### Bank budget {s['budget']}, one cluster", "",
           f"Command: `OMP_NUM_THREADS=1 {s['command']}` ({s['date']}; {s['device']}; onnxruntime-genai "
           f"{s['versions']['onnxruntime-genai']}, CPU, {s['threads']} intra-op thread(s)). {s['inputs']}, N = {s['N']}. "
           f"`bank`: one graph (`bank-export`, the shared bases U, V inside), each adapter's file only its R×R cores "
           f"(R ≤ {sides['bank']['R_max']}). `separate`: `export --format onnx --engine genai --mode adapters` of the "
           f"N adapters, each cut alone (`prune --budget {sides['separate']['params_each']:,}`, the bank's "
           f"{sides['bank']['params']:,} parameters / N). Per round, each side decodes the {len(s['prompts'])} prompts "
           f"× {s['new_tokens']} greedy tokens (no early stop) with each of the N adapters in turn, one generator "
           "per sequence; rounds alternate the order of the sides; median over rounds.", "",
           "| side | graph on disk | adapter files (N total / each) | parameters | tokens/s (median) | rounds "
           "| vs separate |", "|---|---:|---:|---:|---:|---:|---:|"]
    med = {}
    for label in dict.fromkeys(r["side"] for r in s["rows"]):
        med[label] = statistics.median(r["tokens_per_s"] for r in s["rows"] if r["side"] == label)
    for label in med:
        n = sum(r["side"] == label for r in s["rows"])
        ratio = f"{med[label] / med['separate']:.2f}×" if "separate" in med else "–"
        side = sides.get(label)
        if side:
            each = statistics.fmean(side["adapter_bytes_each"])
            out.append(f"| {label} | {_mib(side['graph_bytes'])} | {_kib(side['adapter_bytes'])} / {_kib(each)} | "
                       f"{side['params']:,} | {med[label]:.1f} | {n} | {ratio} |")
        else:
            out.append(f"| {label} | (the separate graph) | – | – | {med[label]:.1f} | {n} | {ratio} |")
    if "bank" in med and "separate" in med:
        out += ["", f"Ratio bank / separate: **{med['bank'] / med['separate']:.2f}×** tokens/s; adapter files "
                f"{sides['separate']['adapter_bytes'] / max(sides['bank']['adapter_bytes'], 1):.1f}× smaller in the bank. "
                f"Both exports verified greedy tokens against PEFT before anything was timed: bank "
                f"{sides['bank']['tokens_identical']}, separate {sides['separate']['tokens_identical']} identical."]
    return out + [""]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["check", "speed"])
    p.add_argument("--bed", choices=["smollm2"], default="smollm2", help="a causal-LM test bed (the MiniLM one has heads)")
    p.add_argument("--adapters", nargs="+", default=None, help="adapter folders of one base instead of a bed")
    p.add_argument("--base-model", default=None, help="the base (default: the bed's GGUF)")
    p.add_argument("--budget", default="1/16", help="bank budget, a fraction of the originals' total")
    p.add_argument("--clusters", default=None, help="bank --clusters (default: auto for check, 1 for speed)")
    p.add_argument("--new-tokens", type=int, default=64, help="speed: greedy tokens per sequence")
    p.add_argument("--rounds", type=int, default=3, help="speed: timed rounds per side")
    p.add_argument("--threads", type=int, default=1, help="speed: onnxruntime intra-op threads")
    p.add_argument("--work", default=None, help="keep the banks and exports in this folder (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="speed: measure the graphs an earlier run left in --work")
    p.add_argument("--results", default=str(GENAI_JSON), help="results JSON (bank.md is rendered only from the default)")
    args = p.parse_args(argv)
    args.clusters = args.clusters or ("auto" if args.what == "check" else "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    (check if args.what == "check" else speed)(args)


if __name__ == "__main__":
    main()
