"""``loracompress truncate``: search-free cuts of DyLoRA-ordered adapters; SVD order otherwise."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from loracompress.core.adapter import NESTED_VALUES_KEY as VALUES_KEY
from loracompress.core.adapter import ORDER_KEY, SAFETENSORS_NAME
from loracompress.core.budget import Budget
from loracompress.core.reader import load_adapter
from loracompress.core.records import COMPRESSION_REPORT as REPORT_NAME
from loracompress.core.writer import save_adapter
from loracompress.cuts.nested import truncate_adapter
from loracompress.cuts.svd import compress_svd, decompose, truncated_adapter
from loracompress.pipelines.truncate import SUMMARY_NAME
from loracompress_cli.app import main
from tests.calibration.method_loop import nothing_else_fits, peft_mismatch
from tests.tiny import make_adapter, save_tiny_base, tiny_sentences


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real PEFT checkpoint, its base model and a DyLoRA-ordered copy of it (SVD order, σ² recorded)."""
    root = tmp_path_factory.mktemp("trunc")
    src, base = make_adapter("llama", root / "ckpt", r=8)
    original = load_adapter(src)
    svds = decompose(original)
    nested = truncated_adapter(original, svds, original.ranks)
    values = {p: [float(x) for x in s.energy] for p, s in svds.items()}
    nested = nested.replace(nested.modules, metadata={ORDER_KEY: "dylora", VALUES_KEY: json.dumps(values)})
    save_adapter(nested, root / "dyl")
    return {"root": root, "src": src, "dyl": root / "dyl", "base": base}


def test_dylora_cut_keeps_the_leading_components_and_meets_the_budget(ckpt, tmp_path):
    assert main(["truncate", str(ckpt["dyl"]), "--budget", "0.25", "-o", str(tmp_path / "q")]) == 0
    nested, cut = load_adapter(ckpt["dyl"]), load_adapter(tmp_path / "q")
    target = Budget.parse("0.25").resolve([m.cost for m in nested.modules.values()], list(nested.ranks.values()), 4)
    ranks = {p: cut.modules[p].rank if p in cut.modules else 0 for p in nested.modules}
    assert cut.num_params <= target and nothing_else_fits(nested, ranks, target)
    for p, m in cut.modules.items():  # the same components, not a re-factorisation
        torch.testing.assert_close(m.A, nested.modules[p].A[: m.rank])
        torch.testing.assert_close(m.B, nested.modules[p].B[:, : m.rank])
    assert cut.metadata[ORDER_KEY] == "dylora"
    assert {p: len(v) for p, v in json.loads(cut.metadata[VALUES_KEY]).items()} == {p: m.rank for p, m in cut.modules.items()}
    assert peft_mismatch(cut, tmp_path / "q", ckpt["base"]) < 1e-5
    report = json.loads((tmp_path / "q" / REPORT_NAME).read_text())
    assert report["method"] == "truncate" and report["settings"]["order"] == "dylora"
    assert report["budget"]["target_params"] == target and report["params_after"] == cut.num_params


def test_a_cut_of_a_cut_is_the_same_cut(ckpt):
    nested = load_adapter(ckpt["dyl"])
    eighth = Budget("params", nested.num_params // 8)
    once = truncate_adapter(nested, eighth)
    twice = truncate_adapter(truncate_adapter(nested, Budget.parse("0.5")).adapter, eighth)
    assert once.ranks == twice.ranks


def test_several_budgets_at_once(ckpt, tmp_path):
    out = tmp_path / "cuts"
    assert main(["truncate", str(ckpt["dyl"]), "--budgets", "0.5,0.25,0.125", "-o", str(out)]) == 0
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert [c["folder"] for c in summary["cuts"]] == ["0.5", "0.25", "0.125"]
    sizes = []
    for name in ("0.5", "0.25", "0.125"):
        cut = load_adapter(out / name)
        assert (out / name / REPORT_NAME).is_file() and (out / name / "README.md").is_file()
        assert peft_mismatch(cut, out / name, ckpt["base"]) < 1e-5
        sizes.append(cut.num_params)
    total = load_adapter(ckpt["dyl"]).num_params
    assert sizes == sorted(sizes, reverse=True) and all(s <= f * total for s, f in zip(sizes, (0.5, 0.25, 0.125)))
    assert "| `0.125` |" in (out / "README.md").read_text()


def test_an_adapter_that_is_not_dylora_ordered_gets_the_svd_cut_with_a_warning(ckpt, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="loracompress.pipelines.truncate"):
        assert main(["truncate", str(ckpt["src"]), "--budget", "0.25", "-o", str(tmp_path / "s")]) == 0
    assert "not DyLoRA-ordered" in caplog.text
    cut = load_adapter(tmp_path / "s")
    svd = compress_svd(load_adapter(ckpt["src"]), Budget.parse("0.25")).adapter
    assert cut.ranks == svd.ranks and cut.metadata[ORDER_KEY] == "svd"
    for p, m in svd.modules.items():
        torch.testing.assert_close(cut.modules[p].delta(), m.delta(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args", [[], ["--budget", "0.5", "--budgets", "0.25"], ["--budgets", "0.5,0.5"],
                                  ["--budgets", "0.5,3"], ["--budget", "2M"]])
def test_user_errors_exit_2_and_write_nothing(ckpt, tmp_path, args, capsys):
    out = tmp_path / "never"
    assert main(["truncate", str(ckpt["dyl"]), *args, "-o", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_existing_output_needs_force(ckpt, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["truncate", str(ckpt["dyl"]), "--budget", "0.5", "-o", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only what loracompress wrote: a folder of the user's stays as it is
    assert main(["truncate", str(ckpt["dyl"]), "--budget", "0.5", "-o", str(out), "--force"]) == 2
    assert (out / "keep.txt").read_text() == "mine" and not (out / SAFETENSORS_NAME).exists()
    (out / "keep.txt").unlink()
    assert main(["truncate", str(ckpt["dyl"]), "--budgets", "0.5,0.25", "-o", str(out), "--force"]) == 0
    assert (out / "truncate_report.json").is_file()
    assert main(["truncate", str(ckpt["dyl"]), "--budget", "0.5", "-o", str(out), "--force"]) == 0
    assert (out / SAFETENSORS_NAME).is_file() and not (out / "truncate_report.json").exists()


def test_eval_data_reports_quality_at_each_cut(ckpt, tmp_path):
    base_dir = save_tiny_base("llama", tmp_path / "base")
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in tiny_sentences(24, seed=5)))
    out = tmp_path / "q"
    assert main(["truncate", str(ckpt["dyl"]), "--budgets", "1.0,0.125", "--eval-data", str(data),
                 "--base-model", str(base_dir), "--device", "cpu", "--seq-len", "16", "-o", str(out)]) == 0
    full, eighth = (json.loads((out / n / REPORT_NAME).read_text())["quality"] for n in ("1.0", "0.125"))
    assert full["kl"] < 1e-6 and full["agreement"] == 1.0  # the whole adapter: the same function
    assert eighth["kl"] > 1e-4 and "perplexity" in eighth
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert [c["quality"]["kl"] for c in summary["cuts"]] == [full["kl"], eighth["kl"]]


def test_help_lists_truncate():
    from typer.testing import CliRunner

    from loracompress_cli.app import app

    result = CliRunner().invoke(app, ["truncate", "--help"])
    assert result.exit_code == 0 and "--budgets" in result.output


