"""One calibration step and what it needs across steps: the learning-rate schedule, the batch order, the
teacher's targets (cached, top-k, or chunked with the head split), the student's loss and the optimizer
step with the method's hooks. The run around it (setup, checkpoints, the result) is :mod:`.loop`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from loracompress.calibration.engine.augment import delete_tokens
from loracompress.calibration.engine.config import EngineConfig
from loracompress.calibration.engine.head import HeadSplit
from loracompress.calibration.engine.loss import chunked_lm_loss, distillation_loss, hidden_state_loss
from loracompress.calibration.engine.schedule import lr_factor
from loracompress.calibration.engine.sharding import (
    average_gradients,
)
from loracompress.calibration.engine.teacher import TargetPlan, TopK, plan_targets, targets_nbytes
from loracompress.calibration.methods.base import Method
from loracompress.errors import LoraCompressError
from loracompress.runtime.data import model_inputs
from loracompress.runtime.layers import LoraLayer, use_mode

log = logging.getLogger(__name__)

#: step (1-based), total steps, loss of that step, estimated seconds left
ProgressFn = Callable[[int, int, float, float], None]


class StepLoop:
    """The per-step work, with the teacher-logit cache and timings."""

    def __init__(self, cfg: EngineConfig, accelerator: Any, model: nn.Module, prepared: nn.Module,
                 layers: dict[str, LoraLayer], optimizer: Any, params: list[nn.Parameter], method: Method,
                 batches: list[Mapping[str, torch.Tensor]], task: str, total: int, warmup: int, sharded: bool = False):
        self.cfg, self.acc, self.model, self.prepared = cfg, accelerator, model, prepared
        #: a sharded model is not wrapped by accelerate: its student forward needs autocast here, and the
        #: LoRA gradients (FSDP's ignored parameters) are averaged by hand
        self.sharded = sharded
        self.layers, self.opt, self.params, self.method = layers, optimizer, params, method
        self.batches, self.task, self.total, self.warmup = batches, task, total, warmup
        reused = total > len(batches)
        #: a fresh view of every batch at each step (token deletion): the teacher runs on each, nothing to cache
        self.views = cfg.uses_views(task)
        cache = not self.views and (cfg.cache_teacher or (cfg.cache_teacher is None and reused))
        self.cache: dict[int, torch.Tensor | TopK] | None = {} if cache else None
        self._order: tuple[int, list[int]] | None = None
        self.plan: TargetPlan | None = None  # decided at the first teacher forward
        self.restarts = sorted({int(r) for r in method.schedule_restarts() if 0 < int(r) < total})
        self.t0 = time.perf_counter()
        self.student_time = self.teacher_time = 0.0
        self.step_seconds: list[float] = []
        self.steps_run = self.teacher_runs = 0
        self._hidden_scales: list[float] | None = None
        #: a causal LM's output head, applied by the loss a chunk of tokens at a time (see :mod:`.head`);
        #: decided at the first forward: None until then, False where the model's logits are not the head's
        #: a sharded model keeps its head's weights sharded outside its own forward, so it keeps whole logits
        self._split: HeadSplit | bool | None = None if task == "lm" and cfg.loss_chunk_mb > 0 and not sharded else False
        self.vocab = self.chunk = 0  # the head's vocabulary, and the tokens per chunk it allows

    def split(self, inputs: Mapping[str, Any]) -> HeadSplit | None:
        """The head split when the loss runs in chunks, checked once on the first batch (:meth:`HeadSplit.probe`)."""
        if self._split is None:
            split = HeadSplit.find(self.model)
            vocab = split.probe(self.model, inputs, self.acc.autocast) if split is not None else None
            self._split = split if vocab is not None else False
            self.vocab = vocab or 0
            self.chunk = self.cfg.chunk_tokens(self.vocab)
        return self._split or None

    def _teacher_forward(self, inputs: Mapping[str, Any], **extra: Any) -> tuple[Any, torch.Tensor | None]:
        """The teacher's forward (inside its no-grad block): the model's output and, with the head split,
        the final hidden states (the output then holds no logits)."""
        split = self.split(inputs)
        if split is None:
            return self.model(**inputs, **extra), None
        with split.hidden() as kept:
            out = self.model(**inputs, **extra)
        return out, kept[-1].detach()

    def lr_factor(self, step: int) -> float:
        """Warm-up then decay, restarted at each of the method's ``schedule_restarts()`` steps."""
        begin = max([0, *(r for r in self.restarts if r <= step)])
        end = min([self.total, *(r for r in self.restarts if r > step)])
        length = end - begin
        warmup = self.warmup if begin == 0 and end == self.total else self.cfg.warmup_steps(length)
        return lr_factor(step - begin, length, min(warmup, length - 1), self.cfg.schedule)

    def batch_index(self, step: int) -> int:
        """Batch for ``step``: a fresh permutation each epoch, a pure function of (seed, epoch)."""
        n = len(self.batches)
        epoch = step // n
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(n, generator=g).tolist())
        return self._order[1][step % n]

    def teacher_targets(self, idx: int, inputs: Mapping[str, Any]) -> torch.Tensor | TopK:
        """The teacher's logits (or top-k targets, see :mod:`.teacher`) for batch ``idx``, cached when they fit."""
        if self.cache is not None and idx in self.cache:
            return self.cache[idx]
        t = time.perf_counter()
        with use_mode(self.layers, "teacher"), torch.no_grad(), self.acc.autocast():
            out, hidden = self._teacher_forward(inputs)
            split = self.split(inputs)
            if split is not None and hidden is not None:
                if self.plan is None:  # decided from the shape of the logits, which never exist whole here
                    shape = torch.empty((*hidden.shape[:-1], self.vocab), device="meta")
                    self.plan = plan_targets(self.task, self.cfg.teacher_top_k, shape, len(self.batches),
                                             self.cfg.teacher_cache_mb)
                targets = self.plan.make_chunked(hidden, split.logits, self.cfg.temperature, self.chunk)
            else:
                logits = out.logits.detach()
                if self.plan is None:
                    self.plan = plan_targets(self.task, self.cfg.teacher_top_k, logits, len(self.batches),
                                             self.cfg.teacher_cache_mb)
                targets = self.plan.make(logits, self.cfg.temperature)
                del logits  # top-k: the full distribution is gone before the student's forward
            del out
        self.teacher_time += time.perf_counter() - t
        self.teacher_runs += 1
        if self.cache is not None:
            total_mb = targets_nbytes(targets) / 2**20 * len(self.batches)
            if not self.cache and total_mb > self.cfg.teacher_cache_mb:
                log.info("teacher targets would take %.0f MB (--teacher-cache-mb %g); computing them every step "
                         "instead of caching", total_mb, self.cfg.teacher_cache_mb)
                self.cache = None
            else:
                self.cache[idx] = targets
        return targets

    def teacher_hidden(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Teacher logits and block outputs, computed every step (a cache of every block's output would
        be ``blocks × tokens × hidden`` floats per batch)."""
        t = time.perf_counter()
        with use_mode(self.layers, "teacher"), torch.no_grad(), self.acc.autocast():
            out, hidden = self._teacher_forward(inputs, output_hidden_states=True)
            split = self.split(inputs)
            if split is not None and hidden is not None:
                logits = TargetPlan(None, self.vocab).make_chunked(hidden, split.logits, self.cfg.temperature, self.chunk)
            else:
                logits = out.logits.detach().float()
        self.teacher_time += time.perf_counter() - t
        self.teacher_runs += 1
        return logits, tuple(h.detach() for h in out.hidden_states)

    def hidden_scales(self) -> list[float]:
        """Per block, the teacher's mean ``‖h_teacher − h_base‖²`` per real token over the first few
        batches: how much the original adapter moves that block's output (measured once)."""
        if self._hidden_scales is None:
            sums: list[float] = []
            count = 0.0
            with torch.no_grad(), self.acc.autocast():
                for raw in self.batches[:4]:
                    inputs = model_inputs(raw, self.acc.device)
                    with use_mode(self.layers, "teacher"):
                        ht = self.model(**inputs, output_hidden_states=True).hidden_states[1:]
                    with use_mode(self.layers, "base"):
                        hb = self.model(**inputs, output_hidden_states=True).hidden_states[1:]
                    m = inputs.get("attention_mask")
                    m = torch.ones(ht[0].shape[:2], device=ht[0].device) if m is None else m.float()
                    count += float(m.sum())
                    d = [float(((a.float() - b.float()).pow(2).sum(-1) * m).sum()) for a, b in zip(ht, hb)]
                    sums = d if not sums else [x + y for x, y in zip(sums, d)]
            self._hidden_scales = [x / max(count, 1.0) for x in sums]
        return self._hidden_scales

    def step(self, step: int) -> float:
        cfg, acc = self.cfg, self.acc
        idx = self.batch_index(step)
        raw = self.batches[idx]
        if self.views:  # the view is a pure function of (seed, step), so a resumed run sees the same ones
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 500_009 + step)
            raw = delete_tokens(raw, cfg.token_dropout, g)
        batch: dict[str, Any] = model_inputs(raw, acc.device)
        if self.task == "lm":
            batch["use_cache"] = False  # a KV cache would hold every block's keys/values for nothing
        labels = raw["labels"].to(acc.device) if "labels" in raw else None
        self.method.before_forward(step)
        hidden = cfg.hidden_weight > 0
        t_hidden = None
        if hidden:
            t_logits, t_hidden = self.teacher_hidden(batch)
        else:
            t_logits = self.teacher_targets(idx, batch)
        if (labels is None and cfg.pseudo_labels and self.task == "cls" and isinstance(t_logits, torch.Tensor)
                and t_logits.shape[-1] > 1):
            labels = t_logits.argmax(-1)
        t = time.perf_counter()
        split = self.split(batch)
        extra = {"output_hidden_states": True} if hidden else {}
        if split is not None:  # the model stops before its head; the loss applies it a chunk of tokens at a time
            with split.hidden() as kept, acc.autocast() if self.sharded else nullcontext():
                out = self.prepared(**batch, **extra)
            anchor = kept[-1]
            with acc.autocast():  # the head runs in the precision it would inside the forward
                loss, _ = chunked_lm_loss(anchor, split.logits, t_logits, labels, batch.get("attention_mask"),
                                          chunk=self.chunk, temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                                          task_weight=cfg.task_weight)
        else:
            with acc.autocast() if self.sharded else nullcontext():
                out = self.prepared(**batch, **extra)
            anchor = out.logits
            loss, _ = distillation_loss(out.logits, t_logits, labels, batch.get("attention_mask"), self.task,
                                        temperature=cfg.temperature, kd_weight=cfg.kd_weight, task_weight=cfg.task_weight)
        if hidden:
            loss = loss + cfg.hidden_weight * hidden_state_loss(out.hidden_states, t_hidden,
                                                                batch.get("attention_mask"), self.hidden_scales())
        if not loss.requires_grad:
            if self.task == "cls":
                raise LoraCompressError("nothing to train on: the data has no labels and --kd-weight is 0; raise --kd-weight")
            loss = (anchor * 0.0).sum()  # an LM batch with no counted token: a no-op step, same on every process
        acc.backward(loss)
        if self.sharded:
            average_gradients(self.params)
        if acc.scaler is not None:
            acc.unscale_gradients()  # hooks and clipping see true gradients
        self.method.after_backward(step)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        factor = self.lr_factor(step)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * factor
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.method.after_step(step)
        value = float(loss.detach())  # also waits for the GPU, so the timing is real
        self.step_seconds.append(time.perf_counter() - t)
        self.student_time += self.step_seconds[-1]
        self.steps_run += 1
        if not math.isfinite(value):
            raise LoraCompressError(
                f"the calibration loss became {value} at step {step + 1}; lower --lr or use --precision fp32"
            )
        return value

    def cache_mb(self) -> float | None:
        if self.cache is None:
            return None
        return round(sum(targets_nbytes(t) for t in self.cache.values()) / 2**20, 3)

    def targets_info(self) -> dict[str, Any]:
        """What the report records of the teacher's targets."""
        info: dict[str, Any] = self.plan.describe() if self.plan is not None else {}
        chunked = bool(self._split)
        return {**info, "cached": self.cache is not None, "cache_cap_mb": self.cfg.teacher_cache_mb,
                "loss_chunk_tokens": self.chunk if chunked else None}
