"""``report --plot``: one labelled bar per module, grouped by layer and type, before against after,
the legend outside the data (issue 13, item 10: equal neighbouring ranks used to merge into one block
and module names never appeared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loracompress.core.budget import Budget
from loracompress.core.reader import load_adapter
from loracompress.cuts.svd import compress_svd
from loracompress.gate.plots import RankProfile, module_slots, plot_ranks, rank_figure

pytest.importorskip("matplotlib")
REPO = Path(__file__).resolve().parents[2]


def test_modules_are_grouped_by_layer_in_one_type_order() -> None:
    modules = ["m.layers.1.mlp.up", "m.layers.0.attn.q", "head.dense", "m.layers.0.mlp.up", "m.layers.1.attn.q"]
    slots = module_slots(modules)
    assert [(s.group, s.kind) for s in slots] == [
        ("layer 0", "mlp.up"), ("layer 0", "attn.q"), ("layer 1", "mlp.up"), ("layer 1", "attn.q"),
        ("other", "head.dense")]  # types in the order they first appear (mlp.up, in layer 1), the same in every layer
    assert [modules[s.index] for s in slots] == [s.module for s in slots]


def test_the_sample_plot_has_a_labelled_bar_pair_per_module_and_the_legend_outside(tmp_path: Path) -> None:
    original = load_adapter(REPO / "samples" / "minilm-rt" / "adapter")
    small = compress_svd(original, Budget.parse("0.125")).adapter
    names = list(original.modules)
    prof = RankProfile("small", names, [small.modules[n].rank if n in small.modules else 0 for n in names],
                       [original.modules[n].rank for n in names])
    fig = rank_figure([prof])
    ax = fig.axes[0]
    bars = ax.patches
    assert len(bars) == 2 * len(names)  # before and after for every module, equal ranks included
    lefts = [round(b.get_x(), 3) for b in bars]
    assert len(set(lefts)) == len(lefts), "two bars share a place: neighbours would merge into one block"
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels.count("attention.self.query") == 6 and "pooler.dense" in labels
    texts = {t.get_text() for t in ax.texts}
    assert {f"layer {i}" for i in range(6)} | {"other"} <= texts
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, frame = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= frame.x1, "the legend covers the data"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["rank before", "rank after"]

    out = plot_ranks([prof], tmp_path / "ranks.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["ranks.png"]


def test_plot_never_overwrites_a_file_it_did_not_write(tmp_path: Path, capsys) -> None:
    """Regression: ``report --plot X.png`` replaced whatever X.png was. Now an existing file needs
    ``--force``, and ``--force`` replaces only a plot loracompress wrote."""
    from loracompress_cli.app import main

    adapter = str(REPO / "samples" / "minilm-rt" / "adapter")
    theirs = tmp_path / "figure.png"
    theirs.write_bytes(b"\x89PNG\r\n\x1a\n someone's own figure")
    for extra in ([], ["--force"]):
        capsys.readouterr()
        assert main(["report", adapter, "--plot", str(theirs), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another name" in err, err
        assert theirs.read_bytes() == b"\x89PNG\r\n\x1a\n someone's own figure"
    ours = tmp_path / "ranks.png"
    assert main(["report", adapter, "--plot", str(ours)]) == 0
    first = ours.read_bytes()
    assert main(["report", adapter, "--plot", str(ours)]) == 2  # ours, but not without --force
    assert main(["report", adapter, "--plot", str(ours), "--force"]) == 0
    assert ours.read_bytes()[:8] == first[:8] and sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "ranks.png"]
