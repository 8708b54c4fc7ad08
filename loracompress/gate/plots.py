"""Where the budget went: per-module ranks before and after compression, as one PNG.

Used by ``loracompress report --plot``; matplotlib is imported only here (the ``plot`` extra).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracompress.errors import LoraCompressError

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class RankProfile:
    """One adapter's per-module ranks in model order (``before`` is None without a compression report)."""

    name: str
    modules: list[str]
    after: list[int]
    before: list[int] | None = None


def rank_profile(name: str, report: dict[str, Any] | None, ranks: dict[str, int]) -> RankProfile:
    """From ``compression_report.json`` when there is one (every module, pruned ones at 0), else the adapter's ranks."""
    if report and isinstance(report.get("modules"), list) and report["modules"]:
        rows = report["modules"]
        return RankProfile(name, [r["module"] for r in rows], [int(r["rank_after"]) for r in rows],
                           [int(r["rank_before"]) for r in rows])
    return RankProfile(name, list(ranks), list(ranks.values()))


def plot_ranks(profiles: list[RankProfile], path: str | Path) -> Path:
    """Write one panel per adapter: bars = ranks kept, step line = ranks before; layer boundaries marked."""
    try:
        import matplotlib
    except ImportError:
        raise LoraCompressError("--plot needs matplotlib: pip install matplotlib (or loracompress[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    if out.suffix.lower() != ".png":
        raise LoraCompressError(f"--plot {out}: write a .png file name")
    if not out.parent.is_dir():
        raise LoraCompressError(f"--plot {out}: folder {out.parent} does not exist; create it first")
    fig, axes = plt.subplots(len(profiles), 1, figsize=(10, 2.6 * len(profiles)), squeeze=False)
    for ax, prof in zip(axes[:, 0], profiles):
        x = list(range(len(prof.modules)))
        ax.bar(x, prof.after, width=1.0, color="tab:blue", label="rank kept" if prof.before else "rank")
        if prof.before is not None:
            ax.step(x, prof.before, where="mid", color="0.4", linewidth=1, label="rank before")
        layers = [int(m[1]) if (m := _LAYER.search(p)) else -1 for p in prof.modules]
        starts = [i for i in range(1, len(layers)) if layers[i] != layers[i - 1]]
        for i in starts:
            ax.axvline(i - 0.5, color="0.85", linewidth=0.6, zorder=0)
        ticks = [0, *starts]
        ax.set_xticks(ticks, [str(layers[i]) if layers[i] >= 0 else "" for i in ticks], fontsize=7)
        ax.set_xlim(-0.5, len(x) - 0.5)
        ax.set_xlabel("module (model order; ticks: layer index)")
        ax.set_ylabel("rank")
        kept, total = sum(prof.after), sum(prof.before) if prof.before else None
        ax.set_title(prof.name + (f"  (sum of ranks {kept} of {total})" if total else ""), fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, out)  # never a half-written PNG under the final name
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
