"""Helpers of benchmarks/quality.py whose choices shape the published baselines."""

from __future__ import annotations

import sys
from pathlib import Path

from loracompress.core.adapter import load_adapter
from tests.tiny import make_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from quality import FixedRanks, module_type, rank1_subset, uniform_rank  # noqa: E402


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
