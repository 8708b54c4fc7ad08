"""A minimal calibration loop that drives Method hooks on a tiny model, the way the engine does.

The student is the SVD-ordered full-rank copy of a real PEFT checkpoint, the teacher the
checkpoint itself; the loss is the KL from the teacher's logits (or any ``loss_fn``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loracompress.calibration.methods.base import CalibContext, Method
from loracompress.core.adapter import Adapter
from loracompress.core.budget import Budget
from loracompress.core.reader import load_adapter
from loracompress.cuts.svd import decompose, truncated_adapter
from loracompress.runtime.layers import LoraLayer, attach, use_mode
from tests.tiny import make_adapter, sample_inputs

Batch = dict[str, torch.Tensor]
LossFn = Callable[["Calib", Batch], torch.Tensor]


@dataclass
class Calib:
    base: torch.nn.Module  # the untouched base model
    model: torch.nn.Module  # the base model with LoRA layers attached
    layers: dict[str, LoraLayer]
    original: Adapter  # the checkpoint (teacher)
    student: Adapter  # its SVD-ordered full-rank copy (the student's start)
    kind: str


def setup_calibration(kind: str, tmp_path: Path, r: int = 8, seed: int = 0, **adapter_kwargs) -> Calib:
    ckpt, base = make_adapter(kind, tmp_path / f"ckpt-{kind}-{seed}", r=r, seed=seed, **adapter_kwargs)
    original = load_adapter(ckpt)
    student = truncated_adapter(original, decompose(original), original.ranks)
    model = copy.deepcopy(base)
    layers = attach(model, student, teacher=original, trainable=True)
    return Calib(base, model, layers, original, student, kind)


def batches(kind: str, n: int, seed: int, batch: int = 8, seq: int = 16) -> list[Batch]:
    return [sample_inputs(kind, batch=batch, seq=seq, seed=seed * 1000 + i) for i in range(n)]


def kl_loss(calib: Calib, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) on the logits, per token."""
    with torch.no_grad(), use_mode(calib.layers, "teacher"):
        t = calib.model(**batch).logits
    s = calib.model(**batch).logits
    t, s = t.reshape(-1, t.shape[-1]) / temperature, s.reshape(-1, s.shape[-1]) / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def target_params(adapter: Adapter, budget: str) -> int:
    m = adapter.modules
    return Budget.parse(budget).resolve([x.cost for x in m.values()], [x.rank for x in m.values()], 4)


def drive(
    method: Method,
    calib: Calib,
    target: int,
    steps: int,
    data: list[Batch],
    lr: float = 5e-3,
    loss_fn: LossFn = kl_loss,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Run ``steps`` steps calling the hooks in the documented order; returns ``finalize()``."""
    torch.manual_seed(seed)
    params = [p for layer in calib.layers.values() for p in (layer.A, layer.B)]
    opt = torch.optim.Adam(params, lr=lr)
    ctx = CalibContext(layers=calib.layers, target_params=target, total_steps=steps, optimizer=opt, seed=seed,
                       reset_optimizer=opt.state.clear)
    method.setup(ctx)
    for step in range(steps):
        method.before_forward(step)
        loss = loss_fn(calib, data[step % len(data)])
        loss.backward()
        method.after_backward(step)
        opt.step()
        opt.zero_grad()
        method.after_step(step)
        if on_step is not None:
            on_step(step)
    return method.finalize()


def output_adapter(calib: Calib, ranks: dict[str, int], metadata: dict[str, str] | None = None) -> Adapter:
    """The adapter the engine writes: each layer's kept components (mask != 0), in order."""
    modules = {}
    for path, k in ranks.items():
        if k == 0:
            continue
        m = calib.layers[path].to_module()
        if m.rank != k:
            raise AssertionError(f"{path}: finalize said rank {k} but the mask keeps {m.rank}")
        modules[path] = m
    return calib.student.replace(modules, metadata={**calib.student.metadata, **(metadata or {})})


@torch.no_grad()
def held_out_kl(calib: Calib, adapter: Adapter, data: list[Batch]) -> float:
    """Mean KL(original ‖ ``adapter``) on ``data``, on a fresh copy of the base model."""
    model = copy.deepcopy(calib.base)
    layers = attach(model, adapter, teacher=calib.original)
    probe = Calib(calib.base, model, layers, calib.original, adapter, calib.kind)
    return sum(float(kl_loss(probe, b)) for b in data) / len(data)


def local_loss(paths: list[str]) -> LossFn:
    """A loss that sees only the outputs of the layers in ``paths``: MSE to the teacher's outputs.

    With ``paths`` in the first block, no gradient reaches any other module: a case where only
    some modules matter for the loss.
    """

    def loss(calib: Calib, batch: Batch) -> torch.Tensor:
        outs: dict[str, torch.Tensor] = {}
        hooks = [calib.layers[p].register_forward_hook(lambda _m, _i, o, p=p: outs.__setitem__(p, o)) for p in paths]
        try:
            with torch.no_grad(), use_mode(calib.layers, "teacher"):
                calib.model(**batch)
                teacher = {p: o.detach() for p, o in outs.items()}
            calib.model(**batch)
        finally:
            for h in hooks:
                h.remove()
        return sum(F.mse_loss(outs[p], teacher[p]) for p in paths) / len(paths)

    return loss


def nothing_else_fits(adapter: Adapter, ranks: dict[str, int], target: int) -> bool:
    """The budget is met: within ``target``, and no module below its rank could take one more component."""
    spent = sum(adapter.modules[p].cost * k for p, k in ranks.items())
    room = target - spent
    return room >= 0 and all(adapter.modules[p].cost > room for p, k in ranks.items() if k < adapter.modules[p].rank)


def peft_mismatch(adapter: Adapter, directory: Path, base: torch.nn.Module) -> float:
    """Largest |ΔW_PEFT − ΔW_ours| over the modules of the adapter saved at ``directory``, read by stock PEFT."""
    from tests.tiny import peft_deltas

    deltas = peft_deltas(directory, base)
    if set(deltas) != set(adapter.modules):
        raise AssertionError(f"PEFT sees modules {sorted(set(deltas) ^ set(adapter.modules))} differently")
    return max(float((deltas[p] - m.delta()).abs().max()) for p, m in adapter.modules.items())


def check_output(calib: Calib, ranks: dict[str, int], budget: str, out_dir: Path,
                 metadata: dict[str, str] | None = None) -> tuple[float, float]:
    """The output meets ``budget`` exactly and stock PEFT reads it back; returns its held-out KL and the SVD cut's."""
    from loracompress.core.writer import save_adapter
    from loracompress.cuts.svd import compress_svd

    target = target_params(calib.original, budget)
    out = output_adapter(calib, ranks, metadata)
    assert out.num_params <= target and nothing_else_fits(calib.original, ranks, target)
    save_adapter(out, out_dir)
    assert peft_mismatch(out, out_dir, calib.base) < 1e-5
    test = batches(calib.kind, 3, seed=2)
    svd = compress_svd(calib.original, Budget.parse(budget)).adapter
    return held_out_kl(calib, out, test), held_out_kl(calib, svd, test)


def engine_run(files: dict[str, Path], method: str, tmp_path: Path, steps: int = 12,
               **settings: object) -> tuple[dict, Path]:
    """``prune --method METHOD`` through the engine on the tiny BERT files of ``tests.calibration.test_engine``.

    The run is done twice: straight through, and crashed after step 9 then resumed from the
    checkpoint of step 8; both must give the same bytes (the method's state survives the checkpoint).
    Returns the report and the output folder.
    """
    from loracompress.core.adapter import SAFETENSORS_NAME
    from loracompress.pipelines.calibrate import checkpoint_dir
    from loracompress.pipelines.prune import prune
    from tests.calibration.test_engine import options

    def opts(**kw: object):
        # The fixture's labels are random: distil only (a task loss on noise pulls away from the teacher).
        return options(files, method, steps=steps, task_weight=0.0, method_settings=dict(settings), **kw)

    full = tmp_path / f"{method}-full"
    report = prune(files["adapter"], full, opts())

    def crash(step: int, total: int, loss: float, eta: float) -> None:
        if step == 9:
            raise KeyboardInterrupt

    resumed = tmp_path / f"{method}-resumed"
    try:
        prune(files["adapter"], resumed, opts(checkpoint_every=4), progress=crash)
    except KeyboardInterrupt:
        pass
    assert sorted(p.name for p in checkpoint_dir(resumed).iterdir()) == ["step-00000008"]
    prune(files["adapter"], resumed, opts(checkpoint_every=4, resume=True))
    assert (resumed / SAFETENSORS_NAME).read_bytes() == (full / SAFETENSORS_NAME).read_bytes()
    return report, full


def engine_check(files: dict[str, Path], method: str, tmp_path: Path, **settings: object) -> tuple[dict, Path, float, float]:
    """:func:`engine_run`, then: the budget is met, stock PEFT loads the output; returns the report,
    the output folder, its held-out KL and that of the training-free SVD cut of the same budget."""
    from loracompress.pipelines.prune import PruneOptions, prune
    from tests.calibration.test_engine import check_peft_loads, held_out_kl
    from tests.tiny import tiny_bert_cls

    report, out = engine_run(files, method, tmp_path, steps=16, **settings)
    ranks = {row["module"]: row["rank_after"] for row in report["modules"]}
    assert nothing_else_fits(load_adapter(files["adapter"]), ranks, report["budget"]["target_params"])
    check_peft_loads(out, tiny_bert_cls())
    svd = tmp_path / "svd"
    prune(files["adapter"], svd, PruneOptions(budget=report["budget"]["text"]))
    return report, out, held_out_kl(files, out), held_out_kl(files, svd)
