"""The training-free cut as a registered method, so that ``--method svd`` is looked up, checked and listed
like every other: exact SVD of each module's ``B@A`` and one global allocation (:mod:`loracompress.cuts.svd`),
or with ``--data`` the activation-aware cut (:mod:`loracompress.cuts.activation`), whose input-moment
damping is this method's one setting. It never trains: the pipelines see ``trains = False`` and run the cut
instead of the engine, so none of the hooks is ever called."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loracompress.calibration.methods.base import Method, MethodSettings
from loracompress.cuts.activation import DEFAULT_DAMPING
from loracompress.errors import LoraCompressError


@dataclass
class SvdSettings(MethodSettings):
    """damping: added to the input second moments before whitening, relative to their mean (--data only)."""

    damping: float = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise LoraCompressError(f"-O damping={d!r}: give a finite number >= 0, e.g. -O damping=0.01")


class Svd(Method):
    """The training-free cut (see the module docstring); not run by the engine."""

    name = "svd"
    summary = "training-free: exact SVD of each module's B@A and one global allocation; activation-aware with --data"
    Settings = SvdSettings
    trains = False
    needs_data = False
    settings_need_data = "the activation-aware cut"

    def finalize(self) -> dict[str, int]:
        raise LoraCompressError("svd is a training-free cut: there is no calibration run to finalize")
