"""A bf16 base on a CPU without native bf16 products computes each frozen layer in fp32 (weights stay bf16)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loracompress.pipelines.prune import prune
from loracompress.runtime import bf16_compute
from loracompress.runtime.bf16_compute import upcast_frozen_linears
from loracompress.runtime.placement import compute_dtype, resolve_placement
from tests.calibration.test_engine import options
from tests.calibration.test_memory import llama_files  # noqa: F401 - the module's fixture


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_the_fp32_product_gives_the_native_bf16_result_and_gradient():
    torch.manual_seed(0)
    native = _frozen(nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32, bias=False)).to(torch.bfloat16))
    upcast = copy.deepcopy(native)
    assert upcast_frozen_linears(upcast) == 2
    reference = copy.deepcopy(native).float()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    x32 = xs[0].detach().float().requires_grad_(True)
    outs = [native(xs[0]), upcast(xs[1]), reference(x32)]
    grad = torch.randn_like(outs[0])
    for out, g in zip(outs, (grad, grad, grad.float())):
        out.backward(g)
    assert outs[1].dtype == xs[1].grad.dtype == torch.bfloat16  # the model around it still sees bf16
    # as close to fp32 as the native kernel, which also accumulates in fp32 and rounds once
    assert (outs[1].float() - outs[2]).abs().max() <= (outs[0].float() - outs[2]).abs().max() + 1e-2
    assert (xs[1].grad.float() - x32.grad).abs().max() <= (xs[0].grad.float() - x32.grad).abs().max() + 1e-2
    assert {p.dtype for p in upcast.parameters()} == {torch.bfloat16}  # no fp32 copy is kept
    assert list(upcast.state_dict()) == list(native.state_dict())


def test_only_frozen_plain_bf16_linears_are_changed():
    class Sub(nn.Linear):  # stands in for bitsandbytes' Linear4bit, which computes in its own dtype
        pass

    model = nn.ModuleDict({"frozen": nn.Linear(4, 4), "fp32": nn.Linear(4, 4), "trained": nn.Linear(4, 4),
                           "sub": Sub(4, 4)})
    for name in ("frozen", "trained", "sub"):
        model[name].to(torch.bfloat16)
    for name in ("frozen", "fp32", "sub"):
        _frozen(model[name])
    assert upcast_frozen_linears(model) == 1
    assert "forward" in vars(model["frozen"]) and not any("forward" in vars(model[n]) for n in ("fp32", "trained", "sub"))


def test_a_4bit_base_computes_in_fp32_where_bf16_is_slow(monkeypatch):
    placement = resolve_placement("bf16", "cpu")
    monkeypatch.setattr(bf16_compute.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert compute_dtype(placement) == torch.float32
    monkeypatch.setattr(bf16_compute.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert compute_dtype(placement) == torch.bfloat16
    assert compute_dtype(resolve_placement("fp32", "cpu")) == torch.float32


@pytest.mark.parametrize("native", [False, True])
def test_calibration_with_a_bf16_base_upcasts_only_without_native_bf16(llama_files, tmp_path, monkeypatch,  # noqa: F811
                                                                      native):
    """Regression: with --base-dtype bf16 on an AVX2 CPU, PyTorch's fallback bf16 kernel made a 2-step 7B
    calibration run past an hour (the input gradient of one 4096² layer: 9.5 s instead of 43 ms in fp32)."""
    calls: list[int] = []
    real = bf16_compute._Fp32Product.apply
    monkeypatch.setattr(bf16_compute.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.setattr(bf16_compute._Fp32Product, "apply", lambda *a: calls.append(1) or real(*a))
    report = prune(llama_files["adapter"], tmp_path / "o", options(llama_files, "lorpa", steps=2, base_dtype="bf16",
                                                                     gradient_checkpointing=True))
    assert report["settings"]["base"]["base_dtype"] == "bf16"
    assert bool(calls) is not native
