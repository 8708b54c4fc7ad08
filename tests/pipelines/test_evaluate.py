"""Evaluation (loracompress.pipelines.evaluate, ``loracompress eval``) against metrics computed with stock PEFT."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from loracompress.core.budget import Budget
from loracompress.core.reader import load_adapter
from loracompress.core.writer import save_adapter
from loracompress.cuts.svd import compress_svd
from loracompress.pipelines.evaluate import ReferenceCache, compare_adapters, evaluate
from loracompress.runtime.data import Example, make_batches, model_inputs, prepare_model, task_of
from loracompress.runtime.layers import LoraLayer, attach, detach, lora_layers
from loracompress.runtime.model import load_base_model
from loracompress_cli.app import main
from tests.tiny import make_adapter, save_tiny_base, tiny_sentences


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """Per kind: root dir (base/, adapter/, small/), original, compressed, base model, task, batches."""
    out = {}
    for kind in ("bert", "llama"):
        root = tmp_path_factory.mktemp(kind)
        save_tiny_base(kind, root / "base")
        ad_dir, _ = make_adapter(kind, root / "adapter")
        original = load_adapter(ad_dir)
        small = compress_svd(original, Budget.parse("0.25")).adapter
        save_adapter(small, root / "small")
        small = load_adapter(root / "small")
        base = load_base_model(str(root / "base"), original)
        prepare_model(base)
        task = task_of(base)
        ex = [Example(t, label=i % 3 if task == "cls" else None)
              for i, t in enumerate(tiny_sentences(30, seed=5, min_words=2, max_words=12))]
        batches = make_batches(ex, base.tokenizer, task=task, seq_len=24, batch_size=8)
        out[kind] = (root, original, small, base, task, batches)
    return out


def peft_logits(root, adapter_name, base, batches):
    """Logits of stock PEFT running ``root/adapter_name`` (None: the base model alone)."""
    from peft import PeftModel

    model = copy.deepcopy(base.model)
    if adapter_name is not None:
        model = PeftModel.from_pretrained(model, str(root / adapter_name))
    model.eval()
    with torch.no_grad():
        return [model(**model_inputs(b)).logits.float() for b in batches]


def reference_metrics(ref_logits, cand_logits, batches, task):
    """The metrics written out directly from their definitions."""
    kl = agree = n = 0.0
    nll_r = nll_c = correct_r = correct_c = 0.0
    for lr, lc, b in zip(ref_logits, cand_logits, batches):
        if task == "lm":
            keep = b["labels"][:, 1:] != -100
            lr, lc, y = lr[:, :-1][keep], lc[:, :-1][keep], b["labels"][:, 1:][keep]
            nll_r += F.cross_entropy(lr, y, reduction="sum").item()
            nll_c += F.cross_entropy(lc, y, reduction="sum").item()
        else:
            y = b["labels"]
            correct_r += (lr.argmax(-1) == y).sum().item()
            correct_c += (lc.argmax(-1) == y).sum().item()
        p, q = lr.softmax(-1), lc.softmax(-1)
        kl += (p * (p.log() - q.log())).sum().item()
        agree += (lr.argmax(-1) == lc.argmax(-1)).sum().item()
        n += lr.shape[0]
    out = {"kl": kl / n, "agreement": agree / n}
    if task == "lm":
        out["before"], out["after"] = math.exp(nll_r / n), math.exp(nll_c / n)
    else:
        out["before"], out["after"] = correct_r / n, correct_c / n
    return out


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("with_reference", [True, False])
def test_metrics_match_stock_peft(setups, kind, with_reference):
    root, original, small, base, task, batches = setups[kind]
    ref = peft_logits(root, "adapter" if with_reference else None, base, batches)
    cand = peft_logits(root, "small", base, batches)
    want = reference_metrics(ref, cand, batches, task)
    got = compare_adapters(base, original if with_reference else None, small, batches, task)
    assert not lora_layers(base.model)  # detached
    assert got["task"] == task and got["samples"] == 30
    assert got["reference"] == ("teacher" if with_reference else "base")
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-3, abs=1e-7)
    assert got["kl"] > 1e-5  # the cut changed something measurable
    assert got["agreement"] == pytest.approx(want["agreement"])
    metric = got["perplexity"] if task == "lm" else got["accuracy"]
    assert metric["before"] == pytest.approx(want["before"], rel=1e-5)
    assert metric["after"] == pytest.approx(want["after"], rel=1e-5)
    if task == "lm":
        assert got["tokens"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        assert metric["ratio"] == pytest.approx(want["after"] / want["before"])
    else:
        assert metric["retained"] == pytest.approx(want["after"] / want["before"])


def test_identical_adapters_agree_exactly(setups):
    _, original, _, base, task, batches = setups["bert"]
    r = compare_adapters(base, original, original, batches, task)
    assert r["kl"] == pytest.approx(0.0, abs=1e-7) and r["agreement"] == 1.0
    assert r["accuracy"]["before"] == r["accuracy"]["after"]


def test_each_adapter_runs_with_its_own_head(setups, tmp_path):
    """Two adapters whose modules_to_save heads differ: each runs with its own, as stock PEFT loads each.

    Before, the model held the reference's head for both passes, so a candidate with another head was
    scored as if it had the reference's (here: KL 0 and agreement 1 for the same LoRA factors)."""
    root, original, _, base, task, batches = setups["bert"]
    g = torch.Generator().manual_seed(7)
    heads = {k: v + torch.randn(v.shape, generator=g) * 2.0 for k, v in original.extra_tensors.items()}
    assert heads  # the tiny classifier saves its head
    save_adapter(original.replace(original.modules, extra_tensors=heads), tmp_path / "rehead")
    rehead = load_adapter(tmp_path / "rehead")
    ref = peft_logits(root, "adapter", base, batches)
    want = reference_metrics(ref, peft_logits(tmp_path, "rehead", base, batches), batches, task)
    got = compare_adapters(base, original, rehead, batches, task)
    assert want["kl"] > 1e-3  # the heads make a measurable difference
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-3)
    assert got["agreement"] == pytest.approx(want["agreement"])
    assert got["accuracy"]["after"] == pytest.approx(want["after"])
    # detached: the model is left with the reference's head, and a second comparison sees no switch
    for k, v in original.extra_tensors.items():
        name = k.replace("base_model.model.", "").replace(".modules_to_save.default", "")
        assert torch.equal(base.model.get_parameter(name).detach(), v.to(base.model.get_parameter(name).dtype))
    same = compare_adapters(base, original, original, batches, task)
    assert same["kl"] == pytest.approx(0.0, abs=1e-7)


def test_temperature_softens_the_kl(setups):
    _, original, small, base, task, batches = setups["llama"]
    kl1 = compare_adapters(base, original, small, batches, task)["kl"]
    kl4 = compare_adapters(base, original, small, batches, task, temperature=4.0)["kl"]
    assert 0 < kl4 < kl1


def test_prompt_tokens_are_not_counted(setups):
    _, original, small, base, _, _ = setups["llama"]
    ex = [Example("the movie is", completion=" very good"), Example("a dog", completion=" and a cat too")]
    b = make_batches(ex, base.tokenizer, task="lm", seq_len=24, batch_size=2)
    r = compare_adapters(base, original, small, b, "lm")
    assert r["tokens"] == 2 + 4  # completion words only


def test_reference_cache_skips_the_teacher_on_repeat(setups):
    _, original, small, base, task, batches = setups["llama"]
    layers = attach(base.model, small, teacher=original)
    calls = {"teacher": 0}
    first = next(iter(layers.values()))

    def count(mod: LoraLayer, _args):
        calls["teacher"] += mod.mode == "teacher"

    handle = first.register_forward_pre_hook(count)
    try:
        cache = ReferenceCache()
        a = evaluate(base.model, batches, task, cache=cache)
        assert calls["teacher"] == len(batches)
        b = evaluate(base.model, batches, task, cache=cache)
        assert calls["teacher"] == len(batches)  # served from the cache
        assert a == b
        # other batches at the same positions miss the cache rather than reuse wrong logits
        other = make_batches([Example(t) for t in tiny_sentences(30, seed=99)], base.tokenizer, task=task,
                             seq_len=24, batch_size=8)
        evaluate(base.model, other, task, cache=cache)
        assert calls["teacher"] == 2 * len(batches)
        tiny = ReferenceCache(max_bytes=1)
        evaluate(base.model, batches, task, cache=tiny)
        assert not tiny.entries  # over its size: computed, not kept
    finally:
        handle.remove()
        detach(base.model)


# --------------------------------------------------------------------------- CLI


def write_data(path, n=24, labels=True, seed=3):
    rows = [{"text": t, **({"label": ["neg", "neu", "pos"][i % 3]} if labels else {})}
            for i, t in enumerate(tiny_sentences(n, seed=seed))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_cli_json_and_table(setups, tmp_path, capsys):
    root = setups["bert"][0]
    data = write_data(tmp_path / "test.jsonl")
    # the tiny head has no label names (LABEL_0..2): string labels need the map
    args = ["eval", str(root / "small"), "--base-model", str(root / "base"), "--data", str(data),
            "--label-map", "neg=0,neu=1,pos=2"]
    assert main([*args, "--reference", str(root / "adapter"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["reference"] == "teacher" and r["samples"] == 24
    assert r["params"]["after"] < r["params"]["before"]
    assert r["label_names"] == ["neg", "neu", "pos"]
    assert set(r["accuracy"]) == {"before", "after", "retained"}
    assert main([*args, "--reference", str(root / "adapter")]) == 0
    table = capsys.readouterr().out
    for word in ("accuracy", "retained", "LoRA parameters", "KL(reference", "top-1 agreement"):
        assert word in table
    assert main(args) == 0  # no reference: against the base model alone
    assert "base model" in capsys.readouterr().out


def test_eval_cli_lm_reports_perplexity(setups, tmp_path, capsys):
    root = setups["llama"][0]
    data = tmp_path / "test.txt"
    data.write_text("\n".join(tiny_sentences(10, seed=4)))
    assert main(["eval", str(root / "small"), "--base-model", str(root / "base"), "--data", str(data),
                 "--reference", str(root / "adapter"), "--max-samples", "6", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples"] == 6 and r["perplexity"]["before"] > 1 and r["tokens"] > 0


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", "not found"),
        ("nofield", "no text field found"),
        ("badlabel", "label 5 but the model's head has 3 classes"),
        ("wrongbase", "wrong --base-model"),
        ("temperature", "temperature must be positive"),
    ],
)
def test_eval_cli_user_errors_exit_2(setups, tmp_path, capsys, setup, match):
    root = setups["bert"][0]
    data = write_data(tmp_path / "d.jsonl")
    base = root / "base"
    extra = []
    if setup == "missing":
        data = tmp_path / "nope.jsonl"
    elif setup == "nofield":
        data.write_text('{"score": 1}\n')
    elif setup == "badlabel":
        data.write_text('{"text": "good", "label": 5}\n')
    elif setup == "wrongbase":
        base = setups["llama"][0] / "base"
    else:
        extra = ["--temperature", "0"]
    rc = main(["eval", str(root / "small"), "--base-model", str(base), "--data", str(data),
               "--reference", str(root / "adapter"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err
