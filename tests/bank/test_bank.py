"""``loracompress bank`` / ``bank-add`` through the real CLI, against stock PEFT where a number is at stake."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from loracompress.bank.build import assign_clusters, fit_bank, project_cores
from loracompress.bank.io import read_bank
from loracompress.core.budget import Budget
from loracompress.core.reader import load_adapter
from loracompress_cli.app import main
from tests.bank.helpers import adapters_of_one_base, grouped_adapters
from tests.tiny import sample_inputs


def _logits(base: torch.nn.Module, folder: Path, kind: str) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return model(**sample_inputs(kind)).logits


def _strict(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize(("kind", "kw"), [("llama", {"rank_pattern": {"q_proj": 2}, "use_rslora": True}), ("bert", {}),
                                          ("gpt2", {})])
def test_a_budget_that_keeps_every_rank_reproduces_each_original_in_peft(tmp_path, kind, kw):
    sources, base = adapters_of_one_base(tmp_path, 3, kind=kind, **kw)
    out = tmp_path / "bank"
    assert main(["bank", *map(str, sources), "--budget", "100M", "-o", str(out)]) == 0
    manifest = _strict(out / "bank.json")
    assert max(a["relative_error"] for a in manifest["adapters"]) < 1e-6
    for src in sources:
        folder = out / "adapters" / src.name
        ours, theirs = _logits(base, folder, kind), _logits(base, src, kind)
        # fp32 storage: the deltas agree to ~1e-7; the tiny random model amplifies that to ~1e-5 of its logits, as
        # much as `prune --budget 1.0` (an exact refactorisation) shows on the same adapters
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
        if kind == "bert":  # the classifier head rides along per adapter, unchanged
            assert set(load_adapter(folder).extra_tensors) == set(load_adapter(src).extra_tensors)
            assert all(torch.equal(load_adapter(folder).extra_tensors[k], t) for k, t in load_adapter(src).extra_tensors.items())


def test_expanded_folders_are_the_bank_and_peft_reads_them(tmp_path):
    """B = U (shared), A = core·Vᵀ; PEFT's delta of the folder is U Σ Vᵀ."""
    from tests.tiny import peft_deltas

    sources, base = adapters_of_one_base(tmp_path, 3)
    out = tmp_path / "bank"
    assert main(["bank", *map(str, sources), "--budget", "0.3", "--clusters", "1", "-o", str(out)]) == 0
    bf = read_bank(out)
    for i, src in enumerate(sources):
        folder = out / "adapters" / src.name
        deltas = peft_deltas(folder, base)
        for path, (U, V) in bf.bank.bases[0].items():
            if U.shape[1] == 0:  # a module no rank was worth its price: dropped, as prune drops one
                assert path not in deltas
                continue
            want = U.double() @ bf.bank.cores[i][path].double() @ V.double().T
            assert torch.allclose(deltas[path].double(), want, atol=1e-6)
            assert torch.equal(load_adapter(folder).modules[path].B, U)  # the shared basis itself


def test_error_decreases_with_budget_and_the_budget_is_met(tmp_path):
    sources, _ = adapters_of_one_base(tmp_path, 3)
    adapters = [load_adapter(s) for s in sources]
    original = sum(a.num_params for a in adapters)
    errors = []
    for text in ("0.1", "0.2", "0.4", "0.8"):
        out = tmp_path / f"bank{text}"
        assert main(["bank", *map(str, sources), "--budget", text, "-o", str(out)]) == 0
        manifest = _strict(out / "bank.json")
        target = math.floor(float(text) * original)
        assert manifest["budget"]["target_params"] == target
        stored = sum(t.numel() for k, t in _tensors(out).items() if not k.startswith("heads."))
        assert stored == manifest["params"]["total"] <= target
        assert manifest["params"]["total"] >= 0.97 * target  # the budget is spent, not wasted
        errors.append(sum(a["relative_error"] ** 2 for a in manifest["adapters"]))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_params_and_bytes_budgets_count_the_whole_bank(tmp_path):
    sources, _ = adapters_of_one_base(tmp_path, 2)
    assert main(["bank", *map(str, sources), "--budget", "6k", "-o", str(tmp_path / "p")]) == 0
    assert 5800 <= _strict(tmp_path / "p" / "bank.json")["params"]["total"] <= 6000
    assert main(["bank", *map(str, sources), "--budget", "24kB", "--dtype", "fp16", "-o", str(tmp_path / "b")]) == 0
    assert 11_500 <= _strict(tmp_path / "b" / "bank.json")["params"]["total"] <= 12_000  # 2 bytes each
    assert {t.dtype for t in _tensors(tmp_path / "b").values()} == {torch.float16}


def test_a_rank_budget_keeps_that_rank_in_every_module(tmp_path):
    sources, _ = adapters_of_one_base(tmp_path, 2)
    assert main(["bank", *map(str, sources), "--budget", "rank=3", "--refine", "0", "-o", str(tmp_path / "r")]) == 0
    manifest = _strict(tmp_path / "r" / "bank.json")
    assert manifest["clusters"]["count"] == 1 and {m["rank"][0] for m in manifest["modules"].values()} == {3}
    assert load_adapter(tmp_path / "r" / "adapters" / sources[0].name).ranks == dict.fromkeys(manifest["modules"], 3)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "bank.safetensors"))


def test_refinement_never_loses_energy(tmp_path):
    sources, _ = adapters_of_one_base(tmp_path, 3)
    mods = [load_adapter(s).modules for s in sources]
    original = sum(sum(m.num_params for m in a.values()) for a in mods)
    plain = fit_bank(mods, Budget.parse("0.1"), original, 4, clusters=1, iterations=0)
    refined = fit_bank(mods, Budget.parse("0.1"), original, 4, clusters=1, iterations=3)
    assert sum(e * e for e in refined.errors) < sum(e * e for e in plain.errors)


def test_clusters_separate_adapters_that_share_no_subspace(tmp_path):
    groups = [0, 1, 0, 1]
    sources, base = grouped_adapters(tmp_path, groups)
    out = tmp_path / "bank"
    # 2 clusters at R=4 hold every adapter exactly at ~0.54 of the originals; one shared basis needs R=8
    assert main(["bank", *map(str, sources), "--budget", "0.56", "-o", str(out)]) == 0
    manifest = _strict(out / "bank.json")
    assert [a["cluster"] for a in manifest["adapters"]] == groups
    assert max(a["relative_error"] for a in manifest["adapters"]) < 1e-6
    search = {s["k"]: s["mean_sq_error"] for s in manifest["clusters"]["search"]}
    assert search[1] > 0.01 and search[2] < 1e-10
    assert main(["bank", *map(str, sources), "--budget", "0.56", "--clusters", "1", "-o", str(tmp_path / "one")]) == 0
    forced = _strict(tmp_path / "one" / "bank.json")
    assert forced["clusters"]["count"] == 1 and min(a["relative_error"] for a in forced["adapters"]) > 0.05


def test_adding_gives_the_cores_of_a_refit_with_frozen_bases(tmp_path):
    groups = [0, 1, 0, 1]
    sources, base = grouped_adapters(tmp_path, groups)
    first, new = sources[:3], sources[3]
    assert main(["bank", *map(str, first), "--budget", "0.8", "-o", str(tmp_path / "bank")]) == 0
    assert main(["bank-add", str(tmp_path / "bank"), str(new), "-o", str(tmp_path / "added")]) == 0
    before, after = read_bank(tmp_path / "bank"), read_bank(tmp_path / "added")
    mods = [load_adapter(s).modules for s in sources]
    bases = [{p: (U.double(), V.double()) for p, (U, V) in b.items()} for b in before.bank.bases]
    clusters = assign_clusters(mods, bases)  # the full refit with the bases frozen: every adapter anew
    assert clusters == after.bank.clusters == before.bank.clusters + [before.bank.clusters[1]]
    refit = project_cores(mods, bases, clusters)
    for i in range(4):
        for path, core in refit[i].items():
            assert torch.allclose(after.bank.cores[i][path].double(), core, atol=1e-6, rtol=1e-5), (i, path)
    for i in range(3):  # the old cores are kept as they were
        assert all(torch.equal(after.bank.cores[i][p], before.bank.cores[i][p]) for p in before.bank.cores[i])
    assert all(torch.equal(after.bank.bases[c][p][0], before.bank.bases[c][p][0])
               for c in range(len(before.bank.bases)) for p in before.bank.bases[c])
    manifest = _strict(tmp_path / "added" / "bank.json")
    assert manifest["adapters"][3]["added"] and manifest["adapters"][3]["relative_error"] < 1e-6
    ours, theirs = _logits(base, tmp_path / "added" / "adapters" / new.name, "llama"), _logits(base, new, "llama")
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_refit_on_add_equals_a_bank_of_all(tmp_path):
    sources, _ = adapters_of_one_base(tmp_path, 3)
    assert main(["bank", *map(str, sources[:2]), "--budget", "0.3", "-o", str(tmp_path / "bank")]) == 0
    assert main(["bank-add", str(tmp_path / "bank"), str(sources[2]), "--refit", "-o", str(tmp_path / "refit")]) == 0
    assert main(["bank", *map(str, sources), "--budget", "0.3", "-o", str(tmp_path / "all")]) == 0
    a, b = _tensors(tmp_path / "refit"), _tensors(tmp_path / "all")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not _strict(tmp_path / "refit" / "bank.json")["adapters"][2]["added"]
