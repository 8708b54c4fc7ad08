"""The calibration-method contract: plain hooks that the engine calls, in this order.

::

    method.setup(ctx)                      # once, after the LoRA layers are attached
    for step in range(ctx.total_steps):
        method.before_forward(step)        # e.g. DyLoRA samples a rank and sets masks
        loss = ...; loss.backward()
        method.after_backward(step)        # gradients are available (importance scores)
        optimizer.step(); optimizer.zero_grad()
        method.after_step(step)            # masks / pruning / rank growth / rewinding
    ranks = method.finalize()              # per-module ranks meeting the budget exactly
    meta = method.metadata()               # str -> str, merged into the output's safetensors metadata

and, for checkpoints and the learning-rate schedule, ``state_dict()`` / ``load_state_dict()`` (state
kept across steps, saved so that resuming is exact) and ``schedule_restarts()`` (steps where the
warm-up and decay start again). Every hook has a no-op default here; only ``finalize`` is required.

Methods never run their own loop and never do I/O. Allocation state (scores, EMAs, masks to
apply) lives in the method, not in the layers; a method changes a layer only through its
``mask`` and, where the algorithm needs it, its ``A``/``B`` values, and the engine's state only
through the callbacks in :class:`CalibContext`. ``finalize`` must meet ``ctx.target_params``
through :func:`loracompress.core.budget.allocate`, so every method meets its budget the same way.

A method is one file: a :class:`Method` subclass with a ``name``, a one-line ``summary`` and a
``Settings`` dataclass (validated in ``__post_init__``) registers itself when its module is imported
(the store is here, beside the class; :mod:`loracompress.calibration.methods.registry` imports every
module of this package and looks names up), so the CLI's ``--method`` help and the methods table in
docs/methods.md list it without further edits. A user can drive these hooks from their own training loop.

A method also declares what the pipelines need to know about it, so that they ask the class and never
the name: :attr:`Method.trains` (a calibration fine-tune, or a training-free cut such as ``svd``),
:attr:`Method.needs_data`, :attr:`Method.nested` (every leading cut of its output works, DyLoRA's order)
and, from those, :meth:`Method.keeps_best` (whether ``--keep-best`` may replace its output by a cut).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from loracompress.runtime.layers import LoraLayer


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _nothing() -> None:
    return None


@dataclass
class CalibContext:
    """What a method may know about the run, and the two things it may ask of the engine."""

    layers: dict[str, LoraLayer]  # path -> layer, in model order
    target_params: int  # the budget, in parameters (one rank of a layer costs in + out)
    total_steps: int
    #: for inspection only (e.g. the current learning rate): change its state through reset_optimizer
    optimizer: torch.optim.Optimizer | None = None
    seed: int = 0
    #: path -> depth index (0 = first block), for depth-aware methods; -1 when unknown
    depth: dict[str, int] = field(default_factory=dict)
    num_layers: int = 1  # number of transformer blocks
    #: the mean of a tensor over all processes (identity in one process): every decision a method
    #: takes from statistics must be the same on every process of a distributed run
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] = _identity
    #: forget the optimizer's moments (e.g. LoRPA's rewound ticket retrains from fresh ones)
    reset_optimizer: Callable[[], None] = _nothing

    def cost(self, path: str) -> int:
        layer = self.layers[path]
        return int(layer.A.shape[1] + layer.B.shape[0])


@dataclass
class MethodSettings:
    """A method's ``-O`` settings. Subclasses add fields with defaults and check them in ``__post_init__``
    (raising :class:`~loracompress.errors.LoraCompressError` with the fix)."""


#: method name -> class; filled by :func:`register` (every named subclass registers itself)
REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Make ``cls`` available as ``--method cls.name`` (usable as a class decorator)."""
    name = cls.name.lower()
    if not name:
        raise ValueError(f"{cls.__name__}: a method needs a name")
    REGISTRY[name] = cls
    return cls


class Method:
    """Base class: every hook is a no-op except ``finalize``."""

    #: the ``--method`` name; a subclass that sets it is registered (see :func:`register`)
    name: ClassVar[str] = ""
    #: one line for ``--help`` and docs/methods.md
    summary: ClassVar[str] = ""
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    #: a calibration fine-tune that the engine runs; False: a training-free cut (no hook is ever called)
    trains: ClassVar[bool] = True
    #: needs calibration data (``--data``) to run at all
    needs_data: ClassVar[bool] = True
    #: what its settings tune when they only mean something with ``--data`` (``svd``'s ``damping`` tunes
    #: "the activation-aware cut"); empty: they apply with or without data
    settings_need_data: ClassVar[str] = ""
    #: its output is nested: every leading cut of each module works (DyLoRA), so ``truncate`` can cut it
    #: without data. ``--keep-best`` never replaces such an output by a cut, which would lose the order.
    nested: ClassVar[bool] = False

    @classmethod
    def keeps_best(cls) -> bool:
        """Whether ``--keep-best`` compares this method's output with the training-free cuts of its budget
        (and so holds out enough data to tell them apart): a trained, non-nested output."""
        return cls.trains and not cls.nested

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register(cls)

    def __init__(self, settings: MethodSettings | None = None, **values: Any) -> None:
        if settings is not None and values:
            raise TypeError("give a Settings object or keyword settings, not both")
        self.config = settings if settings is not None else self.Settings(**values)
        #: the settings as a plain dict (what the report records)
        self.settings: dict[str, Any] = asdict(self.config)
        self.ctx: CalibContext | None = None

    @property
    def context(self) -> CalibContext:
        """The run's context, for the hooks after :meth:`setup`: a method used before it is a programming error,
        said by one message here rather than a ``None`` failing somewhere inside a hook."""
        if self.ctx is None:
            raise RuntimeError(f"{self.name}: setup() was not called")
        return self.ctx

    def setup(self, ctx: CalibContext) -> None:
        self.ctx = ctx

    def before_forward(self, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def finalize(self) -> dict[str, int]:
        """Per-module ranks; the engine keeps those components (by current mask) and drops the rest."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """Safetensors metadata for the output adapter, called after ``finalize`` (e.g. DyLoRA's order)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State kept across steps (tensors or JSON values), saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors already on the run's device)."""

    def schedule_restarts(self) -> list[int]:
        """Steps where the learning-rate schedule starts again (warm-up and decay); after ``setup``."""
        return []

    def describe(self) -> dict[str, Any]:
        """Settings recorded in ``compression_report.json``."""
        return {"method": self.name, **self.settings}
