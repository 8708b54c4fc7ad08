"""A bf16 base on a CPU without native bf16: weights stored in bf16, each product computed in fp32.

PyTorch's CPU bf16 matrix product needs AVX512-BF16 or AMX; without them it falls back to a reference
kernel. Measured on this project's 2-core AVX2 machine (torch 2.13, one thread), ``[64, 4096] @ [4096,
4096]ᵀ`` takes 228 ms in bf16 against 49 ms in fp32, and the input gradient ``[64, 4096] @ [4096, 4096]``
9.5 s against 43 ms: a 2-step calibration of a 7B base with ``--base-dtype bf16`` did not finish in an
hour. Calibration holds its frozen base in bf16 to halve its memory, so on such a CPU every frozen
``nn.Linear`` computes with its weight upcast to fp32 for that one product, forward and backward
(:func:`upcast_frozen_linears`). The process holds one weight in fp32 at a time, never the model.
The results are those of a native bf16 kernel, which also accumulates in fp32.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def native_bf16_matmul(device: str) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (a GPU; a CPU with AVX512-BF16 or AMX)."""
    if torch.device(device).type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # no oneDNN in this build: its bf16 products are the slow ones
        return False


class _Fp32Product(torch.autograd.Function):
    """``F.linear`` of a frozen bf16 layer in fp32. Only the module is kept for backward, not an fp32 copy
    of its weight, and its weight is read again there (under FSDP2 the gathered one, which the hooks
    gather again for backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Linear) -> torch.Tensor:  # noqa: ANN001
        ctx.module, ctx.x_dtype = module, x.dtype
        bias = None if module.bias is None else module.bias.float()
        with torch.autocast("cpu", enabled=False):  # --precision bf16 would cast the operands back to bf16
            return F.linear(x.float(), module.weight.float(), bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # noqa: ANN001
        if not ctx.needs_input_grad[0]:
            return None, None
        with torch.autocast("cpu", enabled=False):
            return (grad.float() @ ctx.module.weight.float()).to(ctx.x_dtype), None


def _fp32_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _Fp32Product.apply(x, self)


def upcast_frozen_linears(model: nn.Module) -> int:
    """Make every frozen bf16 ``nn.Linear`` of ``model`` compute in fp32 (its weight stays bf16); returns how many.

    Only plain ``nn.Linear`` layers: quantized ones (bitsandbytes' subclasses) compute in their own
    compute dtype, and a trainable weight keeps autograd's own product.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 and not module.weight.requires_grad:
            module.forward = types.MethodType(_fp32_forward, module)  # the instance's own: state-dict names stay
            count += 1
    return count
