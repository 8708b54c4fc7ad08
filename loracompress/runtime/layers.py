"""The LoRA layer used whenever loracompress runs a model: evaluation, calibration, export.

:class:`LoraLayer` wraps a frozen base ``nn.Linear`` (or GPT-2 ``Conv1D``) and adds
``scale · B @ (mask ⊙ (A @ x))``. It holds two sets of factors:

- the **student** (``A``, ``B``: parameters, trainable during calibration), and
- optionally the **teacher** (``A0``, ``B0``: frozen buffers, the original adapter's own tensors
  when their dtype and device already fit, never written),

so distillation needs one copy of the base weights: :func:`use_mode` switches every layer of
a model between ``"student"``, ``"teacher"`` and ``"base"``. Where the two adapters carry different
``modules_to_save`` tensors (two classifier heads, say), :class:`SavedModuleSwitch` gives each its own. ``mask`` is a per-rank-component
multiplier (1 keep, 0 pruned) that methods set; allocation state lives in the methods.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from loracompress.core.adapter import Adapter, LoraModule, base_param_name
from loracompress.errors import LoraCompressError

MODES = ("student", "teacher", "base")


def base_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(out, in)`` of a Linear or Conv1D layer, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D: weight [in, out]
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    return None


class LoraLayer(nn.Module):
    """A frozen base layer plus a maskable LoRA (student) and an optional frozen teacher LoRA."""

    def __init__(self, base: nn.Module, module: LoraModule, teacher: LoraModule | None = None, trainable: bool = False):
        super().__init__()
        shape = base_shape(base)
        if shape is None:
            raise TypeError(f"LoRA needs a Linear or Conv1D layer, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        dev, dt = base.weight.device, torch.float32 if base.weight.dtype not in (torch.float32, torch.float64) else base.weight.dtype
        self.A = nn.Parameter(module.A.detach().to(dev, dt).clone(), requires_grad=trainable)
        self.B = nn.Parameter(module.B.detach().to(dev, dt).clone(), requires_grad=trainable)
        self.scale = float(module.scale)
        self.register_buffer("mask", torch.ones(module.rank, device=dev, dtype=dt))
        if teacher is not None:
            # Frozen and never written: the teacher adapter's own tensors serve as they are when they
            # already have the dtype and device (no second copy of the original adapter in memory).
            self.register_buffer("A0", teacher.A.detach().to(dev, dt))
            self.register_buffer("B0", teacher.B.detach().to(dev, dt))
            self.scale0 = float(teacher.scale)
        else:
            self.A0 = self.B0 = None
            self.scale0 = 0.0
        self.mode = "student"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def active_rank(self) -> int:
        return int((self.mask != 0).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.mode == "base":
            return y
        if self.mode == "teacher":
            if self.A0 is None:
                raise RuntimeError("this layer has no teacher factors")
            A, B, mask, scale = self.A0, self.B0, None, self.scale0
        else:
            A, B, mask, scale = self.A, self.B, self.mask, self.scale
        if A.shape[0] == 0:
            return y
        h = x.to(A.dtype) @ A.T
        if mask is not None:
            h = h * mask
        return y + ((h @ B.T) * scale).to(y.dtype)

    def to_module(self, apply_mask: bool = True) -> LoraModule:
        """The student as a :class:`LoraModule`, masked components removed."""
        A, B = self.A.detach().float().cpu(), self.B.detach().float().cpu()
        if apply_mask:
            keep = (self.mask != 0).cpu()
            m = self.mask.detach().float().cpu()[keep]
            A, B = A[keep] * m[:, None], B[:, keep]
        return LoraModule(A=A.contiguous(), B=B.contiguous(), scale=self.scale)

    def delta(self) -> torch.Tensor:
        """The student's dense ``ΔW [out, in]`` (masked). Small layers only."""
        return self.scale * (self.B * self.mask) @ self.A

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:.3g}, teacher={self.A0 is not None}, mode={self.mode}"


class SavedModuleSwitch(nn.Module):
    """A ``modules_to_save`` module (a classifier head, say) that the student and the teacher adapter
    carry with different tensors.

    ``base`` is the module as the model holds it (the teacher's tensors: the base model is loaded with
    the reference adapter's), ``student`` a copy with the student adapter's tensors. The mode picks one,
    so each adapter runs with its own head, as stock PEFT would load it; ``"base"`` runs ``base``.
    """

    def __init__(self, base: nn.Module, student: nn.Module):
        super().__init__()
        self.base = base
        self.student = student
        self.mode = "student"

    def forward(self, *args: object, **kwargs: object) -> object:
        return (self.student if self.mode == "student" else self.base)(*args, **kwargs)


def _switch_saved_modules(model: nn.Module, student: Adapter, teacher: Adapter) -> None:
    """Wrap every module whose ``modules_to_save`` tensors differ between the adapters (see
    :class:`SavedModuleSwitch`); modules whose tensors are the same objects or equal stay as they are."""
    wanted: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in student.extra_tensors.items():
        ref = teacher.extra_tensors.get(key)
        if ref is tensor:
            continue
        bare = base_param_name(key)
        module_path, _, attr = bare.rpartition(".")
        try:
            current = model.get_submodule(module_path).get_parameter(attr) if module_path else model.get_parameter(attr)
        except AttributeError:
            continue  # not a parameter of this model (load_base already refused a tensor it cannot place)
        if tuple(current.shape) != tuple(tensor.shape):
            raise LoraCompressError(
                f"{bare}: the adapter's saved tensor is {tuple(tensor.shape)} but the reference's is "
                f"{tuple(current.shape)}; compare an adapter with the one it was compressed from"
            )
        if torch.equal(current.detach().cpu(), tensor.to(current.dtype).cpu()):
            continue
        wanted.setdefault(module_path, {})[attr] = tensor
    for module_path, tensors in wanted.items():
        if not module_path:
            raise LoraCompressError("a modules_to_save tensor of the adapter is a parameter of the model itself; "
                                    "it cannot be switched between two adapters")
        target = model.get_submodule(module_path)
        own = copy.deepcopy(target)
        with torch.no_grad():
            for attr, tensor in tensors.items():
                p = own.get_parameter(attr)
                p.copy_(tensor.to(p.dtype))
                p.requires_grad_(False)
        parent, name = _parent(model, module_path)
        setattr(parent, name, SavedModuleSwitch(target, own))


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def check_fit(model: nn.Module, adapter: Adapter, base_name: str = "the base model") -> None:
    """Raise with the first module where the adapter and the base model disagree."""
    arch = type(model).__name__
    for path, m in adapter.modules.items():
        try:
            target = model.get_submodule(path)
        except AttributeError:
            raise LoraCompressError(
                f"module {path} of the adapter is not in {base_name} ({arch}); pass the --base-model the adapter was trained on"
            ) from None
        if isinstance(target, LoraLayer):
            target = target.base
        shape = base_shape(target)
        if shape is None:
            raise LoraCompressError(
                f"module {path} is a {type(target).__name__} in {base_name}, not a Linear layer; wrong --base-model?"
            )
        if shape != (m.out_features, m.in_features):
            raise LoraCompressError(
                f"module {path}: the adapter expects out×in = {m.out_features}×{m.in_features} but {base_name} has "
                f"{shape[0]}×{shape[1]}; pass the --base-model the adapter was trained on"
            )


def attach(
    model: nn.Module,
    adapter: Adapter,
    teacher: Adapter | None = None,
    trainable: bool = False,
) -> dict[str, LoraLayer]:
    """Wrap every adapter module of ``model`` in a :class:`LoraLayer` (in place); returns them by path.

    ``teacher`` (usually the original adapter) supplies frozen factors for :func:`use_mode`;
    modules the student dropped (rank 0) still get a layer so the teacher can run there. The model is
    expected to hold the teacher's ``modules_to_save`` tensors; where the student's differ, the module
    is wrapped in a :class:`SavedModuleSwitch`.
    """
    check_fit(model, adapter if teacher is None else teacher)
    layers: dict[str, LoraLayer] = {}
    paths = list(adapter.modules) + [p for p in (teacher.modules if teacher else {}) if p not in adapter.modules]
    for path in paths:
        target = model.get_submodule(path)
        if isinstance(target, LoraLayer):
            raise RuntimeError(f"{path} already has a LoRA layer attached; detach first")
        student = adapter.modules.get(path)
        if student is None:
            ref = teacher.modules[path]
            student = LoraModule(A=ref.A.new_zeros(0, ref.in_features), B=ref.B.new_zeros(ref.out_features, 0), scale=1.0)
        layer = LoraLayer(target, student, teacher.modules.get(path) if teacher else None, trainable=trainable)
        parent, name = _parent(model, path)
        setattr(parent, name, layer)
        layers[path] = layer
    if teacher is not None and teacher is not adapter:
        _switch_saved_modules(model, adapter, teacher)
    return layers


def detach(model: nn.Module) -> None:
    """Put the original base layers (and saved modules) back."""
    for path, mod in list(model.named_modules()):
        if isinstance(mod, (LoraLayer, SavedModuleSwitch)):
            parent, name = _parent(model, path)
            setattr(parent, name, mod.base)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoraLayer)}


def _switchable(model: nn.Module) -> list[LoraLayer | SavedModuleSwitch]:
    return [m for m in model.modules() if isinstance(m, (LoraLayer, SavedModuleSwitch))]


@contextmanager
def use_mode(layers: Mapping[str, LoraLayer] | nn.Module, mode: str) -> Iterator[None]:
    """Run every LoRA layer (and, given a model, every :class:`SavedModuleSwitch`) as ``student``,
    ``teacher`` or ``base`` inside the block."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    items: list[LoraLayer | SavedModuleSwitch] = _switchable(layers) if isinstance(layers, nn.Module) else list(layers.values())
    old = [m.mode for m in items]
    for m in items:
        m.mode = mode
    try:
        yield
    finally:
        for m, o in zip(items, old):
            m.mode = o
