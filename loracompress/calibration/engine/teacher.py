"""Teacher targets of a causal LM at bounded memory: the top-k log-probabilities plus the rest.

A causal LM's full teacher distribution costs ``4 × vocab`` bytes per token (500 KiB at a 128k
vocabulary), too much to cache across epochs and, at 7B batch sizes, a large share of a step's
memory on its own. :class:`TopK` keeps, per position, the ``k`` largest teacher log-probabilities
at the distillation temperature, their token ids, and the log of the probability mass of all other
tokens (the *rest* bucket): ``8k + 4`` bytes per token.

The distillation term is then the KL divergence between teacher and student over ``k + 1``
outcomes (the teacher's top-k tokens and "any other token"), :func:`topk_kl`. It is the full KL of
the two distributions coarsened the same way, so it never exceeds the full-vocabulary KL, equals it
when ``k`` is the vocabulary size, and it is zero exactly when the student matches the teacher on
the top-k tokens and on the total of the rest. ``benchmarks/teacher_topk.py`` measures how close the
calibrated result comes to full-vocabulary distillation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: ``--teacher-top-k`` when the full-vocabulary targets of all batches exceed ``--teacher-cache-mb``
DEFAULT_TOP_K = 64


@dataclass
class TopK:
    """Per position: ``logp [..., k]`` (float32, at temperature T), ``index [..., k]`` (int32) and
    ``log_rest [...]`` (log of the remaining mass; ``-inf`` when nothing remains)."""

    logp: torch.Tensor
    index: torch.Tensor
    log_rest: torch.Tensor

    def __getitem__(self, item: Any) -> TopK:
        """Index the leading (batch, position) dimensions of all three, e.g. ``t[:, :-1]`` or ``t[mask]``."""
        return TopK(self.logp[item], self.index[item], self.log_rest[item])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logp, self.index, self.log_rest))


def topk_targets(logits: torch.Tensor, k: int, temperature: float) -> TopK:
    """The teacher's top-``k`` log-probabilities at ``temperature`` and the log of the rest, from ``[..., V]`` logits."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    values, index = logp.topk(k, dim=-1)
    log_rest = logp.scatter(-1, index, float("-inf")).logsumexp(-1)
    return TopK(values.contiguous(), index.to(torch.int32).contiguous(), log_rest.contiguous())


def topk_kl(student: torch.Tensor, teacher: TopK, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """Mean (``reduction="sum"``: sum) over rows of ``KL(teacher ‖ student)`` over the teacher's top-k tokens
    and the rest bucket, × ``T²``.

    ``student``: logits ``[N, V]``; ``teacher``: a :class:`TopK` of ``N`` rows (float32 throughout).
    """
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    index = teacher.index.long()
    log_q_top = log_q.gather(-1, index)
    log_q_rest = log_q.scatter(-1, index, float("-inf")).logsumexp(-1)
    p_top, p_rest = teacher.logp.exp(), teacher.log_rest.exp()
    top = (p_top * (teacher.logp - log_q_top)).sum(-1)
    # 0 · log(0/q) is 0: no rest bucket when the teacher's top-k hold all of its mass
    rest = torch.where(p_rest > 0, p_rest * (teacher.log_rest - log_q_rest), torch.zeros_like(p_rest))
    rows = top + rest
    return (rows.sum() if reduction == "sum" else rows.mean()) * temperature**2


@dataclass(frozen=True)
class TargetPlan:
    """What the teacher's targets are for a run: the full distribution (``top_k`` None) or top-k + rest."""

    top_k: int | None
    vocab: int

    def make(self, logits: torch.Tensor, temperature: float) -> torch.Tensor | TopK:
        return logits.float() if self.top_k is None else topk_targets(logits, self.top_k, temperature)

    def make_chunked(self, hidden: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor], temperature: float,
                     chunk: int) -> torch.Tensor | TopK:
        """:meth:`make` from the final hidden states ``[..., H]`` and the output head (``logits``), ``chunk``
        tokens' logits at a time: top-k targets never hold more than one chunk's full distribution, and
        full targets are written straight into their one float32 ``[..., V]`` tensor."""
        lead, flat = hidden.shape[:-1], hidden.reshape(-1, hidden.shape[-1])
        spans = [slice(i, i + chunk) for i in range(0, flat.shape[0], chunk)]
        if self.top_k is None:
            out = torch.empty(flat.shape[0], self.vocab, dtype=torch.float32, device=hidden.device)
            for rows in spans:
                out[rows] = logits(flat[rows])
            return out.view(*lead, self.vocab)
        parts = [topk_targets(logits(flat[rows]), self.top_k, temperature) for rows in spans]
        return TopK(torch.cat([p.logp for p in parts]).view(*lead, -1), torch.cat([p.index for p in parts]).view(*lead, -1),
                    torch.cat([p.log_rest for p in parts]).view(lead))

    def describe(self) -> dict[str, Any]:
        if self.top_k is None:
            return {"kind": "full", "vocab": self.vocab}
        return {"kind": "top-k", "top_k": self.top_k, "vocab": self.vocab}


def plan_targets(task: str, setting: int | None, logits: torch.Tensor, batches: int, cap_mb: float) -> TargetPlan:
    """Decide from the first teacher batch. ``setting`` is ``--teacher-top-k``: 0 the full distribution,
    ``k`` top-k, ``None`` (auto) the full distribution while every batch's full targets fit in ``cap_mb``
    (the teacher cache's cap), else top-:data:`DEFAULT_TOP_K`. Classifiers always keep their logits."""
    vocab = int(logits.shape[-1])
    if task != "lm" or setting == 0:
        return TargetPlan(None, vocab)
    if setting is None:
        full_mb = logits.numel() * 4 / 2**20 * batches  # cached as float32
        setting = None if full_mb <= cap_mb else DEFAULT_TOP_K
    if setting is None or setting >= vocab:  # k = vocab is the full distribution, exactly
        return TargetPlan(None, vocab)
    return TargetPlan(int(setting), vocab)


def targets_nbytes(targets: torch.Tensor | TopK) -> int:
    return targets.nbytes if isinstance(targets, TopK) else targets.numel() * targets.element_size()
