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
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
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
from loracompress.calibration.engine.checkpoints import Checkpoints
from loracompress.calibration.engine.config import EngineConfig
from loracompress.calibration.engine.recompute import gradient_checkpointing
from loracompress.calibration.engine.sharding import (
    ShardInfo,
    check_shardable,
    fsdp_requested,
    gather_peak_rss,
    shard_base,
)
from loracompress.calibration.engine.signals import StopRequest
from loracompress.calibration.engine.step import StepLoop
from loracompress.calibration.engine.student import extract
from loracompress.calibration.methods.base import CalibContext, Method
from loracompress.core import jsonio
from loracompress.core.adapter import Adapter
from loracompress.errors import LoraCompressError
from loracompress.runtime.bf16_compute import native_bf16_matmul, upcast_frozen_linears
from loracompress.runtime.layers import attach, detach

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
        if not native_bf16_matmul(str(accelerator.device)):
            # before sharding: fully_shard swaps the layers' classes, the instance's forward stays
            upcast = upcast_frozen_linears(model)
            if upcast:
                log.info("this CPU has no native bf16 products: %d bf16 layers compute in fp32", upcast)
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
            loop = StepLoop(cfg, accelerator, model, prepared, layers, opt, params, method, local, task, total, warmup,
                         sharded)
            with StopRequest() as stop, gradient_checkpointing(model, cfg.gradient_checkpointing):
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
