"""Quality vs budget on real adapters: every method against the cheap alternatives, in one process.

For each budget, on the same base model, the same calibration data, the same seed and the same
number of steps, this runs

* ``svd``            the training-free global SVD cut (weight space, no data);
* ``svd-aware``      the activation-aware cut (``--method svd`` with ``--data``);
* ``prilora``, ``lorpa``, ``increlora``, ``adalora``   calibration through ``api.prune``;
* ``dylora``         one DyLoRA run at the largest budget, then ``truncate`` to every budget;

and the baselines

* ``peft-convert``   PEFT's ``save_as_lora`` (``convert_to_lora``) with the largest uniform rank whose
                     parameter count fits the budget;
* ``uniform-svd``    kohya-style uniform truncation: the same rank everywhere (``--budget rank=K``);
* ``scratch``        a LoRA of that uniform rank trained from scratch (PEFT init: kaiming-uniform A,
                     zero B, alpha = 2r) by the same engine, with the same loss (distillation from the
                     original adapter + the task loss), data, steps, learning rate, warm-up and seed.

Where even rank 1 on every module is over the budget, each baseline keeps rank 1 on a subset of module
*types* instead (whole types such as ``q_proj`` across all layers, cheapest first, while they fit: the
attention projections on both tasks), which is what someone retraining a smaller LoRA would target.

Each output is scored on the test split (accuracy or perplexity, :mod:`loracompress.pipelines.evaluate`);
results go to ``benchmarks/results/quality_<task>.json`` after every run, and
``benchmarks/results/quality.md`` / ``quality_<task>.png`` are re-rendered from those files.

    OMP_NUM_THREADS=1 python benchmarks/quality.py --task minilm
    OMP_NUM_THREADS=1 python benchmarks/quality.py --task smollm2 --budgets 0.125,0.03125 --steps 20 ...
    python benchmarks/quality.py --render          # tables and plots from the JSON files only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracompress.calibration.methods.base import Method, MethodSettings
from loracompress.calibration.methods.registry import available  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "samples"))

log = logging.getLogger("quality")

#: every registered calibration method (one file each under loracompress/calibration/methods/); DyLoRA is
#: run once at the largest budget and truncated to the others, so it has its own row kind
CALIBRATED = tuple(m for m in available() if m != "dylora")
#: "default": ``prune --data --budget`` as a user runs it (no --method, held-out split, --keep-best on): the
#: default method, the loss chosen for the data (label-free settings when it has no labels), the best candidate
ALL_METHODS = ("svd", "svd-aware", *CALIBRATED, "dylora", "default", "peft-convert", "uniform-svd", "scratch")
BASELINES = ("peft-convert", "uniform-svd", "scratch")
TASKS = ("minilm", "minilm-nolabels", "news20", "smollm2")


@dataclass
class Task:
    name: str
    adapter: Path
    base: str
    calib: Path
    test: Path
    metric: str  # "accuracy" (higher is better) or "perplexity" (lower is better)
    seq_len: int
    batch_size: int
    #: the calibration data's label field; "" calibrates label-free (the labels, if any, are ignored)
    label_field: str | None = None


def task_spec(name: str) -> Task:
    from base_model_path import base_model_path

    if name == "minilm":
        d = ROOT / "samples" / "minilm-rt"
        return Task(name, d / "adapter", str(base_model_path("minilm")), d / "data" / "calib.jsonl",
                    d / "data" / "test.jsonl", "accuracy", seq_len=64, batch_size=16)
    if name == "minilm-nolabels":  # the bundled sample as a user with unlabelled text would calibrate it
        d = ROOT / "samples" / "minilm-rt"
        return Task(name, d / "adapter", str(base_model_path("minilm")), d / "data" / "calib.jsonl",
                    d / "data" / "test.jsonl", "accuracy", seq_len=64, batch_size=16, label_field="")
    if name == "news20":  # 20 labels; its calib.jsonl has no labels at all (samples/build_news20_sample.py)
        d = ROOT / "samples" / "news20"
        return Task(name, d / "adapter", str(base_model_path("minilm")), d / "data" / "calib.jsonl",
                    d / "data" / "test.jsonl", "accuracy", seq_len=64, batch_size=16)
    if name == "smollm2":
        d = ROOT / "samples" / "smollm2-news"
        return Task(name, d / "adapter", str(base_model_path("smollm2")), d / "data" / "calib.jsonl",
                    d / "data" / "test.jsonl", "perplexity", seq_len=128, batch_size=8)
    raise SystemExit(f"unknown task {name!r}: one of {', '.join(TASKS)}")


# --------------------------------------------------------------------------- baselines


def uniform_rank(adapter: Any, target: int) -> int:
    """The largest uniform rank whose parameter count is at most ``target`` (0 when even rank 1 is over)."""
    per_rank = sum(m.cost for m in adapter.modules.values())
    return min(adapter.max_rank, target // per_rank)


def module_type(path: str) -> str:
    """A module's type: its path with the layer index taken out (``model.layers.{i}.self_attn.q_proj``)."""
    return re.sub(r"\.\d+\.", ".{i}.", path)


def rank1_subset(adapter: Any, target: int) -> list[str]:
    """Module paths of whole module types, cheapest type first, whose rank-1 cost fits in ``target``."""
    cost: dict[str, int] = {}
    for path, m in adapter.modules.items():
        cost[module_type(path)] = cost.get(module_type(path), 0) + m.cost
    chosen: set[str] = set()
    spent = 0
    for kind in sorted(cost, key=lambda k: (cost[k], k)):
        if spent + cost[kind] > target:
            break  # cheapest first: nothing after this one fits either
        chosen.add(kind)
        spent += cost[kind]
    return [p for p in adapter.modules if module_type(p) in chosen]


def peft_convert(task: Task, base: Any, original: Any, rank: int, workdir: Path) -> Any:
    """PEFT's own LoRA->LoRA conversion (``save_as_lora``) at uniform ``rank``, read back as an Adapter.

    PEFT's file holds the LoRA factors only (scale 1, ``lora_alpha = r``); the classifier head
    (``modules_to_save``) is not part of it, so the original's head is kept, as for every other method.
    """
    import warnings

    from peft import PeftModel
    from peft.tuners.lora.conversion import save_as_lora
    from safetensors.torch import load_file

    from loracompress.core.adapter import LoraModule

    model = copy.deepcopy(base.model)
    peft_model = PeftModel.from_pretrained(model, str(task.adapter))
    out = workdir / f"peft-r{rank}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "converting a LoRA to LoRA": that is the point here
        save_as_lora(out, peft_model, rank=rank)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    modules = {}
    for path in original.modules:
        a = next(v for k, v in tensors.items() if k.endswith(f"{path}.lora_A.weight"))
        b = next(v for k, v in tensors.items() if k.endswith(f"{path}.lora_B.weight"))
        modules[path] = LoraModule(A=a.float(), B=b.float(), scale=1.0)
    del peft_model, model
    return original.replace(modules)


@dataclass
class _ScratchSettings(MethodSettings):
    rank: int = 1  # the uniform rank of the scratch LoRA, recorded with the run


class FixedRanks(Method):
    """A 'method' that changes nothing: every module keeps its rank (the scratch LoRA's training)."""

    name = "scratch"
    Settings = _ScratchSettings

    def finalize(self) -> dict[str, int]:
        assert self.ctx is not None
        return {p: layer.active_rank for p, layer in self.ctx.layers.items()}


def scratch_lora(original: Any, base: Any, data: Any, rank: int, args: argparse.Namespace,
                 paths: list[str] | None = None) -> Any:
    """A LoRA of uniform ``rank`` on ``paths`` (default: every module of the original) trained from scratch
    by the engine with the calibration's loss and schedule."""
    from loracompress.calibration.engine import Engine
    from loracompress.core.adapter import LoraModule

    gen = torch.Generator().manual_seed(args.seed)
    modules = {}
    for path, m in original.modules.items():
        if paths is not None and path not in paths:
            continue
        a = torch.empty(rank, m.in_features)
        bound = 1.0 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt(5)), PEFT's default init of A
        a.uniform_(-bound, bound, generator=gen)
        modules[path] = LoraModule(A=a, B=torch.zeros(m.out_features, rank), scale=2.0)  # alpha = 2r
    student = original.replace(modules)
    target = rank * sum(m.cost for m in student.modules.values())
    result = Engine(scratch_config(data, args)).run(base.model, original, student, FixedRanks(rank=rank), target,
                                                    data.train, data.task)
    return result.adapter


def scratch_config(data: Any, args: argparse.Namespace) -> Any:
    """The scratch LoRA's engine settings: the calibration's own schedule for this data (label-free data:
    more and larger steps on fresh views, calibrate.py), with the benchmark's loss weights and seed."""
    from loracompress.calibration.engine import EngineConfig
    from loracompress.pipelines.calibrate import data_settings

    auto = data_settings(argparse.Namespace(lr=args.scratch_lr or args.lr, steps=args.steps, epochs=None,
                                            hidden_weight=None, pseudo_labels=None, token_dropout=None), data)
    return EngineConfig(warmup=0.1, seed=args.seed, kd_weight=args.kd_weight, task_weight=args.task_weight,
                        temperature=2.0, device=args.device, **auto)


# --------------------------------------------------------------------------- scoring


class Scorer:
    """Test-split metric of an adapter, the original adapter's reference pass cached."""

    def __init__(self, base: Any, original: Any, batches: list[dict[str, torch.Tensor]], task: str, metric: str):
        from loracompress.pipelines.evaluate import ReferenceCache

        self.base, self.original, self.batches, self.task, self.metric = base, original, batches, task, metric
        self.cache = ReferenceCache()

    def __call__(self, adapter: Any) -> dict[str, float]:
        from loracompress.pipelines.evaluate import evaluate
        from loracompress.runtime.layers import attach, detach

        attach(self.base.model, adapter, teacher=self.original)
        try:
            r = evaluate(self.base.model, self.batches, self.task, cache=self.cache)
        finally:
            detach(self.base.model)
        return {"metric": r[self.metric]["after"], "original": r[self.metric]["before"], "kl": r["kl"],
                "agreement": r["agreement"]}

    def bare_base(self) -> float:
        """The metric of the base model alone on the same batches (the ``base`` layer mode: no LoRA at all),
        the zero of :func:`gain_kept`."""
        from loracompress.pipelines.evaluate import evaluate
        from loracompress.runtime.layers import attach, detach

        attach(self.base.model, self.original)
        try:
            r = evaluate(self.base.model, self.batches, self.task, reference="base", candidate="base")
        finally:
            detach(self.base.model)
        return r[self.metric]["after"]


def gain_kept(metric: float, original: float, base: float) -> float:
    """The share of what the adapter learned that ``metric`` keeps: ``(base - metric) / (base - original)``
    (the same form for accuracy, where both differences change sign). 100% is the original, 0% the bare base;
    above 100% beats the original, below 0% is worse than no adapter. A perplexity of 99.6% of the original
    can keep far less of the gain when the adapter improves the base by little."""
    return (base - metric) / (base - original)


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path``, so that two runs with ``--append`` can fill one task's file."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def _merge_settings(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Budgets, methods and training budgets of ``theirs`` first, then any of ``ours`` not among them."""
    for key in ("budgets", "methods", "train_budgets"):
        before = theirs.get(key) or []
        ours[key] = before + [v for v in ours[key] or [] if v not in before]


def run(args: argparse.Namespace) -> None:
    from loracompress.core.budget import Budget
    from loracompress.core.reader import load_adapter
    from loracompress.cuts.nested import truncate_adapter
    from loracompress.pipelines.evaluate import EvalOptions
    from loracompress.pipelines.inputs import load_base, load_data, read_batches
    from loracompress.pipelines.prune import PruneOptions, prune
    from loracompress.runtime.data import task_of

    task = task_spec(args.task)
    seq_len = args.seq_len or task.seq_len
    batch_size = args.batch_size or task.batch_size
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    original = load_adapter(task.adapter)
    test_opts = EvalOptions(data=str(task.test), base_model=task.base, max_samples=args.max_test, seed=args.seed,
                            seq_len=seq_len, batch_size=batch_size,
                            device=args.device if args.device != "auto" else "cpu")
    base = load_base(original, test_opts)
    kind = task_of(base)
    test, test_batches = read_batches(base, task.test, test_opts)
    score = Scorer(base, original, test_batches, kind, task.metric)
    common = dict(base_model=task.base, data=str(task.calib), seq_len=seq_len, batch_size=batch_size,
                  max_samples=args.max_calib, seed=args.seed, device=args.device, evaluate=False,
                  label_field=task.label_field)
    calib_opts = dict(common, steps=args.steps, lr=args.lr, kd_weight=args.kd_weight, task_weight=args.task_weight)
    data = load_data(base, PruneOptions(method="prilora", **common))
    total = original.num_params
    costs = [m.cost for m in original.modules.values()]
    ranks = [m.rank for m in original.modules.values()]

    out_json = RESULTS / f"quality_{task.name}.json"
    state: dict[str, Any] = {
        "task": task.name, "metric": task.metric, "adapter": str(task.adapter.relative_to(ROOT)),
        "base_model": task.base.replace(str(Path.home()), "~"), "original_params": total,
        "settings": {"steps": args.steps, "lr": args.lr, "scratch_lr": args.scratch_lr or args.lr,
                     "kd_weight": args.kd_weight, "task_weight": args.task_weight, "temperature": 2.0,
                     "seed": args.seed, "seq_len": seq_len, "batch_size": batch_size, "calib_samples": data.samples,
                     "calib_batches": len(data.train), "test_samples": len(test), "max_test": args.max_test,
                     "max_calib": args.max_calib, "budgets": args.budgets, "methods": args.methods, "train_budgets": args.train_budgets,
                     "threads": args.threads},
        "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
        "device": f"{args.device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
                  f"{args.threads} thread(s))",
        "rows": [],
    }
    t = time.perf_counter()
    ref = score(original)
    state["original_metric"] = ref["original"]
    state["eval_seconds"] = time.perf_counter() - t
    state["base_metric"] = score.bare_base()  # the zero of the gain kept, on the same texts
    log.info("original %s %.4f, bare base %.4f (test eval %.1fs)", task.metric, ref["original"],
             state["base_metric"], state["eval_seconds"])
    with _locked(out_json):
        if args.append and out_json.exists():
            old = json.loads(out_json.read_text())
            state["rows"] = old["rows"]
            state["earlier_commands"] = old.get("earlier_commands", []) + [old["command"]]
            _merge_settings(state["settings"], old["settings"])  # the file covers what every run covered
        _write_json(out_json, state)


    def record(method: str, budget: str, adapter: Any, seconds: float, **extra: Any) -> None:
        s = score(adapter)
        params = adapter.num_params
        row = {"method": method, "budget": budget, "params": params, "fraction": params / total,
               "metric": s["metric"], "kl": s["kl"], "agreement": s["agreement"], "seconds": round(seconds, 1),
               "test_samples": len(test), **extra}
        if method in (*CALIBRATED, "dylora", "scratch", "default"):  # rows of one file may come from runs with other steps
            row["steps"] = args.steps or "default"
        row["pct_of_original"] = 100 * (s["metric"] / ref["original"] if task.metric == "accuracy"
                                        else ref["original"] / s["metric"])
        row["gain_kept"] = 100 * gain_kept(s["metric"], ref["original"], state["base_metric"])
        with _locked(out_json):  # another process may be filling other rows of the same file (--append)
            disk = json.loads(out_json.read_text()) if out_json.exists() else state
            _merge_settings(state["settings"], disk["settings"])  # a parallel --append run may have added some
            state["rows"] = [r for r in disk["rows"] if not (r["method"] == method and r["budget"] == budget)] + [row]
            state["earlier_commands"] = [c for c in disk.get("earlier_commands", []) + [disk["command"]]
                                         if c != state["command"]]
            state["failures"] = sorted(f for f in set(disk.get("failures", []) + state.get("failures", []))
                                       if not f.startswith(f"{method} @ {budget}:"))  # this row has now worked
            _write_json(out_json, state)
        log.info("%-12s %-8s params %7d  %s %.4f (%.1f%%)  kl %.4f  %.0fs", method, budget, params, task.metric,
                 s["metric"], row["pct_of_original"], s["kl"], seconds)
        render()

    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        work = Path(tmp)

        def via_prune(method: str, budget: str, opts: dict[str, Any]) -> tuple[Any, float]:
            out = work / f"{method}-{budget}-{len(list(work.iterdir()))}"
            t0 = time.perf_counter()
            prune(task.adapter, out, PruneOptions(budget=budget, method=method, **opts))
            return load_adapter(out), time.perf_counter() - t0

        dylora = None
        with _locked(out_json):
            done = {(r["method"], r["budget"]) for r in json.loads(out_json.read_text())["rows"]}
        for budget in args.budgets:
            target = Budget.parse(budget).resolve(costs, ranks, 4)
            k = uniform_rank(original, target)
            for method in args.methods:
                if method in (*CALIBRATED, "scratch", "default") and budget not in args.train_budgets:
                    continue
                if args.skip_done and (method, budget) in done:
                    continue
                try:
                    if method == "svd":
                        a, sec = via_prune("svd", budget, {})
                        record(method, budget, a, sec)
                    elif method == "svd-aware":
                        a, sec = via_prune("svd", budget, {**common, "method_settings": {}})
                        record(method, budget, a, sec)
                    elif method in CALIBRATED:
                        a, sec = via_prune(method, budget, calib_opts)
                        record(method, budget, a, sec)
                    elif method == "default":
                        out = work / f"default-{budget}"
                        t0 = time.perf_counter()
                        rep = prune(task.adapter, out, PruneOptions(budget=budget, method=None, **{
                            **calib_opts, "evaluate": True}))
                        kept = rep["settings"].get("keep_best") or {}
                        record(method, budget, load_adapter(out), time.perf_counter() - t0,
                               calibrated=rep["settings"]["method"], kept=kept.get("kept"),
                               keep_best=kept.get("candidates"), held_out_samples=kept.get("held_out_samples"),
                               loss={k: rep["settings"]["engine"].get(k)
                                     for k in ("hidden_weight", "pseudo_labels", "token_dropout", "lr", "epochs")})
                    elif method == "dylora":
                        if dylora is None:  # trained once, at the largest budget; b_min covers the smallest
                            top = max(args.budgets, key=float)
                            smallest = min(float(b) for b in args.budgets) / float(top)
                            dylora, dsec = via_prune("dylora", top, {**calib_opts, "method_settings": {
                                "b_min": min(1 / 16, smallest)}})
                        t0 = time.perf_counter()
                        # at the training budget the run's own output is the answer (it may sit a few
                        # parameters under the target, and truncate refuses a budget above the adapter)
                        cut = (dylora if target >= dylora.num_params
                               else truncate_adapter(dylora, Budget("params", target, str(target))).adapter)
                        record(method, budget, cut, time.perf_counter() - t0, train_seconds=round(dsec, 1))
                    elif method in ("peft-convert", "uniform-svd", "scratch"):
                        # under rank 1 everywhere: rank 1 on the module types that fit (see the docstring)
                        subset = rank1_subset(original, target) if k == 0 else None
                        if subset == []:
                            record(method, budget, original.replace({}), 0.0, rank=0,
                                   note="no module type fits at rank 1: no LoRA modules (base + head)")
                            continue
                        r = k or 1
                        t0 = time.perf_counter()
                        if method == "peft-convert":
                            a = peft_convert(task, base, original, r, work)
                        elif method == "uniform-svd":
                            a, _ = via_prune("svd", f"rank={r}", {"max_rank": r})
                        else:
                            a = scratch_lora(original, base, data, r, args, subset)
                        extra: dict[str, Any] = {"rank": r}
                        if subset is not None:
                            a = a.replace({p: a.modules[p] for p in subset})
                            types = sorted({module_type(p).split(".{i}.")[-1] for p in subset})
                            extra["note"] = f"rank 1 on {', '.join(types)} only (rank 1 everywhere is over the budget)"
                            extra["modules"] = f"{len(subset)}/{len(original.modules)}"
                        record(method, budget, a, time.perf_counter() - t0, **extra)
                except Exception as err:  # one failure must not lose the rest of the run
                    log.exception("%s at %s failed", method, budget)
                    state.setdefault("failures", []).append(f"{method} @ {budget}: {type(err).__name__}: {err}")
                    with _locked(out_json):
                        _write_json(out_json, state)


def measure_base(args: argparse.Namespace) -> None:
    """The bare base's metric on the test texts a task's JSON was scored on (its recorded ``max_test``,
    ``seq_len``, ``batch_size`` and ``seed``), written into that JSON as ``base_metric``: for files made
    before runs recorded it. Without the (git-ignored) adapter folder, a perplexity task loads the base from
    the task's spec alone: no LoRA and no head are needed to score the base on language modelling."""
    from loracompress.core.adapter import Adapter
    from loracompress.core.reader import load_adapter
    from loracompress.pipelines.evaluate import EvalOptions, evaluate
    from loracompress.pipelines.inputs import load_base, read_batches
    from loracompress.runtime.data import task_of

    task = task_spec(args.task)
    out_json = RESULTS / f"quality_{task.name}.json"
    st = json.loads(out_json.read_text())
    s = st["settings"]
    torch.set_num_threads(args.threads)
    if (task.adapter / "adapter_config.json").exists():
        adapter = load_adapter(task.adapter)
    elif task.metric == "perplexity":
        adapter = Adapter(modules={}, config={"task_type": "CAUSAL_LM", "peft_type": "LORA"})
    else:
        raise SystemExit(f"{task.adapter} is missing: a classification head comes from the adapter")
    opts = EvalOptions(data=str(task.test), base_model=task.base, max_samples=s["max_test"], seed=s["seed"],
                       seq_len=s["seq_len"], batch_size=s["batch_size"], device="cpu")
    base = load_base(adapter, opts)
    test, batches = read_batches(base, task.test, opts)
    if len(test) != s["test_samples"]:
        raise SystemExit(f"{len(test)} test samples, the JSON was scored on {s['test_samples']}")
    t = time.perf_counter()
    r = evaluate(base.model, batches, task_of(base), reference="base", candidate="base")
    with _locked(out_json):
        st = json.loads(out_json.read_text())
        st["base_metric"] = r[task.metric]["after"]
        st["base_command"] = " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]])
        for row in st["rows"]:
            row["gain_kept"] = 100 * gain_kept(row["metric"], st["original_metric"], st["base_metric"])
        _write_json(out_json, st)
    log.info("bare base %s %.4f on %d samples (%.1fs)", task.metric, st["base_metric"], len(test),
             time.perf_counter() - t)


# --------------------------------------------------------------------------- report


def _fmt_metric(metric: str, v: float) -> str:
    return f"{v:.3f}" if metric == "accuracy" else f"{v:.2f}"


def _share(st: dict[str, Any], r: dict[str, Any]) -> str:
    """A row's metric as a share: of the original (``99.6%``), and of the adapter's gain over the bare base
    (``98.9% of gain``) when the base was measured on the same texts; the second is the honest one, since a
    perplexity close to the original's can still be far from it measured against what the adapter learned."""
    text = f"{r['pct_of_original']:.1f}%"
    if st.get("base_metric") is not None:
        text += f", {100 * gain_kept(r['metric'], st['original_metric'], st['base_metric']):.1f}% of gain"
    return text


def _versus_svd(st: dict[str, Any], rows: list[dict[str, Any]], budgets: list[str]) -> list[str]:
    """Each calibrated method against the training-free cut it starts from, and DyLoRA's cuts against PRILoRA."""
    metric, higher = st["metric"], st["metric"] == "accuracy"
    unit = "pts" if higher else "ppl"

    def get(m: str, b: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["method"] == m and r["budget"] == b), None)

    def gain(r: dict[str, Any], ref: dict[str, Any]) -> str:
        d = (r["metric"] - ref["metric"]) * (100 if higher else -1)
        return f"{d:+.1f} {unit}" if higher else f"{d:+.2f} {unit}"

    out = [f"Against the training-free `svd` cut of the same budget ({metric}: % of the original"
           f"{' and share of its gain over the bare base kept' if st.get('base_metric') is not None else ''}, then the "
           f"difference to the cut, positive = better; KL: the method's / the cut's):", "",
           "| method | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for m in (*CALIBRATED, "dylora", "default", "svd-aware"):
        cells = []
        for b in budgets:
            r, ref = get(m, b), get("svd", b)
            cells.append("–" if r is None or ref is None else
                         f"{_share(st, r)} ({gain(r, ref)}) · KL {r['kl']:.4f}/{ref['kl']:.4f}")
        if any(c != "–" for c in cells):
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    cells = []
    for b in budgets:
        r, ref = get("dylora", b), get("prilora", b)
        cells.append("–" if r is None or ref is None else gain(r, ref))
    if any(c != "–" for c in cells):
        out += ["", "One DyLoRA run truncated to each budget, against a PRILoRA run at that budget "
                "(positive = DyLoRA's cut is better):", "", "| | " + " | ".join(budgets) + " |",
                "|---|" + "---:|" * len(budgets), "| dylora − prilora | " + " | ".join(cells) + " |"]
    return out + [""]


def render() -> None:
    """``quality.md`` and ``quality_<task>.png`` from the JSON result files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Quality vs budget: compression methods against PEFT's conversion, uniform SVD and retraining", "",
             "Generated by `benchmarks/quality.py` from `quality_<task>.json` (all numbers below come from those files).",
             ""]
    headline = ["## Headline: best method vs best baseline per budget", "",
                "Best by the task metric (accuracy: higher is better; perplexity: lower). Margin: positive = the best method "
                "is better than the best baseline. KL: held-out KL to the original adapter. In brackets: % of the original "
                "adapter's metric and, where the bare base was measured on the same texts, the share of the adapter's gain "
                "over the base that is kept, (base − metric) / (base − original).", "",
                "| task | budget | params | best method | metric | KL | best baseline (within budget) | metric | KL | margin "
                "| lowest KL of all |",
                "|---|---|---:|---|---:|---:|---|---:|---:|---:|---|"]
    sections = []
    for path in sorted(RESULTS.glob("quality_*.json")):
        st = json.loads(path.read_text())
        if not st["rows"]:  # a run that has only just started
            continue
        metric, higher = st["metric"], st["metric"] == "accuracy"
        rows = st["rows"]
        budgets = sorted({r["budget"] for r in rows}, key=float, reverse=True)
        methods = [m for m in ALL_METHODS if any(r["method"] == m for r in rows)]
        sec = [f"## {st['task']}", "",
               f"Adapter `{st['adapter']}` ({st['original_params']:,} LoRA parameters), original test {metric} "
               f"**{_fmt_metric(metric, st['original_metric'])}**. Device: {st['device']}.", "",
               f"Command: `OMP_NUM_THREADS=1 {st['command']}`", ""]
        if st.get("base_metric") is not None:
            sec[4:4] = [f"The bare base (no adapter) on the same test texts: **{_fmt_metric(metric, st['base_metric'])}**, "
                        f"so the adapter's gain is {abs(st['base_metric'] - st['original_metric']):.2f}"
                        f"{' ppl' if metric == 'perplexity' else ''}; \"of gain\" = (base − metric) / (base − original), "
                        "100% = the original, 0% = no adapter, above 100% = better than the original "
                        f"(measured by `{st.get('base_command') or st['command']}`).", ""]
        for c in st.get("earlier_commands", []):
            sec.append(f"Earlier rows from: `OMP_NUM_THREADS=1 {c}`")
        s = st["settings"]
        sec += [f"Settings: {json.dumps(s)}", "",
                "| method | " + " | ".join(f"{b}" for b in budgets) + " |",
                "|---|" + "---:|" * len(budgets)]
        for m in methods:
            cells = []
            for b in budgets:
                r = next((r for r in rows if r["method"] == m and r["budget"] == b), None)
                if r is None:
                    cells.append("–")
                    continue
                extra = f" r={r['rank']}" if "rank" in r else ""
                extra += f" on {r['modules']} modules" if "modules" in r else ""
                extra += f" wrote {r['kept']}" if r.get("kept") else ""  # the default: what --keep-best chose
                cells.append(f"{_fmt_metric(metric, r['metric'])} ({_share(st, r)}) · "
                             f"{r['params']:,}p{extra} · {r['seconds']:.0f}s")
            sec.append(f"| {m} | " + " | ".join(cells) + " |")
        sec += ["", "Held-out KL to the original adapter (test split, T=1; lower is better):", "",
                "| method | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
        for m in methods:
            kls = [next((f"{r['kl']:.4f}" for r in rows if r["method"] == m and r["budget"] == b), "–")
                   for b in budgets]
            sec.append(f"| {m} | " + " | ".join(kls) + " |")
        sec += ["", f"Cells: test {metric} (% of the original adapter's"
                f"{', share of its gain over the bare base kept' if st.get('base_metric') is not None else ''}) · "
                "stored LoRA parameters · wall seconds "
                "(dylora: the truncation; its one training run is listed below). Scoring on the test split is not "
                "included in the seconds.", ""]
        dy = [r for r in rows if r["method"] == "dylora" and "train_seconds" in r]
        if dy:
            sec.append(f"DyLoRA training run (once, at the largest budget): {dy[0]['train_seconds']:.0f}s.")
        for f in st.get("failures", []):
            sec.append(f"- failed: {f}")
        sec.append("")
        sec += _versus_svd(st, rows, budgets)
        sections += sec
        for b in budgets:
            here = [r for r in rows if r["budget"] == b]
            ours = [r for r in here if r["method"] not in BASELINES]
            base = [r for r in here if r["method"] in BASELINES and r["params"] > 0]
            empty = [r for r in here if r["method"] in BASELINES and r["params"] == 0]
            if not ours:
                continue
            pick = max if higher else min
            best = pick(ours, key=lambda r: r["metric"])
            closest = min(here, key=lambda r: r["kl"])  # the sharper measure of keeping what was learned
            if base:
                bb = pick(base, key=lambda r: r["metric"])
                where = f" on {bb['modules']} modules" if "modules" in bb else ""
                kept = f" ({_share(st, bb)})" if st.get("base_metric") is not None else ""
                btxt = (f"{bb['method']} (r={bb.get('rank')}{where}, {bb['params']:,}p) | {_fmt_metric(metric, bb['metric'])}"
                        f"{kept} | {bb['kl']:.4f}")
            elif empty:
                bb = empty[0]
                btxt = (f"no LoRA fits (rank 1 everywhere is over budget): base model (+ trained head) | "
                        f"{_fmt_metric(metric, bb['metric'])} | {bb['kl']:.4f}")
            else:
                bb, btxt, mtxt = None, "not run | – | –", "–"
            if bb is not None:
                margin = best["metric"] - bb["metric"] if higher else bb["metric"] - best["metric"]
                mtxt = f"{100 * margin:+.1f} pts" if higher else f"{margin:+.2f} ppl"
            headline.append(f"| {st['task']} | {b} | {best['params']:,} | {best['method']} | "
                            f"{_fmt_metric(metric, best['metric'])} ({_share(st, best)}) | {best['kl']:.4f} | "
                            f"{btxt} | {mtxt} | {closest['method']} ({closest['kl']:.4f}) |")
        # plot
        # the metric (noisy on a small test split) beside the KL to the original (the sharper measure)
        fig, (ax, kx) = plt.subplots(1, 2, figsize=(12, 4.5))
        for m in methods:
            pts = sorted((r["params"], r["metric"], r["kl"]) for r in rows if r["method"] == m and r["params"] > 0)
            if pts:
                style = dict(marker="o", label=m, linestyle="--" if m in BASELINES else "-")
                ax.plot([p for p, _, _ in pts], [v for _, v, _ in pts], **style)
                kx.plot([p for p, _, _ in pts], [k for _, _, k in pts], **style)
        ax.axhline(st["original_metric"], color="k", linewidth=0.8, label=f"original ({st['original_params']:,}p)")
        if st.get("base_metric") is not None:
            ax.axhline(st["base_metric"], color="k", linewidth=0.8, linestyle=":", label="bare base (no adapter)")
        for a in (ax, kx):
            a.set_xscale("log")
            a.set_xlabel("stored LoRA parameters")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{st['task']}: test {metric} vs parameters")
        ax.legend(fontsize=7)
        kx.set_yscale("log")
        kx.set_ylabel("KL to the original adapter (test split)")
        kx.set_title(f"{st['task']}: KL to the original (lower is better)")
        fig.tight_layout()
        fig.savefig(RESULTS / f"quality_{st['task']}.png", dpi=110)
        plt.close(fig)
    notes = RESULTS / "quality_notes.md"  # the hand-written reading of these numbers
    findings = [notes.read_text().rstrip(), ""] if notes.exists() else []
    (RESULTS / "quality.md").write_text("\n".join(lines + headline + [""] + findings + sections) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--budgets", default="0.25,0.125,0.0625,0.03125")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--steps", type=int, default=None, help="calibration steps (all calibrated methods and scratch)")
    p.add_argument("--lr", type=float, default=None, help="default: prune's own (1e-3; 3e-3 for label-free data)")
    p.add_argument("--scratch-lr", type=float, default=None, help="learning rate of the scratch LoRA (default --lr)")
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--task-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None, help="score on a subset of the test split")
    p.add_argument("--max-calib", type=int, default=None, help="calibrate on a subset of the calibration split")
    p.add_argument("--train-budgets", default=None,
                   help="budgets at which the calibrated methods and scratch run (default: all --budgets)")
    p.add_argument("--append", action="store_true", help="keep earlier rows of this task's JSON")
    p.add_argument("--skip-done", action="store_true",
                   help="with --append: skip the (method, budget) rows the JSON already has (resume a stopped run)")
    p.add_argument("--render", action="store_true", help="only re-render quality.md and the plots")
    p.add_argument("--base-only", action="store_true",
                   help="only score the bare base on the task's recorded test texts, into its JSON (base_metric)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.render:
        render()
        return
    if not args.task:
        p.error("--task is required (or --render)")
    if args.base_only:
        measure_base(args)
        render()
        return
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    args.train_budgets = ([b.strip() for b in args.train_budgets.split(",")] if args.train_budgets
                          else list(args.budgets))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    run(args)
    render()


if __name__ == "__main__":
    main()
