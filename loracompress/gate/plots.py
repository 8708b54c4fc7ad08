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

from loracompress.core.outputs import file_mode
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


@dataclass
class ModuleSlot:
    """One module's place on the x axis: its layer group and its type (the path after the layer index)."""

    module: str
    group: str
    kind: str
    index: int  # into the profile's lists


def module_slots(modules: list[str]) -> list[ModuleSlot]:
    """Modules grouped by layer (in layer order; modules outside any numbered layer last, as "other"),
    each layer's modules in one type order (the order types first appear in), so layers line up."""
    kinds: dict[str, int] = {}
    rows = []
    for i, path in enumerate(modules):
        m = _LAYER.search(path)
        layer, kind = (int(m[1]), path[m.end():]) if m else (None, ".".join(path.split(".")[-2:]))
        kinds.setdefault(kind, len(kinds))
        rows.append((layer, kind, i, path))
    rows.sort(key=lambda r: (r[0] is None, r[0] if r[0] is not None else 0, kinds[r[1]], r[2]))
    return [ModuleSlot(path, f"layer {layer}" if layer is not None else "other", kind, i)
            for layer, kind, i, path in rows]


def rank_figure(profiles: list[RankProfile]) -> Any:
    """The figure: per adapter, one labelled pair of bars per module (rank before, rank after), modules
    grouped by layer, the legend outside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    widest = max(len(p.modules) for p in profiles)
    fig, axes = plt.subplots(len(profiles), 1, figsize=(max(8.0, 0.3 * widest + 3.0), 4.2 * len(profiles)),
                             squeeze=False)
    for ax, prof in zip(axes[:, 0], profiles):
        slots = module_slots(prof.modules)
        x = list(range(len(slots)))
        after = [prof.after[s.index] for s in slots]
        if prof.before is not None:
            before = [prof.before[s.index] for s in slots]
            ax.bar([i - 0.2 for i in x], before, width=0.4, color="0.75", label="rank before")
            bars = ax.bar([i + 0.2 for i in x], after, width=0.4, color="tab:blue", label="rank after")
        else:
            bars = ax.bar(x, after, width=0.6, color="tab:blue", label="rank")
        ax.bar_label(bars, fontsize=5, padding=1)
        ax.set_xticks(x, [s.kind for s in slots], rotation=90, fontsize=6)
        ax.set_xlim(-0.6, len(x) - 0.4)
        top = max([*after, *(prof.before or [])], default=1)
        ax.set_ylim(0, top * 1.18 + 0.5)
        start = 0
        for i in range(1, len(slots) + 1):  # a rule between layers, the layer's name above its modules
            if i == len(slots) or slots[i].group != slots[start].group:
                if i < len(slots):
                    ax.axvline(i - 0.5, color="0.6", linewidth=0.6, zorder=0)
                ax.text((start + i - 1) / 2, 1.0, slots[start].group, transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=7)
                start = i
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("rank")
        ax.set_xlabel("module type, grouped by layer", fontsize=8)
        kept, total = sum(prof.after), sum(prof.before) if prof.before else None
        ax.set_title(prof.name + (f"  (sum of ranks {kept} of {total})" if total else ""), fontsize=9, pad=14)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


#: The PNG ``Software`` text chunk that marks a plot as ours, so that ``--force`` replaces only those.
PLOT_SOFTWARE = "loracompress report --plot"


def written_by_us(path: Path) -> bool:
    """Whether ``path`` is a PNG whose ``Software`` chunk is :data:`PLOT_SOFTWARE`."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get("Software") == PLOT_SOFTWARE
    except Exception:  # noqa: BLE001 - unreadable, not an image, no Pillow: not ours
        return False


def plot_ranks(profiles: list[RankProfile], path: str | Path, force: bool = False) -> Path:
    """Write :func:`rank_figure` as a PNG at ``path`` (atomically: never a half-written file).

    An existing file is replaced only with ``force`` and only when it is a plot this function wrote.
    """
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
    if out.exists():
        if not force:
            raise LoraCompressError(f"--plot {out} already exists; pass --force to replace it, or choose another name")
        if not out.is_file() or not written_by_us(out):
            raise LoraCompressError(f"--plot {out} exists and was not written by loracompress; choose another name")
    fig = rank_figure(profiles)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name[:96]}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        os.chmod(tmp, file_mode())  # mkstemp's 0600, else: the PNG would be readable by its owner only
        fig.savefig(tmp, dpi=130, format="png", metadata={"Software": PLOT_SOFTWARE})
        os.replace(tmp, out)  # never a half-written PNG under the final name
    except OSError as err:  # a read-only or pseudo file system, no permission, a full disk
        raise LoraCompressError(f"--plot {out}: cannot write it ({err.strerror or err}); choose another path") from None
    finally:
        plt.close(fig)
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    return out
