"""The one calibration loop: distil the original adapter into a smaller one on the user's data.

The engine wraps every adapter module of the (frozen) base model in a
:class:`~loracompress.runtime.layers.LoraLayer` holding two factor sets over **one** copy of the base
weights: the *student* (trainable, initialised from the checkpoint in SVD order) and the
*teacher* (the original adapter, frozen). Each step:

1. ``method.before_forward(step)``
2. teacher logits: a no-grad forward in ``"teacher"`` mode (cached per batch when the data is
   reused across epochs and the cache fits ``teacher_cache_mb``),
3. student forward, loss = ``kd_weight · T² · KL(teacher_T ‖ student_T)`` + ``task_weight · CE``
   (the task term only when the batch has labels), backward (DDP all-reduce),
4. ``method.after_backward(step)``, gradient clipping, AdamW step on the student A/B only
   (learning rate: linear warm-up, then cosine or linear decay),
5. ``method.after_step(step)``, progress callback, checkpoint every ``checkpoint_every`` steps.

At the end ``method.finalize()`` gives per-module ranks (met through
:func:`loracompress.core.budget.allocate`); the surviving components of each module are
re-factorised in SVD order (scale folded) into the result :class:`~loracompress.core.adapter.Adapter`.

Built on ``accelerate``: CPU, CUDA, bf16/fp16 mixed precision, and several processes
(``accelerate launch -m loracompress prune ...``, DDP: every process trains on its own shard of
the batches; everything a method decides from is identical on every process, or reduced with
``ctx.extras["reduce_mean"]``).

Interruption and resuming: SIGINT/SIGTERM finish the current step, save a checkpoint when
checkpointing is on, and raise :class:`Interrupted` (nothing is written to the output). A
checkpoint is a folder ``step-NNNNNNNN`` holding ``state.safetensors`` (student factors, masks,
optimizer moments, method tensors) and ``state.json`` (step, settings fingerprint, optimizer
groups, method values), never a pickle. Resuming restores all of it; the data order is a pure
function of ``(seed, epoch)``, so a resumed run ends with the same bytes as an uninterrupted one.
Optional method attributes the engine uses when present:

- ``state_dict() -> dict[str, Tensor | JSON value]`` and ``load_state_dict(state)``: state kept
  across steps (EMAs, rewind points), saved in checkpoints so that resuming is exact;
- ``schedule_restarts() -> list[int]``: steps where the learning-rate schedule starts again
  (warm-up and decay), e.g. where LoRPA rewinds and retrains.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracompress.calibration.methods.base import CalibContext, Method
from loracompress.core.adapter import ORDER_KEY, Adapter, LoraModule
from loracompress.core.linalg import lowrank_svd
from loracompress.errors import LoraCompressError
from loracompress.runtime.data import IGNORE_INDEX, model_inputs
from loracompress.runtime.layers import LoraLayer, attach, detach, use_mode

log = logging.getLogger(__name__)

#: step (1-based), total steps, loss of that step, estimated seconds left
ProgressFn = Callable[[int, int, float, float], None]

#: Without --steps/--epochs: this many passes over the data, capped at DEFAULT_MAX_STEPS steps.
#: Sized so the bundled MiniLM sample (900 calibration reviews, batch 16) calibrates in well
#: under 5 minutes on a 2-core CPU (see docs/calibration.md for the measurement).
DEFAULT_EPOCHS = 3.0
DEFAULT_MAX_STEPS = 300
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
CKPT_TENSORS = "state.safetensors"
CKPT_JSON = "state.json"


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the calibration after a complete step (a checkpoint may have been saved)."""


@dataclass
class EngineConfig:
    """How to train. Validated on construction; errors name the flag to fix."""

    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    warmup: float = 0.1  # fraction of the steps (< 1) or a number of steps (>= 1)
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    kd_weight: float = 1.0
    task_weight: float = 1.0
    temperature: float = 2.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    cache_teacher: bool | None = None  # None: cache when the data is reused and the cache fits
    teacher_cache_mb: float = 1024.0
    checkpoint_every: int | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise LoraCompressError(f"--steps must be at least 1 (got {self.steps})")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise LoraCompressError(f"--epochs must be a positive number (got {self.epochs})")
        if self.steps is not None and self.epochs is not None:
            raise LoraCompressError("give --steps or --epochs, not both")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LoraCompressError(f"--lr must be a positive number (got {self.lr})")
        if not (self.warmup >= 0 and math.isfinite(self.warmup)):
            raise LoraCompressError(f"--warmup must be >= 0: a fraction of the steps or a step count (got {self.warmup})")
        if self.schedule not in SCHEDULES:
            raise LoraCompressError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.kd_weight < 0 or self.task_weight < 0 or self.kd_weight + self.task_weight == 0:
            raise LoraCompressError("--kd-weight and --task-weight must be >= 0 and not both 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise LoraCompressError(f"--temperature must be positive (got {self.temperature})")
        if self.precision not in PRECISIONS:
            raise LoraCompressError(f"unknown --precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise LoraCompressError(f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})")
        if (self.checkpoint_every or self.resume) and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every/resume need checkpoint_dir")

    def total_steps(self, batches_per_epoch: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * batches_per_epoch))
        return max(1, min(DEFAULT_MAX_STEPS, math.ceil(DEFAULT_EPOCHS * batches_per_epoch)))

    def warmup_steps(self, total: int) -> int:
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * total))


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

    def summary(self) -> dict[str, Any]:
        tail = self.losses[-max(1, len(self.losses) // 10):] if self.losses else []
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "num_processes": self.num_processes,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "teacher_cache_mb": self.teacher_cache_mb,
            "student_seconds_per_step": round(self.student_seconds_per_step, 5),
            "teacher_seconds_per_step": round(self.teacher_seconds_per_step, 5),
            "resumed_from": self.resumed_from,
        }


# --------------------------------------------------------------------------- objective


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
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
    """
    s, t = student.float(), teacher.float()
    parts: dict[str, float] = {}
    total = s.new_zeros(())
    if task == "lm":
        s, t = s[:, :-1], t[:, :-1]
        if labels is not None:
            valid = labels[:, 1:] != IGNORE_INDEX
        elif attention_mask is not None:
            valid = attention_mask[:, 1:] != 0
        else:
            valid = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
        s_v, t_v = s[valid], t[valid]  # [N, V]
        if s_v.shape[0] == 0:
            return total + 0.0 * s.sum(), parts  # nothing counted in this batch
        if kd_weight > 0:
            kd = _kl(s_v, t_v, temperature)
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


def _kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(t/T) ‖ softmax(s/T))``, times ``T²`` (Hinton et al.)."""
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at 0-based ``step``: linear warm-up, then decay towards 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)  # the last step still learns a little
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def module_depths(paths: Sequence[str]) -> tuple[dict[str, int], int]:
    """Block index of each module path (its first numeric path component; -1 outside blocks), and the block count."""
    depth = {}
    for p in paths:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", p)
        depth[p] = int(m[1]) if m else -1
    return depth, max([d for d in depth.values()], default=-1) + 1 or 1


def svd_student(adapter: Adapter) -> Adapter:
    """The adapter at full rank, each module in SVD order with its scale folded (the student's start).

    Through the ``r×r`` cores, one module at a time: no float64 ``U``/``V`` of every module at once.
    """
    from loracompress.cuts.svd import truncated_adapter

    return truncated_adapter(adapter, None, {p: m.rank for p, m in adapter.modules.items()})


# --------------------------------------------------------------------------- signals


class _StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads after each step; a second signal stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: stop now (the output is still not written)
        self.signum = signum
        log.warning("%s received: stopping after this step (send it again to stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- accelerate


def make_accelerator(device: str, precision: str) -> Any:
    """An ``Accelerator`` for ``device`` ("auto", "cpu", "cuda", "cuda:N") and ``precision``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    dev = device.lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", dev):
        raise LoraCompressError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoraCompressError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
        if ":" in dev:
            index = int(dev.split(":")[1])
            if index >= torch.cuda.device_count():
                raise LoraCompressError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
            torch.cuda.set_device(index)
    cpu = dev == "cpu" or (dev == "auto" and not torch.cuda.is_available())
    if precision == "fp16" and cpu:
        raise LoraCompressError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    mixed = "no" if precision == "fp32" else precision
    partial = PartialState._shared_state
    distributed = bool(partial) and partial.get("num_processes", 1) > 1
    state = AcceleratorState._shared_state
    if state and not distributed:
        # One process running several calibrations (a library user, the tests): start afresh
        # rather than refusing another precision or device.
        AcceleratorState._reset_state(reset_partial_state=True)
    # Buffers (masks, teacher factors) are the same on every process: no need to broadcast them.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=[ddp])


# --------------------------------------------------------------------------- the engine


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
        ``fingerprint`` identifies the run for checkpoints: resuming with other settings is refused.
        """
        cfg = self.config
        if task not in ("cls", "lm"):
            raise ValueError(f"task must be 'cls' or 'lm', not {task!r}")
        if not batches:
            raise LoraCompressError("no calibration batches; pass more data")
        t_start = time.perf_counter()
        accelerator = make_accelerator(cfg.device, cfg.precision)
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
              "target_params": int(target_params), "method": method.describe()}
        fp = json.loads(json.dumps(fp, default=str))

        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()  # dropout off: the student learns the teacher's deterministic function
        layers = attach(model, student, teacher=teacher, trainable=True)
        prepared: nn.Module | None = None
        try:
            for layer in layers.values():
                for p in (layer.A, layer.B):
                    if p.numel() == 0:
                        p.requires_grad_(False)  # an empty factor takes no part (and DDP needs every trainable one used)
            model.to(accelerator.device)
            params = [p for layer in layers.values() for p in (layer.A, layer.B) if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            depth, num_layers = module_depths(list(layers))
            ctx = CalibContext(
                layers=layers, target_params=int(target_params), total_steps=total, optimizer=optimizer,
                seed=cfg.seed, depth=depth, num_layers=num_layers,
                extras={"task": task, "num_processes": world, "reduce_mean": _reducer(accelerator)},
            )
            method.setup(ctx)
            with warnings.catch_warnings():  # torch deprecates broadcast_buffers; False is still what we mean
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                prepared, opt = accelerator.prepare(model, optimizer)
            start = 0
            losses: list[float] = []
            ckpt = _Checkpoints(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
            if cfg.resume and ckpt is not None:
                start, losses = ckpt.load(layers, optimizer, accelerator, method, fp)
                log.info("resuming at step %d of %d from %s", start, total, ckpt.root)
            elif ckpt is not None and ckpt.latest() is not None and accelerator.is_main_process:
                log.info("starting afresh; an earlier checkpoint in %s is replaced (pass --resume to continue it)", ckpt.root)
                ckpt.clear()
            loop = _Loop(cfg, accelerator, model, prepared, layers, opt, params, method, local, task, total, warmup)
            with _StopRequest() as stop:
                for step in range(start, total):
                    losses.append(loop.step(step))
                    if progress is not None and accelerator.is_main_process:
                        done = step + 1 - start
                        eta = (time.perf_counter() - loop.t0) / done * (total - step - 1)
                        progress(step + 1, total, losses[-1], eta)
                    stopping = _any_process(accelerator, stop.signum is not None)
                    last = step + 1 == total
                    due = cfg.checkpoint_every is not None and (step + 1) % cfg.checkpoint_every == 0 and not last
                    if ckpt is not None and cfg.checkpoint_every is not None and (due or (stopping and not last)):
                        ckpt.save(step + 1, layers, optimizer, accelerator, method, fp, losses)
                    if stopping and not last:
                        where = f"; checkpoint saved in {ckpt.root}, continue with --resume" if ckpt and cfg.checkpoint_every else ""
                        raise Interrupted(f"interrupted after step {step + 1} of {total}{where}")
            ranks = method.finalize()
            adapter = _extract(layers, ranks, teacher, ctx, method.metadata())
            return EngineResult(
                adapter=adapter,
                ranks={p: ranks.get(p, 0) for p in teacher.modules},
                steps=total,
                seconds=time.perf_counter() - t_start,
                losses=losses,
                device=str(accelerator.device),
                num_processes=world,
                teacher_cache_mb=loop.cache_mb(),
                student_seconds_per_step=loop.student_time / max(1, loop.steps_run),
                teacher_seconds_per_step=loop.teacher_time / max(1, loop.teacher_runs),
                resumed_from=start or None,
                step_seconds=loop.step_seconds,
            )
        finally:
            if prepared is not None:
                accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)  # drop the autocast wrapper
            detach(model)


def remove_checkpoints(checkpoint_dir: Path | None) -> None:
    """Delete a run's checkpoint folder (after its output was written)."""
    if checkpoint_dir is not None and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _reducer(accelerator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if accelerator.num_processes == 1:
        return lambda t: t
    return lambda t: accelerator.reduce(t.contiguous(), reduction="mean")


def _any_process(accelerator: Any, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


class _Loop:
    """The per-step work, with the teacher-logit cache and timings."""

    def __init__(self, cfg: EngineConfig, accelerator: Any, model: nn.Module, prepared: nn.Module,
                 layers: dict[str, LoraLayer], optimizer: Any, params: list[nn.Parameter], method: Method,
                 batches: list[Mapping[str, torch.Tensor]], task: str, total: int, warmup: int):
        self.cfg, self.acc, self.model, self.prepared = cfg, accelerator, model, prepared
        self.layers, self.opt, self.params, self.method = layers, optimizer, params, method
        self.batches, self.task, self.total, self.warmup = batches, task, total, warmup
        reused = total > len(batches)
        self.cache: dict[int, torch.Tensor] | None = {} if (cfg.cache_teacher or (cfg.cache_teacher is None and reused)) else None
        self._order: tuple[int, list[int]] | None = None
        restarts = getattr(method, "schedule_restarts", None)
        self.restarts = sorted({int(r) for r in (restarts() if callable(restarts) else []) if 0 < int(r) < total})
        self.t0 = time.perf_counter()
        self.student_time = self.teacher_time = 0.0
        self.step_seconds: list[float] = []
        self.steps_run = self.teacher_runs = 0

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

    def teacher_logits(self, idx: int, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.cache is not None and idx in self.cache:
            return self.cache[idx]
        t = time.perf_counter()
        with use_mode(self.layers, "teacher"), torch.no_grad(), self.acc.autocast():
            logits = self.model(**inputs).logits.detach().float()
        self.teacher_time += time.perf_counter() - t
        self.teacher_runs += 1
        if self.cache is not None:
            per_batch_mb = logits.numel() * logits.element_size() / 2**20
            if not self.cache and per_batch_mb * len(self.batches) > self.cfg.teacher_cache_mb:
                log.info("teacher logits would take %.0f MB; computing them every step instead of caching",
                         per_batch_mb * len(self.batches))
                self.cache = None
            else:
                self.cache[idx] = logits
        return logits

    def step(self, step: int) -> float:
        cfg, acc = self.cfg, self.acc
        idx = self.batch_index(step)
        raw = self.batches[idx]
        batch = model_inputs(raw, acc.device)
        labels = raw["labels"].to(acc.device) if "labels" in raw else None
        self.method.before_forward(step)
        t_logits = self.teacher_logits(idx, batch)
        t = time.perf_counter()
        out = self.prepared(**batch)
        loss, _ = distillation_loss(out.logits, t_logits, labels, batch.get("attention_mask"), self.task,
                                    temperature=cfg.temperature, kd_weight=cfg.kd_weight, task_weight=cfg.task_weight)
        if not loss.requires_grad:
            if self.task == "cls":
                raise LoraCompressError("nothing to train on: the data has no labels and --kd-weight is 0; raise --kd-weight")
            loss = (out.logits * 0.0).sum()  # an LM batch with no counted token: a no-op step, same on every process
        acc.backward(loss)
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
        return round(sum(t.numel() * t.element_size() for t in self.cache.values()) / 2**20, 3)


def _extract(layers: Mapping[str, LoraLayer], ranks: Mapping[str, int], teacher: Adapter, ctx: CalibContext,
             metadata: Mapping[str, str]) -> Adapter:
    """Keep each module's first ``ranks[p]`` active components, scale folded.

    They are re-factorised in SVD order (balanced factors), so the output truncates well again,
    unless the method declares its own component order in ``metadata`` (e.g. DyLoRA's nested one).
    """
    reorder = ORDER_KEY not in metadata
    spent = 0
    modules: dict[str, LoraModule] = {}
    for path, layer in layers.items():
        k = int(ranks.get(path, 0))
        if k <= 0:
            continue
        kept = layer.to_module(apply_mask=True)
        if kept.rank < k:
            raise RuntimeError(f"method asked for rank {k} in {path} but only {kept.rank} components are active")
        if reorder:
            A, B = lowrank_svd(kept.B[:, :k], kept.A[:k], kept.scale).factors(k, torch.float32)
        else:
            root = math.sqrt(abs(kept.scale))
            A, B = kept.A[:k] * root, kept.B[:, :k] * (root * math.copysign(1.0, kept.scale))
        modules[path] = LoraModule(A=A.contiguous(), B=B.contiguous(), scale=1.0)
        spent += k * ctx.cost(path)
    if spent > ctx.target_params:
        raise RuntimeError(f"method exceeded the budget: {spent} > {ctx.target_params} parameters")
    return teacher.replace(modules, metadata={**teacher.metadata, ORDER_KEY: "svd", **metadata})


# --------------------------------------------------------------------------- checkpoints


class _Checkpoints:
    """``ROOT/step-NNNNNNNN/{state.safetensors,state.json}``; the newest complete one wins."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def latest(self) -> Path | None:
        found = sorted(p for p in self.root.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name)
                       and (p / CKPT_JSON).is_file() and (p / CKPT_TENSORS).is_file())
        return found[-1] if found else None

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def save(self, step: int, layers: Mapping[str, LoraLayer], optimizer: torch.optim.Optimizer, accelerator: Any,
             method: Method, fingerprint: Mapping[str, Any], losses: list[float]) -> None:
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            tensors: dict[str, torch.Tensor] = {}
            for path, layer in layers.items():
                tensors[f"layer.{path}.A"] = layer.A.detach()
                tensors[f"layer.{path}.B"] = layer.B.detach()
                tensors[f"layer.{path}.mask"] = layer.mask.detach()
            opt_state = optimizer.state_dict()
            opt_values: dict[str, Any] = {}
            for pid, st in opt_state["state"].items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"opt.{pid}.{k}"] = v.detach()
                    else:
                        opt_values[f"{pid}.{k}"] = v
            method_values: dict[str, Any] = {}
            state_fn = getattr(method, "state_dict", None)
            for k, v in (state_fn() if callable(state_fn) else {}).items():
                if isinstance(v, torch.Tensor):
                    tensors[f"method.{k}"] = v.detach()
                else:
                    method_values[k] = v
            info = {
                "step": step,
                "fingerprint": fingerprint,
                "optimizer_groups": opt_state["param_groups"],
                "optimizer_values": opt_values,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "method": method_values,
                "losses": losses,
            }
            self.root.mkdir(parents=True, exist_ok=True)
            final = self.root / f"step-{step:08d}"
            tmp = self.root / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp / CKPT_TENSORS),
                      metadata={"step": str(step)})
            (tmp / CKPT_JSON).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.root.glob("step-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def load(self, layers: Mapping[str, LoraLayer], optimizer: torch.optim.Optimizer, accelerator: Any,
             method: Method, fingerprint: Mapping[str, Any]) -> tuple[int, list[float]]:
        from safetensors.torch import load_file

        where = self.latest()
        if where is None:
            raise LoraCompressError(f"--resume: no checkpoint in {self.root}; run without --resume to start afresh")
        try:
            info = json.loads((where / CKPT_JSON).read_text(encoding="utf-8"))
            tensors = load_file(str(where / CKPT_TENSORS))
        except (OSError, ValueError) as err:
            raise LoraCompressError(f"--resume: checkpoint {where} is unreadable ({err}); delete {self.root} and run without --resume") from None
        old = info.get("fingerprint", {})
        diff = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
        if diff:
            k = diff[0]
            raise LoraCompressError(
                f"--resume: the checkpoint in {self.root} was made with {k}={old.get(k)!r}, this run has "
                f"{fingerprint.get(k)!r}; rerun with the same settings or drop --resume"
            )
        dev = accelerator.device
        with torch.no_grad():
            for path, layer in layers.items():
                for name in ("A", "B", "mask"):
                    getattr(layer, name).copy_(tensors[f"layer.{path}.{name}"].to(dev))
        state: dict[int, dict[str, Any]] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        for key, v in info.get("optimizer_values", {}).items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        groups = info["optimizer_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        if info.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(info["scaler"])
        load_fn = getattr(method, "load_state_dict", None)
        if callable(load_fn):
            mstate: dict[str, Any] = dict(info.get("method", {}))
            mstate.update({k[len("method."):]: v.to(dev) for k, v in tensors.items() if k.startswith("method.")})
            load_fn(mstate)
        return int(info["step"]), [float(x) for x in info.get("losses", [])]


def config_dict(cfg: EngineConfig) -> dict[str, Any]:
    """The settings recorded in the compression report."""
    d = asdict(cfg)
    d.pop("checkpoint_dir", None)
    return {k: v for k, v in d.items() if v is not None}


__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_MAX_STEPS",
    "Engine",
    "EngineConfig",
    "EngineResult",
    "Interrupted",
    "ProgressFn",
    "config_dict",
    "distillation_loss",
    "lr_factor",
    "module_depths",
    "remove_checkpoints",
    "svd_student",
]
