"""The calibration engine on tiny real models: objective, hooks, determinism, resume, interruption, DDP."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loracompress.calibration.engine import (
    Engine,
    EngineConfig,
    Interrupted,
    distillation_loss,
    lr_factor,
    module_depths,
    svd_student,
)
from loracompress.calibration.methods.base import Method
from loracompress.calibration.methods.components import component_magnitude, keep_components
from loracompress.core.adapter import ORDER_KEY, SAFETENSORS_NAME
from loracompress.core.budget import Budget, allocate
from loracompress.core.reader import load_adapter
from loracompress.cuts.svd import compress_svd
from loracompress.errors import LoraCompressError
from loracompress.pipelines.calibrate import checkpoint_dir
from loracompress.pipelines.evaluate import compare_adapters
from loracompress.pipelines.prune import DEFAULT_CALIBRATION, PruneOptions, prune, resolve_method
from loracompress.runtime.data import make_batches, read_examples
from loracompress.runtime.model import load_base_model
from tests.tiny import make_adapter, peft_deltas, save_tiny_base, tiny_sentences, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers (shared by the method tests)


def calib_files(root: Path, kind: str = "bert", n: int = 96, held: int = 48, r: int = 8) -> dict[str, Path]:
    """A tiny base model folder (with tokenizer), a real PEFT adapter on it, calibration and held-out jsonl
    (random labels for the classifier, plain text for the causal LM)."""
    root.mkdir(parents=True, exist_ok=True)
    adapter, _ = make_adapter(kind, root / "adapter", r=r)
    save_tiny_base(kind, root / "base")
    rng = np.random.default_rng(0)
    files = {"adapter": adapter, "base": root / "base", "data": root / "calib.jsonl", "held": root / "held.jsonl"}
    for name, count, seed in (("data", n, 1), ("held", held, 2)):
        with open(files[name], "w", encoding="utf-8") as f:
            for s in tiny_sentences(count, seed=seed):
                row = {"text": s, "label": int(rng.integers(0, 3))} if kind == "bert" else {"text": s}
                f.write(json.dumps(row) + "\n")
    return files


def options(files: dict[str, Path], method: str, budget: str = "0.25", **kw) -> PruneOptions:
    base = {"budget": budget, "method": method, "base_model": str(files["base"]), "data": str(files["data"]),
            "steps": 24, "batch_size": 8, "lr": 5e-3, "device": "cpu", "evaluate": False, "seq_len": 32}
    if method == "svd":  # the training-free cut refuses training settings (they would be ignored)
        del base["steps"], base["lr"]
    base.update(kw)
    return PruneOptions(**base)


def held_out_kl(files: dict[str, Path], compressed: Path, kind: str = "bert") -> float:
    """Mean KL(original ‖ compressed) on the held-out file, measured by ``loracompress.pipelines.evaluate``."""
    original = load_adapter(files["adapter"])
    base = load_base_model(files["base"], original)
    examples = read_examples(files["held"])
    batches = make_batches(examples, base.tokenizer, task="cls" if kind == "bert" else "lm", seq_len=32, batch_size=16)
    return compare_adapters(base, original, load_adapter(compressed), batches, "cls" if kind == "bert" else "lm")["kl"]


def check_budget(report: dict, out: Path) -> None:
    """Within the budget, filled until not one more rank fits (>= 98% whenever one rank of the
    smallest module is under 2% of the budget), and the files say the same."""
    target, after = report["budget"]["target_params"], report["params_after"]
    smallest = min(m["shape"][0] + m["shape"][1] for m in report["modules"])
    assert after <= target
    assert target - after < smallest
    if smallest <= 0.02 * target:
        assert after >= 0.98 * target
    assert load_adapter(out).num_params == after


def check_peft_loads(out: Path, base: torch.nn.Module) -> None:
    """Stock PEFT loads the output and computes the same deltas we saved."""
    saved = load_adapter(out)
    deltas = peft_deltas(out, base)
    assert set(deltas) == set(saved.modules)
    for path, d in deltas.items():
        torch.testing.assert_close(d, saved.modules[path].delta(), rtol=1e-4, atol=1e-6)


def check_method_output(files: dict[str, dict[str, Path]], tmp_path: Path, kind: str, method: str, budget: str,
                        **settings) -> dict:
    """Calibrate the tiny ``kind`` adapter with ``method``; check the budget and that stock PEFT loads the result."""
    out = tmp_path / "out"
    report = prune(files[kind]["adapter"], out, options(files[kind], method, budget=budget, steps=12,
                                                        method_settings=settings))
    check_budget(report, out)
    assert report["settings"]["method"] == method
    _, base = make_adapter(kind, tmp_path / "again", r=8)
    check_peft_loads(out, base)
    return report


def check_beats_svd(files: dict[str, Path], tmp_path: Path, kind: str, method: str, factor: float = 0.7) -> None:
    """Held-out KL to the original after 30 calibration steps is below ``factor`` x that of the SVD cut."""
    prune(files["adapter"], tmp_path / "svd", PruneOptions(budget="0.25"))
    # Distillation only: the fixture's class labels are random (a task loss on noise pulls away from the teacher).
    prune(files["adapter"], tmp_path / method, options(files, method, steps=30, task_weight=0.0))
    kl_svd, kl_cal = held_out_kl(files, tmp_path / "svd", kind), held_out_kl(files, tmp_path / method, kind)
    assert kl_cal < factor * kl_svd, (kl_cal, kl_svd)


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory) -> dict[str, Path]:
    return calib_files(tmp_path_factory.mktemp("bert"), "bert")


# --------------------------------------------------------------------------- a fixed cut, for engine tests


class FixedCut(Method):
    """The SVD allocation at setup, then plain distillation of the survivors (no pruning during training)."""

    name = "fixed-cut"

    def setup(self, ctx):
        super().setup(ctx)
        values = {p: component_magnitude(layer).double().numpy() for p, layer in ctx.layers.items()}
        self.ranks = allocate(values, {p: ctx.cost(p) for p in ctx.layers}, ctx.target_params)
        for p, layer in ctx.layers.items():
            keep_components(layer, torch.arange(layer.rank) < self.ranks[p])

    def finalize(self):
        return dict(self.ranks)


class Recorder(FixedCut):
    """Records every hook call and what the engine had done by then."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []
        self.grads_seen: list[bool] = []

    def setup(self, ctx):
        self.calls.append(("setup", -1))
        super().setup(ctx)

    def before_forward(self, step):
        self.calls.append(("before_forward", step))

    def after_backward(self, step):
        self.calls.append(("after_backward", step))
        self.grads_seen.append(all(layer.A.grad is not None for layer in self.ctx.layers.values()))

    def after_step(self, step):
        self.calls.append(("after_step", step))
        assert all(layer.A.grad is None for layer in self.ctx.layers.values())  # zeroed after the optimizer step

    def finalize(self):
        self.calls.append(("finalize", -1))
        return super().finalize()


def tiny_bert_run(method: Method, steps: int = 6, **cfg):
    """The engine on the tiny BERT classifier and a tiny tokenised dataset; returns (result, adapter, base)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src, base = make_adapter("bert", Path(d) / "a", r=8)
        adapter = load_adapter(src)
    tok = tiny_tokenizer("bert")
    examples = read_examples_from(tiny_sentences(32, seed=3))
    batches = make_batches(examples, tok, task="cls", seq_len=32, batch_size=8)
    model = copy.deepcopy(base)
    target = int(adapter.num_params * 0.25)
    config = EngineConfig(steps=steps, lr=5e-3, device="cpu", **cfg)
    result = Engine(config).run(model, adapter, svd_student(adapter), method, target, batches, "cls")
    return result, adapter, model


def read_examples_from(texts):
    from loracompress.runtime.data import Example

    return [Example(text=t, label=i % 3) for i, t in enumerate(texts)]


# --------------------------------------------------------------------------- objective and schedule


def test_distillation_loss_cls_is_temperature_scaled_kl_plus_ce():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 1])
    loss, parts = distillation_loss(s, t, labels, None, "cls", temperature=2.0, kd_weight=0.5, task_weight=2.0)
    p_t = torch.softmax(t / 2, -1)
    kl = (p_t * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    ce = torch.nn.functional.cross_entropy(s, labels)
    torch.testing.assert_close(loss, 0.5 * kl + 2.0 * ce)
    assert parts["kd"] == pytest.approx(float(kl), rel=1e-5)
    same, _ = distillation_loss(t, t, None, None, "cls")
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_lm_counts_only_labelled_next_tokens():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [-100, -100, 4, 5, 6]])  # pad / prompt are -100
    loss, parts = distillation_loss(s, t, labels, None, "lm", temperature=1.0, kd_weight=1.0, task_weight=0.0)
    keep = labels[:, 1:] != -100  # position i predicts token i+1
    sv, tv = s[:, :-1][keep], t[:, :-1][keep]
    kl = (torch.softmax(tv, -1) * (torch.log_softmax(tv, -1) - torch.log_softmax(sv, -1))).sum(-1).mean()
    torch.testing.assert_close(loss, kl)
    # Changing the logits at uncounted positions changes nothing.
    s2 = s.clone()
    s2[0, 3:] += 5.0
    loss2, _ = distillation_loss(s2, t, labels, None, "lm", temperature=1.0, task_weight=0.0)
    torch.testing.assert_close(loss2, loss)


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, 20, 4, "cosine") for s in range(20)]
    assert f[:4] == sorted(f[:4]) and f[3] < 1.0
    assert f[4] == pytest.approx(1.0) and 0 < f[-1] < 0.02
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    lin = [lr_factor(s, 10, 0, "linear") for s in range(10)]
    assert lin[0] == pytest.approx(1.0) and lin[-1] == pytest.approx(0.1)


def test_module_depths():
    depth, n = module_depths(["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.11.output.dense",
                              "bert.pooler.dense", "model.layers.3.mlp.up_proj"])
    assert depth == {"bert.encoder.layer.0.attention.self.query": 0, "bert.encoder.layer.11.output.dense": 11,
                     "bert.pooler.dense": -1, "model.layers.3.mlp.up_proj": 3}
    assert n == 12


# --------------------------------------------------------------------------- the loop


def test_hooks_are_called_in_order_and_the_base_stays_frozen():
    rec = Recorder()
    result, adapter, model = tiny_bert_run(rec, steps=5)
    expected = [("setup", -1)]
    for step in range(5):
        expected += [("before_forward", step), ("after_backward", step), ("after_step", step)]
    expected.append(("finalize", -1))
    assert rec.calls == expected
    assert all(rec.grads_seen)
    # The LoRA layers are gone again, the base weights untouched and frozen.
    from loracompress.runtime.layers import lora_layers

    assert not lora_layers(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert result.steps == 5 and len(result.losses) == 5
    assert sum(result.ranks[p] * adapter.modules[p].cost for p in result.ranks) <= int(adapter.num_params * 0.25)


def test_teacher_logits_cached_when_data_is_reused_and_results_identical():
    cached, _, _ = tiny_bert_run(FixedCut(), steps=9, cache_teacher=True)
    fresh, _, _ = tiny_bert_run(FixedCut(), steps=9, cache_teacher=False)
    # 4 batches of <= 8 samples x 3 classes x 4 bytes: the cache holds exactly that.
    assert cached.teacher_cache_mb == pytest.approx(32 * 3 * 4 / 2**20, abs=1e-3)
    assert fresh.teacher_cache_mb is None
    for p, m in cached.adapter.modules.items():
        assert torch.equal(m.A, fresh.adapter.modules[p].A) and torch.equal(m.B, fresh.adapter.modules[p].B)


def test_bf16_mixed_precision_runs_on_cpu():
    result, _, model = tiny_bert_run(FixedCut(), steps=3, precision="bf16")
    assert all(math.isfinite(x) for x in result.losses)
    # The autocast wrapper is removed again: the model runs in fp32 afterwards.
    ids = torch.randint(4, 90, (1, 6))
    assert model(input_ids=ids).logits.dtype == torch.float32


def test_engine_config_errors_name_the_flag():
    with pytest.raises(LoraCompressError, match="--steps or --epochs"):
        EngineConfig(steps=3, epochs=1.0)
    with pytest.raises(LoraCompressError, match="--lr"):
        EngineConfig(lr=0)
    with pytest.raises(LoraCompressError, match="fp16 needs a GPU"):
        tiny_bert_run(FixedCut(), steps=1, precision="fp16")


# --------------------------------------------------------------------------- the one-call path




def test_training_alone_lowers_held_out_kl_at_the_svd_cuts_ranks(bert_files):
    """Same ranks as the training-free cut (FixedCut allocates like it); only the distillation differs."""
    original = load_adapter(bert_files["adapter"])
    base = load_base_model(bert_files["base"], original)
    batches = make_batches(read_examples(bert_files["data"]), base.tokenizer, task="cls", seq_len=32, batch_size=8)
    held = make_batches(read_examples(bert_files["held"]), base.tokenizer, task="cls", seq_len=32, batch_size=16)
    svd = compress_svd(original, Budget.parse("0.25"))
    config = EngineConfig(steps=30, lr=5e-3, device="cpu", task_weight=0.0, seed=0)
    result = Engine(config).run(base.model, original, svd_student(original), FixedCut(), svd.target_params,
                                batches, "cls")
    assert result.ranks == svd.ranks_after
    kl_svd = compare_adapters(base, original, svd.adapter, held, "cls")["kl"]
    kl_cal = compare_adapters(base, original, result.adapter, held, "cls")["kl"]
    assert kl_cal < 0.5 * kl_svd, (kl_cal, kl_svd)
    assert result.losses[-1] < result.losses[0] or result.losses[0] < 1e-6


def test_same_seed_same_bytes_and_report(bert_files, tmp_path):
    a = prune(bert_files["adapter"], tmp_path / "a", options(bert_files, "prilora", steps=10, evaluate=True))
    prune(bert_files["adapter"], tmp_path / "b", options(bert_files, "prilora", steps=10, evaluate=True))
    c = prune(bert_files["adapter"], tmp_path / "c", options(bert_files, "prilora", steps=10, seed=1))
    data = {n: (tmp_path / n / SAFETENSORS_NAME).read_bytes() for n in "abc"}
    assert data["a"] == data["b"]
    assert data["a"] != data["c"]
    assert c["settings"]["engine"]["seed"] == 1
    assert {"kl", "agreement", "accuracy"} <= set(a["quality"])
    assert a["settings"]["run"]["steps"] == 10


def test_keep_best_writes_the_closest_cut_when_calibration_moves_away(bert_files, tmp_path):
    """A task loss on the fixture's random labels, with no distillation, pulls the student away from the
    original: the held-out check writes whichever training-free cut of the same budget is closest instead
    (the plain SVD cut, or the activation-aware cut on the same calibration split), bit for bit what that
    cut writes on its own, and --no-keep-best writes what calibration made."""
    drift = dict(steps=12, lr=3e-2, kd_weight=0.0, task_weight=1.0, evaluate=True, eval_data=str(bert_files["held"]))
    report = prune(bert_files["adapter"], tmp_path / "kept", options(bert_files, "lorpa", **drift))
    info = report["settings"]["keep_best"]
    cut_kl = {"svd": info["svd_cut_kl"], "svd-aware": info["aware_cut_kl"]}
    assert info["kept"] in cut_kl and cut_kl[info["kept"]] == min(cut_kl.values()) < info["calibrated_kl"], info
    assert report["method"] == "svd" and report["quality"]["kl"] == pytest.approx(cut_kl[info["kept"]])
    if info["kept"] == "svd":
        cut = compress_svd(load_adapter(bert_files["adapter"]), Budget("params", report["budget"]["target_params"])).adapter
    else:  # prune --method svd --data on the same file, split and seed: the same activation-aware cut
        prune(bert_files["adapter"], tmp_path / "aware", options(bert_files, "svd", evaluate=True,
                                                                   eval_data=str(bert_files["held"])))
        cut = load_adapter(tmp_path / "aware")
    written = load_adapter(tmp_path / "kept")
    assert set(written.modules) == set(cut.modules)
    for path, m in cut.modules.items():
        torch.testing.assert_close(written.modules[path].delta(), m.delta(), rtol=0, atol=0)
    assert held_out_kl(bert_files, tmp_path / "kept") == pytest.approx(report["quality"]["kl"], rel=1e-4)

    raw = prune(bert_files["adapter"], tmp_path / "raw", options(bert_files, "lorpa", keep_best=False, **drift))
    assert "keep_best" not in raw["settings"] and raw["method"] == "lorpa"
    assert raw["quality"]["kl"] == pytest.approx(info["calibrated_kl"])


def test_cli_says_which_cut_keep_best_wrote(bert_files, tmp_path, capsys):
    from loracompress_cli.app import main

    f = bert_files
    args = ["prune", str(f["adapter"]), "--budget", "0.25", "--base-model", str(f["base"]), "--data", str(f["data"]),
            "--eval-data", str(f["held"]), "--steps", "12", "--lr", "3e-2", "--kd-weight", "0", "--task-weight", "1",
            "--batch-size", "8", "--seq-len", "32", "--device", "cpu"]
    assert main([*args, "-o", str(tmp_path / "default")]) == 0  # no --method: the default calibration
    out = capsys.readouterr().out
    kept = json.loads((tmp_path / "default" / "compression_report.json").read_text())["settings"]["keep_best"]["kept"]
    assert kept in ("svd", "svd-aware") and f"{kept} (kept over {DEFAULT_CALIBRATION} by --keep-best):" in out, out
    assert main([*args, "--no-keep-best", "-o", str(tmp_path / "raw")]) == 0
    assert capsys.readouterr().out.startswith(f"{DEFAULT_CALIBRATION}: ")


def test_keep_best_never_swaps_a_dylora_result(bert_files, tmp_path):
    """Even when the cut is closer at the output budget, DyLoRA's nested output (meant for truncate) is kept."""
    drift = dict(steps=12, lr=3e-2, kd_weight=0.0, task_weight=1.0, evaluate=True, eval_data=str(bert_files["held"]))
    report = prune(bert_files["adapter"], tmp_path / "dyl", options(bert_files, "dylora", **drift))
    assert "keep_best" not in report["settings"] and report["method"] == "dylora"
    assert load_adapter(tmp_path / "dyl").metadata[ORDER_KEY] == "dylora"
    prune(bert_files["adapter"], tmp_path / "svd", PruneOptions(budget="0.25"))
    assert held_out_kl(bert_files, tmp_path / "svd") < held_out_kl(bert_files, tmp_path / "dyl")  # a swap was due


def test_keep_best_keeps_calibration_that_is_closer(bert_files, tmp_path):
    report = prune(bert_files["adapter"], tmp_path / "out", options(
        bert_files, "lorpa", budget="0.0625", steps=30, task_weight=0.0, evaluate=True,
        eval_data=str(bert_files["held"])))
    info = report["settings"]["keep_best"]
    assert info["kept"] == "lorpa" and info["calibrated_kl"] < min(info["svd_cut_kl"], info["aware_cut_kl"]), info
    assert report["method"] == "lorpa"


def test_without_method_data_and_a_budget_mean_calibration_with_the_default(bert_files, tmp_path):
    report = prune(bert_files["adapter"], tmp_path / "out", options(bert_files, None, steps=4))
    assert report["settings"]["method"] == DEFAULT_CALIBRATION and report["settings"]["run"]["steps"] == 4


@pytest.mark.parametrize(("given", "expected"), [
    ({"method": "prilora", "data": "d", "budget": "0.5"}, "prilora"),
    ({"data": "d", "budget": "0.5"}, DEFAULT_CALIBRATION),
    ({"budget": "0.5"}, "svd"),  # no data: the training-free cut
    ({"data": "d", "select": "energy:0.9"}, "svd"),  # no budget: only svd can cut by selector
    ({"data": "d", "budget": "0.5", "max_rank": 4}, "svd"),  # svd-only options: the activation-aware cut
    ({"data": "d", "budget": "0.5", "method": "svd"}, "svd"),
])
def test_resolve_method(given, expected):
    assert resolve_method(PruneOptions(**given)) == expected


def test_missing_data_and_budget_are_user_errors(bert_files, tmp_path):
    with pytest.raises(LoraCompressError, match="--data"):
        prune(bert_files["adapter"], tmp_path / "x", PruneOptions(budget="0.25", method="lorpa"))
    with pytest.raises(LoraCompressError, match="--budget"):
        prune(bert_files["adapter"], tmp_path / "x", options(bert_files, "lorpa", budget=None))
    with pytest.raises(LoraCompressError, match="unknown method"):
        prune(bert_files["adapter"], tmp_path / "x", options(bert_files, "nosuch"))
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- interruption and resume


@pytest.mark.parametrize(("method", "by_signal", "stop_at", "every", "saved_at", "extra"), [
    ("lorpa", True, 7, 5, 7, {}),  # a real SIGINT: the step finishes and is checkpointed (after LoRPA's round)
    ("prilora", False, 9, 4, 8, {}),  # a crash-like stop: the last periodic checkpoint is what remains
    ("increlora", False, 9, 4, 8, {"token_dropout": 0.2}),  # fresh views: the resumed steps see the same ones
])
def test_interrupted_runs_stop_cleanly_and_resume_to_the_same_bytes(bert_files, tmp_path, method, by_signal, stop_at,
                                                                     every, saved_at, extra):
    full, out = tmp_path / "full", tmp_path / "out"
    prune(bert_files["adapter"], full, options(bert_files, method, steps=12, **extra))

    def interrupt(step, total, loss, eta):
        if step == stop_at:
            if by_signal:
                os.kill(os.getpid(), signal.SIGINT)  # handled by the engine
            else:
                raise KeyboardInterrupt

    with pytest.raises(Interrupted if by_signal else KeyboardInterrupt, match=f"after step {stop_at} of 12" if by_signal else None):
        prune(bert_files["adapter"], out, options(bert_files, method, steps=12, checkpoint_every=every, **extra),
              progress=interrupt)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    ckpt = checkpoint_dir(out)
    assert sorted(p.name for p in ckpt.iterdir()) == [f"step-{saved_at:08d}"]  # older ones replaced
    assert sorted(p.name for p in (ckpt / f"step-{saved_at:08d}").iterdir()) == ["state.json", "state.safetensors"]

    with pytest.raises(LoraCompressError, match="lr"):  # other settings: refused
        prune(bert_files["adapter"], out, options(bert_files, method, steps=12, lr=1e-2, resume=True, **extra))
    report = prune(bert_files["adapter"], out, options(bert_files, method, steps=12, checkpoint_every=every, resume=True,
                                                       **extra))
    assert report["settings"]["run"]["resumed_from"] == saved_at
    assert (out / SAFETENSORS_NAME).read_bytes() == (full / SAFETENSORS_NAME).read_bytes()
    assert not ckpt.exists()  # removed once the output is written


def test_resume_without_checkpoint_is_a_user_error(bert_files, tmp_path):
    with pytest.raises(LoraCompressError, match="no checkpoint"):
        prune(bert_files["adapter"], tmp_path / "o", options(bert_files, "lorpa", resume=True, checkpoint_every=3))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "loracompress", *args]


@pytest.mark.slow
def test_sigterm_in_a_subprocess_leaves_no_output_and_resumes(bert_files, tmp_path):
    out = tmp_path / "out"
    common = ["prune", str(bert_files["adapter"]), "--method", "lorpa", "--budget", "0.25", "--base-model",
              str(bert_files["base"]), "--data", str(bert_files["data"]), "--steps", "400", "--batch-size", "8",
              "--device", "cpu", "--no-eval", "--checkpoint-every", "5", "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(*common), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = checkpoint_dir(out)
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpt.exists() and list(ckpt.glob("step-*"))):
        time.sleep(0.2)
    seen = sorted(p.name for p in ckpt.glob("step-*")) if ckpt.exists() else []
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (seen, err[-2000:])
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    step = int(sorted(ckpt.glob("step-*"))[-1].name.split("-")[1])
    assert 0 < step < 400
    done = subprocess.run(_cli(*common, "--resume", "--steps", "400"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "compression_report.json").read_text())["settings"]["run"]["resumed_from"] == step


# --------------------------------------------------------------------------- several processes


@pytest.mark.slow
def test_two_cpu_processes_ddp_give_a_valid_adapter(bert_files, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` with ``--device cpu``: two gloo processes (DDP)."""
    out = tmp_path / "ddp"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "loracompress",
           "prune", str(bert_files["adapter"]), "--method", "lorpa", "--budget", "0.25", "--base-model",
           str(bert_files["base"]), "--data", str(bert_files["data"]), "--steps", "8", "--batch-size", "8",
           "--device", "cpu", "--no-eval", "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "compression_report.json").read_text())
    assert report["settings"]["run"]["num_processes"] == 2
    check_budget(report, out)
    _, base = make_adapter("bert", tmp_path / "again", r=8)
    check_peft_loads(out, base)
