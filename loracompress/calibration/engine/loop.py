"""The one calibration loop: distil the original adapter into a smaller one on the user's data.

The engine wraps every adapter module of the (frozen) base model in a
:class:`~loracompress.runtime.layers.LoraLayer` holding two factor sets over **one** copy of the base
weights: the *student* (trainable, initialised from the checkpoint in SVD order) and the
*teacher* (the original adapter, frozen). Each step:

1. ``method.before_forward(step)``
2. teacher logits: a no-grad forward in ``"teacher"`` mode (cached per batch when the data is
   reused across epochs and the cache fits ``teacher_cache_mb``),
3. student forward, loss = ``kd_weight · T² · KL(teacher_T ‖ student_T)`` + ``task_weight · CE``
   (the task term only when the batch has labels), backward (DDP all-reduce). A causal LM's forward
   stops before its output head and the loss applies the head a chunk of tokens at a time
   (:mod:`.head`, :func:`.loss.chunked_lm_loss`): its memory does not grow with the sequence length,
4. ``method.after_backward(step)``, gradient clipping, AdamW step on the student A/B only
   (learning rate: linear warm-up, then cosine or linear decay),
5. ``method.after_step(step)``, progress callback, checkpoint every ``checkpoint_every`` steps.

At the end ``method.finalize()`` gives per-module ranks (met through
:func:`loracompress.core.budget.allocate`); the surviving components of each module are
re-factorised in SVD order (scale folded) into the result :class:`~loracompress.core.adapter.Adapter`.

Built on ``accelerate``: CPU, CUDA, bf16/fp16 mixed precision, and several processes
(``accelerate launch -m loracompress prune ...``, DDP: every process trains on its own shard of
the batches; everything a method decides from is identical on every process, or reduced with
``ctx.reduce_mean``). With ``fsdp`` the processes also split the frozen base between them
(:mod:`.sharding`, torch's FSDP2); the LoRA factors stay whole and their gradients are averaged
as DDP would, so every method runs unchanged.

Interruption and resuming: SIGINT/SIGTERM finish the current step, save a checkpoint when
checkpointing is on, and raise :class:`Interrupted` (nothing is written to the output). A
checkpoint is a folder ``step-NNNNNNNN`` holding ``state.safetensors`` (student factors, masks,
optimizer moments, method tensors) and ``state.json`` (step, settings fingerprint, optimizer
groups, method values), never a pickle. Resuming restores all of it; the data order is a pure
function of ``(seed, epoch)``, so a resumed run ends with the same bytes as an uninterrupted one.
The whole method contract (hooks, state, schedule restarts, the context's callbacks) is in
:mod:`loracompress.calibration.methods.base`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loracompress.calibration.engine.accelerator import (
    any_process,
    make_accelerator,
    parallel_kind,
    place_model,
    reducer,
)
from loracompress.calibration.engine.augment import delete_tokens
from loracompress.calibration.engine.checkpoints import Checkpoints
from loracompress.calibration.engine.config import EngineConfig
from loracompress.calibration.engine.head import HeadSplit
from loracompress.calibration.engine.loss import chunked_lm_loss, distillation_loss, hidden_state_loss
from loracompress.calibration.engine.recompute import gradient_checkpointing
from loracompress.calibration.engine.schedule import lr_factor
from loracompress.calibration.engine.sharding import (
    ShardInfo,
    average_gradients,
    check_shardable,
    fsdp_requested,
    gather_peak_rss,
    shard_base,
)
from loracompress.calibration.engine.signals import _StopRequest
from loracompress.calibration.engine.student import extract
from loracompress.calibration.engine.teacher import TargetPlan, TopK, plan_targets, targets_nbytes
from loracompress.calibration.methods.base import CalibContext, Method
from loracompress.core import jsonio
from loracompress.core.adapter import Adapter
from loracompress.errors import LoraCompressError
from loracompress.runtime.data import model_inputs
from loracompress.runtime.layers import LoraLayer, attach, detach, use_mode

log = logging.getLogger(__name__)

#: step (1-based), total steps, loss of that step, estimated seconds left
ProgressFn = Callable[[int, int, float, float], None]


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the calibration after a complete step (a checkpoint may have been saved)."""


@dataclass
class EngineResult:
    """The calibrated adapter and what the report says about the run."""

    adapter: Adapter
    ranks: dict[str, int]
    steps: int
    seconds: float
    losses: list[float]
    device: str
    num_processes: int
    teacher_cache_mb: float | None  # None: teacher logits were not cached
    student_seconds_per_step: float
    teacher_seconds_per_step: float
    resumed_from: int | None = None
    #: per step of this run: the student's forward, backward, optimizer step and hooks (not the teacher)
    step_seconds: list[float] = field(default_factory=list)
    #: how several processes share the work: "none", "ddp" or "fsdp"
    parallel: str = "none"
    #: full distribution or top-k (+ k, vocab), cached or not, the cache's cap
    teacher_targets: dict[str, Any] = field(default_factory=dict)
    #: a sharded run (``parallel == "fsdp"``): processes, blocks, the base's bytes and each process's share
    sharding: ShardInfo | None = None

    def summary(self) -> dict[str, Any]:
        tail = self.losses[-max(1, len(self.losses) // 10):] if self.losses else []
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "num_processes": self.num_processes,
            "parallel": self.parallel,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "teacher_cache_mb": self.teacher_cache_mb,
            "teacher_targets": self.teacher_targets,
            "student_seconds_per_step": round(self.student_seconds_per_step, 5),
            "teacher_seconds_per_step": round(self.teacher_seconds_per_step, 5),
            "resumed_from": self.resumed_from,
            **({"sharding": self.sharding.describe()} if self.sharding is not None else {}),
        }


def module_depths(paths: Sequence[str]) -> tuple[dict[str, int], int]:
    """Block index of each module path (its first numeric path component; -1 outside blocks), and the block count."""
    depth = {}
    for p in paths:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", p)
        depth[p] = int(m[1]) if m else -1
    return depth, max([d for d in depth.values()], default=-1) + 1 or 1


class Engine:
    """Runs one calibration. Create one per run; see the module docstring for the loop."""

    def __init__(self, config: EngineConfig):
        self.config = config

    def run(
        self,
        model: nn.Module,
        teacher: Adapter,
        student: Adapter,
        method: Method,
        target_params: int,
        batches: Sequence[Mapping[str, torch.Tensor]],
        task: str,
        *,
        progress: ProgressFn | None = None,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> EngineResult:
        """Calibrate ``student`` (the start, e.g. :func:`svd_student`) towards ``teacher`` on ``batches``.

        ``model`` is the base model (frozen here; its LoRA layers are removed again at the end).
        ``student`` is copied into the layers and not referenced afterwards: pass it in the call
        (``svd_student(adapter)``) rather than keeping it in a variable, and only one copy of it exists
        during the run. ``teacher``'s factors are used as they are (no copy) when already float32.
        ``fingerprint`` identifies the run for checkpoints: resuming with other settings is refused.
        """
        cfg = self.config
        if task not in ("cls", "lm"):
            raise ValueError(f"task must be 'cls' or 'lm', not {task!r}")
        if not batches:
            raise LoraCompressError("no calibration batches; pass more data")
        t_start = time.perf_counter()
        accelerator = make_accelerator(cfg.device, cfg.precision)
        sharded = fsdp_requested(cfg.fsdp, accelerator)
        if sharded:
            check_shardable(cfg.precision)
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        world, rank = accelerator.num_processes, accelerator.process_index
        if len(batches) < world:
            raise LoraCompressError(
                f"{len(batches)} batch(es) cannot be shared by {world} processes; pass more data or a smaller --batch-size"
            )
        per_proc = len(batches) // world
        local = list(batches[rank::world])[:per_proc]  # equal shards: every process takes the same steps
        total = cfg.total_steps(per_proc)
        warmup = cfg.warmup_steps(total)
        fp = {**(fingerprint or {}), "total_steps": total, "num_processes": world, "seed": cfg.seed,
              "lr": cfg.lr, "warmup": cfg.warmup, "schedule": cfg.schedule, "kd_weight": cfg.kd_weight,
              "task_weight": cfg.task_weight, "temperature": cfg.temperature, "precision": cfg.precision,
              "target_params": int(target_params), "method": method.describe(),
              "teacher_top_k": cfg.teacher_top_k, "teacher_cache_mb": cfg.teacher_cache_mb}
        if cfg.hidden_weight or cfg.pseudo_labels:  # only then, so that older checkpoints still resume
            fp.update(hidden_weight=cfg.hidden_weight, pseudo_labels=cfg.pseudo_labels)
        if cfg.uses_views(task):
            fp.update(token_dropout=cfg.token_dropout)
        fp = json.loads(jsonio.dumps(fp, default=str))

        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()  # dropout off: the student learns the teacher's deterministic function
        layers = attach(model, student, teacher=teacher, trainable=True)
        # The layers hold their own copy of the student's factors: drop this reference so that a student
        # passed in by value (``svd_student(adapter)`` in the call) is freed instead of living on, a second
        # copy of the factors, for the whole run.
        del student
        prepared: nn.Module | None = None
        shard: ShardInfo | None = None
        try:
            for layer in layers.values():
                for p in (layer.A, layer.B):
                    if p.numel() == 0:
                        p.requires_grad_(False)  # an empty factor takes no part (and DDP needs every trainable one used)
            if sharded:  # the base may still be on the CPU: each block goes to the device as it is sharded
                shard = shard_base(model, [p for layer in layers.values() for p in (layer.A, layer.B)],
                                   accelerator.device)
            else:
                place_model(model, accelerator.device)
            params = [p for layer in layers.values() for p in (layer.A, layer.B) if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            depth, num_layers = module_depths(list(layers))
            ctx = CalibContext(
                layers=layers, target_params=int(target_params), total_steps=total, optimizer=optimizer,
                seed=cfg.seed, depth=depth, num_layers=num_layers,
                reduce_mean=reducer(accelerator), reset_optimizer=lambda: optimizer.state.clear(),
            )
            method.setup(ctx)
            if sharded:  # fully_shard changed the model in place; no DDP (or accelerate FSDP) wrapper on top
                prepared, opt = model, optimizer
            else:
                with warnings.catch_warnings():  # torch deprecates broadcast_buffers; False is still what we mean
                    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                    prepared, opt = accelerator.prepare(model, optimizer)
            start = 0
            losses: list[float] = []
            ckpt = Checkpoints(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
            if cfg.resume and ckpt is not None:
                start, losses = ckpt.load(layers, optimizer, accelerator, method, fp)
                log.info("resuming at step %d of %d from %s", start, total, ckpt.root)
            elif ckpt is not None and ckpt.latest() is not None and accelerator.is_main_process:
                log.info("starting afresh; an earlier checkpoint in %s is replaced (pass --resume to continue it)", ckpt.root)
                ckpt.clear()
            loop = _Loop(cfg, accelerator, model, prepared, layers, opt, params, method, local, task, total, warmup,
                         sharded)
            with _StopRequest() as stop, gradient_checkpointing(model, cfg.gradient_checkpointing):
                for step in range(start, total):
                    losses.append(loop.step(step))
                    if progress is not None and accelerator.is_main_process:
                        done = step + 1 - start
                        eta = (time.perf_counter() - loop.t0) / done * (total - step - 1)
                        progress(step + 1, total, losses[-1], eta)
                    stopping = any_process(accelerator, stop.signum is not None)
                    last = step + 1 == total
                    due = cfg.checkpoint_every is not None and (step + 1) % cfg.checkpoint_every == 0 and not last
                    if ckpt is not None and cfg.checkpoint_every is not None and (due or (stopping and not last)):
                        ckpt.save(step + 1, layers, optimizer, accelerator, method, fp, losses)
                    if stopping and not last:
                        where = f"; checkpoint saved in {ckpt.root}, continue with --resume" if ckpt and cfg.checkpoint_every else ""
                        raise Interrupted(f"interrupted after step {step + 1} of {total}{where}")
            if shard is not None:
                gather_peak_rss(shard)
            ranks = method.finalize()
            adapter = extract(layers, ranks, teacher, ctx, method.metadata())
            return EngineResult(
                adapter=adapter,
                ranks={p: ranks.get(p, 0) for p in teacher.modules},
                steps=total,
                seconds=time.perf_counter() - t_start,
                losses=losses,
                device=str(accelerator.device),
                num_processes=world,
                parallel=parallel_kind(accelerator, sharded),
                sharding=shard,
                teacher_cache_mb=loop.cache_mb(),
                teacher_targets=loop.targets_info(),
                student_seconds_per_step=loop.student_time / max(1, loop.steps_run),
                teacher_seconds_per_step=loop.teacher_time / max(1, loop.teacher_runs),
                resumed_from=start or None,
                step_seconds=loop.step_seconds,
            )
        finally:
            if prepared is not None and not sharded:
                accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)  # drop the autocast wrapper
            detach(model)


class _Loop:
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
