"""The activation-aware cut (loracompress.cuts.activation) against a dense reference and stock PEFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from loracompress.core.budget import Budget
from loracompress.core.reader import load_adapter
from loracompress.cuts.activation import (
    InputMoments,
    activation_aware_svd,
    allocation_values,
    collect_moments,
    whitened_svds,
)
from loracompress.cuts.svd import compress_svd, decompose, truncated_adapter
from loracompress.pipelines.evaluate import compare_adapters
from loracompress.runtime.data import Example, make_batches, prepare_model, task_of
from loracompress.runtime.layers import attach, detach, lora_layers
from loracompress.runtime.model import load_base_model
from tests.tiny import make_adapter, peft_deltas, save_tiny_base, tiny_sentences

KINDS = ("bert", "llama", "gpt2")


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """Per kind: adapter dir, adapter, loaded base (with tokenizer), task, padded calibration batches."""
    out = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(kind)
        save_tiny_base(kind, root / "base")
        ad_dir, _ = make_adapter(kind, root / "adapter")
        adapter = load_adapter(ad_dir)
        base = load_base_model(str(root / "base"), adapter)
        prepare_model(base)
        task = task_of(base)
        examples = [Example(t) for t in tiny_sentences(48, seed=7, min_words=2, max_words=14)]
        batches = make_batches(examples, base.tokenizer, task=task, seq_len=24, batch_size=8)
        out[kind] = (ad_dir, adapter, base, task, batches, root)
    return out


_PEFT_CACHE: dict = {}


def peft_input_moments(ad_dir, base, batches):
    """Σ = E[xxᵀ] of every LoRA module's input in the stock PEFT model, real tokens only (cached)."""
    key = str(ad_dir)
    if key not in _PEFT_CACHE:
        _PEFT_CACHE[key] = _peft_input_moments(ad_dir, base, batches)
    return _PEFT_CACHE[key]


def _peft_input_moments(ad_dir, base, batches):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(ad_dir)).eval()
    inner = model.base_model.model
    sums, counts, handles, mask = {}, {}, [], {}
    for name, mod in inner.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            def hook(_m, args, name=name):
                x = args[0]
                x = (x[mask["m"]] if x.shape[:-1] == mask["m"].shape else x.reshape(-1, x.shape[-1])).double()
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            mask["m"] = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in sums}, counts


def attached_moments(adapter, base, batches):
    layers = attach(base.model, adapter)
    try:
        return collect_moments(base.model, layers, batches)
    finally:
        detach(base.model)


@pytest.mark.parametrize("kind", KINDS)
def test_moments_are_those_of_the_fine_tuned_model_in_stock_peft(setups, kind):
    ad_dir, adapter, base, _, batches, _ = setups[kind]
    sigma, counts = peft_input_moments(ad_dir, base, batches)
    moments = attached_moments(adapter, base, batches)
    assert not lora_layers(base.model)  # detached again
    real_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    assert real_tokens < sum(b["attention_mask"].numel() for b in batches)  # there was padding to skip
    for path, m in adapter.modules.items():
        assert moments.tokens[path] == counts[path]
        # every real token, or one per sample for BERT's pooler (it reads the [CLS] state only)
        assert counts[path] == (48 if "pooler" in path else real_tokens)
        A = m.A.double()
        want = A @ sigma[path] @ A.T
        assert torch.allclose(moments.gram[path], want, rtol=1e-4, atol=1e-7 * float(want.abs().max()))
        assert moments.sq_norm[path] == pytest.approx(float(torch.trace(sigma[path])), rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padding_does_not_change_the_moments(setups, kind):
    _, adapter, base, task, _, _ = setups[kind]
    ex = [Example(t) for t in tiny_sentences(12, seed=3, min_words=1, max_words=15)]
    padded = attached_moments(adapter, base, make_batches(ex, base.tokenizer, task=task, seq_len=24, batch_size=6))
    single = attached_moments(adapter, base, make_batches(ex, base.tokenizer, task=task, seq_len=24, batch_size=1))
    for path in adapter.modules:
        assert padded.tokens[path] == single.tokens[path]
        g = single.gram[path]
        assert torch.allclose(padded.gram[path], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
def test_equals_the_dense_whitened_cut(setups, kind):
    """The r×r computation gives exactly the dense recipe: Cholesky of the damped Σ, SVD of ΔW·L,
    A' = √S Vᵀ L⁻¹, B' = U √S."""
    ad_dir, adapter, base, _, batches, _ = setups[kind]
    sigma, _ = peft_input_moments(ad_dir, base, batches)
    damping = 0.01
    svds = whitened_svds(adapter, attached_moments(adapter, base, batches), damping)
    for path, m in adapter.modules.items():
        S_in = sigma[path]
        L = torch.linalg.cholesky(S_in + damping * S_in.diagonal().mean() * torch.eye(S_in.shape[0], dtype=S_in.dtype))
        U, S, Vh = torch.linalg.svd(m.delta().double() @ L)
        assert torch.allclose(svds[path].S, S[: m.rank], rtol=1e-6, atol=1e-9 * float(S[0]))
        for k in (1, m.rank // 2, m.rank):
            A_dense = torch.linalg.solve_triangular(L, (S[:k].sqrt()[:, None] * Vh[:k]), upper=False, left=False)
            B_dense = U[:, :k] * S[:k].sqrt()
            A, B = svds[path].factors(k, torch.float64)
            want = B_dense @ A_dense
            assert torch.allclose(B @ A, want, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
def test_output_error_is_minimal_per_module(setups, kind):
    """At the same rank, the activation-aware factors leave less error on the calibration inputs
    than the weight-space ones, and exactly the tail of the output-space spectrum."""
    ad_dir, adapter, base, _, batches, _ = setups[kind]
    sigma, _ = peft_input_moments(ad_dir, base, batches)
    act = whitened_svds(adapter, attached_moments(adapter, base, batches), damping=0.0)
    ws = decompose(adapter)
    strictly = 0
    for path, m in adapter.modules.items():
        dW = m.delta().double()
        for k in (1, 3):
            errs = []
            for svd in (act[path], ws[path]):
                A, B = svd.factors(k, torch.float64)
                E = dW - B @ A
                errs.append(float(torch.trace(E @ sigma[path] @ E.T)))
            assert errs[0] <= errs[1] * (1 + 1e-9)
            assert errs[0] == pytest.approx(float((act[path].S[k:] ** 2).sum()), rel=1e-6)
            strictly += errs[0] < 0.999 * errs[1]
    assert strictly >= len(adapter.modules)  # most (module, rank) pairs gain more than 0.1%


@pytest.mark.parametrize("kind", KINDS)
def test_lower_kl_than_weight_space_cut_at_the_same_budget(setups, kind):
    _, adapter, base, task, batches, _ = setups[kind]
    for text in ("0.5", "0.25"):
        budget = Budget.parse(text)
        weight = compress_svd(adapter, budget)
        act = activation_aware_svd(base, adapter, batches, budget)
        assert act.target_params == weight.target_params
        assert act.adapter.num_params <= act.target_params
        assert act.adapter.num_params >= act.target_params - max(m.cost for m in adapter.modules.values())
        kl_w = compare_adapters(base, adapter, weight.adapter, batches, task)["kl"]
        kl_a = compare_adapters(base, adapter, act.adapter, batches, task)["kl"]
        assert kl_a < kl_w, (text, kl_a, kl_w)


@pytest.mark.parametrize("kind", KINDS)
def test_isotropic_inputs_of_any_scale_give_the_weight_space_allocation(setups, kind):
    # Σ = c·I in every module, c spanning four orders of magnitude: the output error of each component
    # is c·σ², and only the scale differs between modules, so the cut must be the plain one.
    _, adapter, *_ = setups[kind]
    scales = {p: 10.0 ** (i % 5 - 2) for i, p in enumerate(adapter.modules)}
    moments = InputMoments()
    for p, m in adapter.modules.items():
        A = m.A.double()
        moments.gram[p] = scales[p] * (A @ A.T)
        moments.sq_norm[p] = scales[p] * m.in_features
        moments.tokens[p] = 100
    svds = whitened_svds(adapter, moments)
    for text in ("0.5", "0.25", "0.125"):
        plain = compress_svd(adapter, Budget.parse(text)).ranks_after
        relative = compress_svd(adapter, Budget.parse(text), svds=svds,
                                values=allocation_values(adapter, svds, moments)).ranks_after
        raw = compress_svd(adapter, Budget.parse(text), svds=svds).ranks_after
        assert relative == plain, text
        assert raw != plain, text  # raw output-space σ² chases the large-input modules


def test_heavy_damping_tends_to_the_weight_space_cut(setups):
    _, adapter, base, _, batches, _ = setups["llama"]
    moments = attached_moments(adapter, base, batches)
    heavy = whitened_svds(adapter, moments, damping=1e8)
    ranks = {p: 3 for p in adapter.modules}
    a = truncated_adapter(adapter, heavy, ranks)
    w = truncated_adapter(adapter, decompose(adapter), ranks)
    for p in adapter.modules:
        dw = w.modules[p].delta()
        assert torch.allclose(a.modules[p].delta(), dw, atol=1e-4 * float(dw.abs().max()))


def test_modules_without_tokens_fall_back_to_the_weight_space_cut(setups, caplog):
    _, adapter, base, _, batches, _ = setups["llama"]
    moments = attached_moments(adapter, base, batches)
    missing = next(iter(adapter.modules))
    partial = InputMoments(gram={p: g for p, g in moments.gram.items() if p != missing},
                           sq_norm={p: s for p, s in moments.sq_norm.items() if p != missing},
                           tokens={**moments.tokens, missing: 0})
    with caplog.at_level("WARNING"):
        svds = whitened_svds(adapter, partial)
    assert f"{missing} saw no calibration tokens" in caplog.text
    assert float(svds[missing].S.abs().sum()) == 0.0  # valued last by the allocation
    A, B = svds[missing].factors(2)
    Aw, Bw = decompose(adapter)[missing].factors(2)
    assert torch.allclose(B @ A, Bw @ Aw, atol=1e-6)


def test_prune_with_data_writes_an_activation_aware_adapter(setups, tmp_path, capsys):
    from loracompress_cli.app import main

    ad_dir, adapter, base, _, _, root = setups["bert"]
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n"
                            for i, t in enumerate(tiny_sentences(60, seed=11))))
    out = tmp_path / "small"
    rc = main(["prune", str(ad_dir), "--method", "svd", "--budget", "0.25", "--base-model", str(root / "base"), "--data", str(data),
               "--eval-fraction", "0.2", "-o", str(out), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "compression_report.json").read_text())
    s = report["settings"]
    assert s["activation_aware"] is True and s["samples"] == 48 and s["held_out_samples"] == 12
    q = report["quality"]
    assert q["samples"] == 12 and 0 <= q["kl"] and 0 <= q["agreement"] <= 1 and "accuracy" in q
    assert report["params_after"] <= report["budget"]["target_params"]
    # stock PEFT reads it, and it holds the activation-aware factors (not the weight-space ones)
    small = load_adapter(out)
    peft = peft_deltas(out, copy.deepcopy(base.model))
    ws = compress_svd(adapter, Budget.parse("0.25")).adapter
    differs = 0
    for p, m in small.modules.items():
        assert torch.allclose(peft[p], m.delta(), atol=1e-5 * float(m.delta().abs().max()))
        if p not in ws.modules or ws.modules[p].rank != m.rank or not torch.allclose(
                ws.modules[p].delta(), m.delta(), atol=1e-4):
            differs += 1
    assert differs > 0
    # --no-eval: no quality; --eval-data: measured on that file
    out2 = tmp_path / "small2"
    assert main(["prune", str(ad_dir), "--method", "svd", "--budget", "0.25", "--base-model", str(root / "base"), "--data", str(data),
                 "--no-eval", "-o", str(out2)]) == 0
    r2 = json.loads((out2 / "compression_report.json").read_text())
    assert r2["quality"] == {} and r2["settings"]["samples"] == 60
    out3 = tmp_path / "small3"
    assert main(["prune", str(ad_dir), "--method", "svd", "--budget", "0.25", "--base-model", str(root / "base"), "--data", str(data),
                 "--eval-data", str(data), "-o", str(out3)]) == 0
    assert json.loads((out3 / "compression_report.json").read_text())["quality"]["samples"] == 60


def test_prune_with_bad_data_exits_2_and_writes_nothing(setups, tmp_path, capsys):
    from loracompress_cli.app import main

    ad_dir, _, _, _, _, root = setups["bert"]
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "good movie", "label": 7}\n{"text": "bad film", "label": 0}\n' * 5)
    out = tmp_path / "small"
    rc = main(["prune", str(ad_dir), "--method", "svd", "--budget", "0.25", "--base-model", str(root / "base"), "--data", str(data),
               "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "label 7 but the model's head has 3 classes" in err and "Traceback" not in err
    assert not out.exists()
