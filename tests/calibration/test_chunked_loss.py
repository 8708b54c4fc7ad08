"""The causal LM's distillation loss in chunks of tokens: the same value and gradients as the plain one,
with no more than one chunk's logits at a time (docs/calibration.md, "Long sequences")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loracompress.calibration.engine import EngineConfig, distillation_loss
from loracompress.calibration.engine.head import HeadSplit
from loracompress.calibration.engine.loss import chunked_lm_loss
from loracompress.calibration.engine.teacher import TargetPlan, topk_targets
from loracompress.errors import LoraCompressError
from loracompress.runtime.data import IGNORE_INDEX
from tests.calibration.test_memory import _llama_run
from tests.tiny import sample_inputs, tiny_llama

#: chunked against plain, loss and gradients (float32; the sums only run in another order)
TOL = 1e-6


class CountingHead(nn.Linear):
    """An output head that records how many tokens each call gets."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__(hidden, vocab, bias=False)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return super().forward(x)


def _case(seed: int = 0, batch: int = 3, length: int = 11, hidden: int = 16, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = CountingHead(hidden, vocab)
    h = torch.randn(batch, length, hidden, generator=g, requires_grad=True)
    teacher = torch.randn(batch, length, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt left out
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[2, 7:] = 0  # padding
    labels[2, 7:] = IGNORE_INDEX
    return head, h, teacher, labels, mask


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("targets", ["full", "top-k"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_chunked_loss_equals_the_plain_one_and_its_gradients(targets, with_labels):
    head, h, teacher_logits, labels, mask = _case()
    teacher = teacher_logits if targets == "full" else topk_targets(teacher_logits, 7, 2.0)
    labels = labels if with_labels else None
    plain, plain_parts = distillation_loss(head(h), teacher, labels, mask, "lm", temperature=2.0, task_weight=0.5)
    plain_grads = _grads(plain, h, head.weight)
    head.rows.clear()
    chunked, parts = chunked_lm_loss(h, head, teacher, labels, mask, chunk=4, temperature=2.0, task_weight=0.5)
    assert set(parts) == set(plain_parts) == ({"kd", "task"} if with_labels else {"kd"})
    torch.testing.assert_close(chunked, plain, atol=TOL, rtol=TOL)
    for got, want in zip(_grads(chunked, h, head.weight), plain_grads):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert head.rows and max(head.rows) <= 4  # forward and the backward's recomputation: one chunk at a time
    assert sum(head.rows) == 2 * int((labels[:, 1:] != IGNORE_INDEX).sum() if with_labels else mask[:, 1:].sum())


def test_chunked_loss_with_nothing_counted_is_a_zero_that_backpropagates():
    head, h, teacher, labels, mask = _case()
    loss, parts = chunked_lm_loss(h, head, teacher, torch.full_like(labels, IGNORE_INDEX), mask, chunk=4)
    assert float(loss.detach()) == 0.0 and parts == {} and loss.requires_grad


@pytest.mark.parametrize("top_k", [None, 5])
def test_chunked_teacher_targets_equal_the_plain_ones(top_k):
    head, h, *_ = _case(seed=1)
    plan = TargetPlan(top_k, 50)
    with torch.no_grad():
        plain = plan.make(head(h), 2.0)
        chunked = plan.make_chunked(h, head, 2.0, chunk=4)
    assert max(head.rows[1:]) <= 4
    if top_k is None:
        torch.testing.assert_close(chunked, plain, atol=TOL, rtol=TOL)  # matmuls of other shapes round otherwise
    else:
        for a, b in ((chunked.logp, plain.logp), (chunked.index, plain.index), (chunked.log_rest, plain.log_rest)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_the_probe_takes_a_llama_head_and_refuses_logits_changed_after_it():
    model = tiny_llama()
    split = HeadSplit.find(model)
    inputs = sample_inputs("llama", seq=12)
    assert split is not None and split.probe(model, inputs, _no_autocast) == 96

    class Capped(type(model)):  # logits soft-capped after the head, as Gemma 2 does
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)
            return out

    capped = Capped(model.config).eval()
    capped.load_state_dict(model.state_dict())
    assert HeadSplit.find(capped).probe(capped, inputs, _no_autocast) is None


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("top_k", [0, 8])
def test_the_engine_gives_the_same_adapter_with_and_without_chunks(tmp_path, top_k):
    """The whole run, teacher targets and student loss in chunks of 2 tokens, against the model's whole logits."""
    tiny_mb = 2 * 4 * 96 / 2**20  # two tokens' float32 logits at the tiny vocabulary
    plain, _, _ = _llama_run(tmp_path / "p", steps=6, loss_chunk_mb=0, teacher_top_k=top_k)
    chunked, _, _ = _llama_run(tmp_path / "c", steps=6, loss_chunk_mb=tiny_mb, teacher_top_k=top_k)
    assert chunked.teacher_targets["kind"] == ("full" if top_k == 0 else "top-k")
    assert (chunked.teacher_targets["loss_chunk_tokens"], plain.teacher_targets["loss_chunk_tokens"]) == (2, None)
    assert EngineConfig(loss_chunk_mb=tiny_mb).chunk_tokens(96) == 2
    assert chunked.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)
    for path, m in plain.adapter.modules.items():
        torch.testing.assert_close(chunked.adapter.modules[path].delta(), m.delta(), atol=1e-5, rtol=1e-4)


def test_a_bad_chunk_size_is_refused():
    with pytest.raises(LoraCompressError, match="loss_chunk_mb must be a number >= 0"):
        EngineConfig(loss_chunk_mb=-1)
