"""Helpers of benchmarks/quality.py whose choices shape the published baselines."""

from __future__ import annotations

import sys
from pathlib import Path

from loracompress.core.reader import load_adapter
from tests.tiny import make_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from quality import FixedRanks, module_type, rank1_subset, scratch_config, uniform_rank  # noqa: E402


def test_under_rank_one_everywhere_the_baseline_keeps_whole_cheapest_types(tmp_path):
    # tiny llama, 3 layers: k/v cost 72 per module, q/o 96, gate/up/down 128 (rank 1)
    adapter = load_adapter(make_adapter("llama", tmp_path / "a")[0])
    rank1 = sum(m.cost for m in adapter.modules.values())
    assert uniform_rank(adapter, rank1 - 1) == 0  # the case the subset is for
    types = {module_type(p) for p in adapter.modules}
    assert len(types) == 7 and all(".{i}." in t for t in types)

    paths = rank1_subset(adapter, rank1 // 2)
    chosen = {module_type(p) for p in paths}
    assert {t.rsplit(".", 1)[1] for t in chosen} == {"k_proj", "v_proj", "q_proj", "o_proj"}  # the attention
    assert all(module_type(p) in chosen for p in paths) and len(paths) == 4 * 3  # whole types, every layer
    spent = sum(adapter.modules[p].cost for p in paths)
    assert spent <= rank1 // 2 < spent + 3 * 128  # the next type (an MLP one) would not fit

    assert rank1_subset(adapter, 3 * 72 - 1) == []  # not even one whole type
    assert len(rank1_subset(adapter, rank1)) == len(adapter.modules)


def test_the_scratch_baseline_method_takes_its_rank_as_a_setting():
    """Regression: the scratch LoRA's FixedRanks(rank=r) crashed once methods declared their Settings
    (``MethodSettings.__init__() got an unexpected keyword argument 'rank'``): no scratch row could run."""
    method = FixedRanks(rank=2)
    assert method.settings == {"rank": 2} and method.name == "scratch"


def test_the_scratch_baseline_trains_on_the_calibration_schedule_of_its_data():
    """Regression: the scratch LoRA took ``steps`` from the command line only, so on label-free data (whose
    schedule is sized in steps by calibrate.data_settings) it fell back to the engine's labelled 3 epochs
    and ran half the methods' steps, on the texts as they are instead of fresh views."""
    import argparse
    from types import SimpleNamespace

    from loracompress.pipelines.calibrate import LABEL_FREE, LABEL_FREE_MAX_STEPS

    args = argparse.Namespace(scratch_lr=None, lr=None, steps=None, seed=0, kd_weight=1.0, task_weight=1.0, device="cpu")
    free = scratch_config(SimpleNamespace(task="cls", labelled=False, train=[{}] * 50), args)
    assert free.steps == min(LABEL_FREE_MAX_STEPS, 6 * 50) and free.lr == LABEL_FREE["lr"]
    assert free.token_dropout == LABEL_FREE["token_dropout"] > 0
    labelled = scratch_config(SimpleNamespace(task="cls", labelled=True, train=[{}] * 50), args)
    assert labelled.steps is None and labelled.token_dropout == 0.0 and labelled.lr == 1e-3
    told = scratch_config(SimpleNamespace(task="cls", labelled=False, train=[{}] * 50),
                          argparse.Namespace(**{**vars(args), "steps": 7}))
    assert told.steps == 7


def test_the_gain_kept_is_the_share_of_the_adapters_improvement_over_the_bare_base():
    from quality import gain_kept

    assert gain_kept(43.53, 43.53, 58.52) == 1.0 and gain_kept(58.52, 43.53, 58.52) == 0.0
    assert abs(gain_kept(43.69, 43.53, 58.52) - 0.9893) < 1e-4  # 99.6% of the perplexity, 98.9% of the gain
    assert abs(gain_kept(0.85, 0.90, 0.80) - 0.5) < 1e-12  # accuracy: the same form


def test_the_bare_base_is_scored_with_no_lora_at_all(tmp_path):
    """Scorer.bare_base: the perplexity of the base model alone (the same number as the model never wrapped)."""
    import json
    import math

    import torch
    import torch.nn.functional as F
    from quality import Scorer

    from loracompress.core.reader import load_adapter
    from loracompress.pipelines.evaluate import EvalOptions
    from loracompress.pipelines.inputs import load_base, read_batches
    from tests.tiny import make_adapter, save_tiny_base, tiny_sentences

    adapter_dir, _ = make_adapter("llama", tmp_path / "adapter")
    save_tiny_base("llama", tmp_path / "base")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_sentences(6)))
    original = load_adapter(adapter_dir)
    opts = EvalOptions(data=str(tmp_path / "t.jsonl"), base_model=str(tmp_path / "base"), seq_len=16, batch_size=3)
    base = load_base(original, opts)
    _, batches = read_batches(base, tmp_path / "t.jsonl", opts)
    nll = tokens = 0.0
    with torch.no_grad():
        for b in batches:
            logits = base.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            target = b["labels"][:, 1:]
            keep = target != -100
            nll += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            tokens += int(keep.sum())
    score = Scorer(base, original, batches, "lm", "perplexity")
    assert abs(score.bare_base() - math.exp(nll / tokens)) < 1e-4 * math.exp(nll / tokens)
    assert not any(type(m).__name__ == "LoraLayer" for m in base.model.modules())  # detached again
