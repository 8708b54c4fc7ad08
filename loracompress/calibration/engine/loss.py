"""The calibration objective: distillation from the original adapter plus the task loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loracompress.calibration.engine.teacher import TopK, topk_kl
from loracompress.runtime.data import IGNORE_INDEX


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | TopK,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    task: str,
    *,
    temperature: float = 2.0,
    kd_weight: float = 1.0,
    task_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``kd_weight · T² · KL(softmax(t/T) ‖ softmax(s/T)) + task_weight · CE(s, labels)``.

    ``task="cls"``: logits ``[B, C]``, labels ``[B]`` (a single-output head is a regression:
    mean squared error for both terms). ``task="lm"``: logits ``[B, L, V]``; position ``i``
    predicts token ``i+1`` and counts wherever that token's label is not -100 (padding and the
    prompt of prompt/completion pairs are left out, as in :mod:`loracompress.pipelines.evaluate`), or
    wherever it is a real token when there are no labels. Everything is computed in float32.
    A causal LM's teacher may come as :class:`~loracompress.calibration.engine.teacher.TopK` targets:
    the KL is then taken over the teacher's top-k tokens and the rest (:func:`topk_kl`).
    """
    s = student.float()
    t = teacher if isinstance(teacher, TopK) else teacher.float()
    parts: dict[str, float] = {}
    total = s.new_zeros(())
    if task == "lm":
        s, t = s[:, :-1], t[:, :-1]
        valid = lm_counted(labels, attention_mask, s)
        s_v, t_v = s[valid], t[valid]  # [N, V]
        if s_v.shape[0] == 0:
            return total + 0.0 * s.sum(), parts  # nothing counted in this batch
        if kd_weight > 0:
            kd = topk_kl(s_v, t_v, temperature) if isinstance(t_v, TopK) else _kl(s_v, t_v, temperature)
            total = total + kd_weight * kd
            parts["kd"] = float(kd.detach())
        if labels is not None and task_weight > 0:
            ce = F.cross_entropy(s_v, labels[:, 1:][valid])
            total = total + task_weight * ce
            parts["task"] = float(ce.detach())
        return total, parts
    if s.shape[-1] == 1:  # regression head
        if kd_weight > 0:
            kd = F.mse_loss(s, t)
            total = total + kd_weight * kd
            parts["kd"] = float(kd.detach())
        if labels is not None and task_weight > 0:
            mse = F.mse_loss(s.squeeze(-1), labels.float())
            total = total + task_weight * mse
            parts["task"] = float(mse.detach())
        return total, parts
    if kd_weight > 0:
        kd = _kl(s, t, temperature)
        total = total + kd_weight * kd
        parts["kd"] = float(kd.detach())
    if labels is not None and task_weight > 0:
        ce = F.cross_entropy(s, labels)
        total = total + task_weight * ce
        parts["task"] = float(ce.detach())
    return total, parts


def lm_counted(labels: torch.Tensor | None, attention_mask: torch.Tensor | None, shifted: torch.Tensor) -> torch.Tensor:
    """Which positions of a causal LM's shifted ``[B, L-1, ...]`` outputs count: where the next token's label
    is not -100, else where it is a real token, else all."""
    if labels is not None:
        return labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        return attention_mask[:, 1:] != 0
    return torch.ones(shifted.shape[:2], dtype=torch.bool, device=shifted.device)


def _kl(s: torch.Tensor, t: torch.Tensor, temperature: float, reduction: str = "batchmean") -> torch.Tensor:
    """Mean (``reduction="sum"``: sum) over rows of ``KL(softmax(t/T) ‖ softmax(s/T))``, times ``T²`` (Hinton et al.)."""
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction=reduction) * temperature**2


def chunked_lm_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    teacher: torch.Tensor | TopK,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    chunk: int,
    temperature: float = 2.0,
    kd_weight: float = 1.0,
    task_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`distillation_loss` of a causal LM (``task="lm"``) from the final hidden states ``[B, L, H]``
    and the output ``head`` (hidden ``[n, H]`` → float32 logits ``[n, V]``), ``chunk`` counted tokens at a time.

    Equal to ``distillation_loss(head(hidden), ...)`` (within float rounding), but no more than ``chunk``
    tokens' logits exist at once, in the forward or the backward: each chunk's head, log-softmax and KL
    run under :func:`torch.utils.checkpoint.checkpoint`, which keeps only the chunk's hidden states
    for the backward and recomputes the rest there (one more head matmul per chunk). So the loss's
    memory is ``chunk × vocab``, whatever the sequence length. ``teacher``: full logits ``[B, L, V]``
    or :class:`TopK` targets.
    """
    # (batch, position) of each counted token; position i predicts token i+1. The teacher's rows are
    # gathered a chunk at a time: no copy of all its [N, V] targets either.
    b, pos = lm_counted(labels, attention_mask, hidden[:, :-1]).nonzero(as_tuple=True)
    y = labels[:, 1:][b, pos] if labels is not None and task_weight > 0 else None
    n = int(b.numel())
    parts: dict[str, float] = {}
    if n == 0:
        return 0.0 * hidden.sum(), parts  # nothing counted in this batch
    kd_sum = ce_sum = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        rows = (b[i:i + chunk], pos[i:i + chunk])
        t_c = teacher[rows]
        t_args = (t_c.logp, t_c.index, t_c.log_rest) if isinstance(t_c, TopK) else (t_c,)
        y_c = y[i:i + chunk] if y is not None else None
        kd_c, ce_c = checkpoint(_chunk_terms, hidden[rows], y_c, head, temperature, kd_weight > 0, *t_args,
                                use_reentrant=False, preserve_rng_state=False)
        kd_sum, ce_sum = kd_sum + kd_c, ce_sum + ce_c
    total = hidden.new_zeros((), dtype=torch.float32)
    if kd_weight > 0:
        kd = kd_sum / n
        total = total + kd_weight * kd
        parts["kd"] = float(kd.detach())
    if y is not None:
        ce = ce_sum / n
        total = total + task_weight * ce
        parts["task"] = float(ce.detach())
    return total, parts


def _chunk_terms(h: torch.Tensor, y: torch.Tensor | None, head: Callable[[torch.Tensor], torch.Tensor],
                 temperature: float, kd: bool, *teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed KL (× T²) and summed cross-entropy of one chunk of tokens (the checkpointed part)."""
    s = head(h).float()
    zero = s.new_zeros(())
    kd_sum = zero
    if kd:
        kd_sum = (topk_kl(s, TopK(*teacher), temperature, reduction="sum") if len(teacher) == 3
                  else _kl(s, teacher[0], temperature, reduction="sum"))
    ce_sum = F.cross_entropy(s, y, reduction="sum") if y is not None else zero
    return kd_sum, ce_sum


def hidden_state_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], attention_mask: torch.Tensor | None,
    scales: Sequence[float],
) -> torch.Tensor:
    """Mean over blocks of ``‖h_s − h_t‖² / scale`` per real token: every block's output, student
    against teacher (``output_hidden_states``, the embeddings left out: LoRA does not change them).

    A dense, label-free signal: a classifier's few logits say little about *how* the student went
    wrong, each block's ``[tokens, hidden]`` output says a lot. ``scales[l]`` is the teacher's own
    mean ``‖h_t − h_base‖²`` per token at block ``l`` (:meth:`.step.StepLoop.hidden_scales`), so 1 means
    "as far from the teacher as the bare base model is", whatever the model's hidden size.
    """
    total = student[-1].new_zeros((), dtype=torch.float32)
    for s, t, c in zip(student[1:], teacher[1:], scales):
        d = (s.float() - t.float()).pow(2).sum(-1)  # [B, L]
        if attention_mask is not None:
            m = attention_mask.to(d.dtype)
            d = (d * m).sum() / m.sum().clamp_min(1.0)
        else:
            d = d.mean()
        total = total + d / max(c, 1e-12)
    return total / max(1, len(scales))
