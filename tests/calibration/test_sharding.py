"""Sharded calibration (``--fsdp``, torch FSDP2) on two CPU processes over gloo: the base is split between
them, the LoRA factors stay whole, and the result is the one-process run's on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loracompress.calibration.engine import Engine, EngineConfig, Interrupted, svd_student
from loracompress.calibration.methods.registry import get_method
from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from tests.tiny import make_adapter, tiny_llama

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
STEPS = 6
#: Two processes against one on the same global batch: the all-reduce sums the two halves' gradients in
#: another order than one process's backward does, so the factors drift apart by float32 rounding only.
#: Measured here: largest |ΔW| difference 2.8e-6 against ΔW entries up to 0.93 (IncreLoRA, 6 steps).
ATOL = 1e-5
RTOL = 1e-4


def _batches(n: int, size: int) -> list[dict[str, torch.Tensor]]:
    """``n`` LM batches of ``size`` unpadded 16-token rows: every row has the same token count, so the mean
    over a two-process global batch is the mean of the two processes' means, as in one process."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 96, (n * size, 16), generator=g)
    return [{"input_ids": ids[i * size:(i + 1) * size], "attention_mask": torch.ones(size, 16, dtype=torch.long)}
            for i in range(n)]


def _global_batches() -> list[dict[str, torch.Tensor]]:
    """What one process sees: batch ``j`` joins the two processes' batches ``2j`` and ``2j + 1`` (the engine
    gives process ``r`` the batches ``r, r + 2, ...``), so both runs take the same samples at every step."""
    half = _batches(8, 4)
    return [{k: torch.cat([half[2 * j][k], half[2 * j + 1][k]]) for k in half[0]} for j in range(4)]


def _run(adapter_dir: Path, batches, model=None, method=None, progress=None, **cfg):
    adapter = load_adapter(adapter_dir)
    model = tiny_llama(0) if model is None else model
    config = EngineConfig(steps=STEPS, lr=5e-3, device="cpu", seed=3, **cfg)
    return Engine(config).run(model, adapter, svd_student(adapter), method or get_method("increlora"),
                              int(adapter.num_params * 0.3), batches, "lm", progress=progress)


def _join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _sharded_worker(rank: int, port: int, root: str) -> None:
    """One of the two processes: a sharded run, and the parameters' local shapes while it runs."""
    _join(rank, port)
    out = Path(root)
    model = tiny_llama(0)
    method = get_method("increlora")
    shapes: dict[str, dict] = {}
    teacher: dict[str, list[int]] = {}
    setup = method.setup

    def watched(ctx):  # the model as the run holds it: sharded, the LoRA layers attached
        setup(ctx)
        for n, p in model.named_parameters():
            shapes[n] = {"global": list(p.shape), "local": list(p.to_local().shape) if hasattr(p, "to_local") else None}
        teacher.update({n: list(b.shape) for n, b in model.named_buffers() if n.endswith((".A0", ".B0"))})

    method.setup = watched
    result = _run(out / "adapter", _batches(8, 4), fsdp=True, model=model, method=method)
    (out / f"rank{rank}.json").write_text(json.dumps({"shapes": shapes, "teacher": teacher,
                                                      "run": result.summary(), "ranks": result.ranks}))
    if rank == 0:
        torch.save({p: m.delta() for p, m in result.adapter.modules.items()}, out / "fsdp.pt")


def _resume_worker(rank: int, port: int, root: str) -> None:
    """One of the two processes: an uninterrupted sharded run; one interrupted after step 3 (a SIGINT on
    process 0 stops both after the step), then resumed."""
    _join(rank, port)
    out = Path(root)
    full = _run(out / "adapter", _batches(8, 4), fsdp=True)
    ckpt = out / "ckpt"

    def stop(step, total, loss, eta):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    try:
        _run(out / "adapter", _batches(8, 4), progress=stop, fsdp=True, checkpoint_every=2, checkpoint_dir=ckpt)
    except Interrupted:
        pass
    else:
        raise AssertionError("the run was not interrupted")
    resumed = _run(out / "adapter", _batches(8, 4), fsdp=True, checkpoint_every=2, checkpoint_dir=ckpt, resume=True)
    if rank == 0:
        torch.save({"from": resumed.resumed_from, **{p: m.delta() for p, m in resumed.adapter.modules.items()}},
                   out / "resumed.pt")
        torch.save({p: m.delta() for p, m in full.adapter.modules.items()}, out / "full.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_cpu_processes_shard_the_base_and_match_one_process(tmp_path):
    make_adapter("llama", tmp_path / "adapter", r=8)
    torch.multiprocessing.spawn(_sharded_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = _run(tmp_path / "adapter", _global_batches())
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    # Each process holds only its dim-0 shard of every base weight; the LoRA factors are whole on both.
    for rank, rep in enumerate(reports):
        base = {n: s for n, s in rep["shapes"].items() if not n.endswith((".A", ".B"))}
        assert base and all(s["local"] is not None for s in base.values())
        for name, s in base.items():
            rows = s["global"][0]
            want = min(-(-rows // WORLD), max(0, rows - rank * -(-rows // WORLD)))
            assert s["local"] == [want, *s["global"][1:]], name
        lora = {n: s for n, s in rep["shapes"].items() if n.endswith((".A", ".B"))}
        assert lora and all(s["local"] is None for s in lora.values())  # plain tensors, not DTensors
        assert rep["teacher"] and len(rep["teacher"]) == len(lora)  # the teacher's factors: whole buffers
        sharding = rep["run"]["sharding"]
        assert sharding["processes"] == WORLD and sharding["blocks"] == 3
        assert all(b < sharding["base_bytes"] for b in sharding["shard_bytes"])
        assert sum(sharding["shard_bytes"]) == sharding["base_bytes"]
        assert all(m is not None and m > 0 for m in sharding["peak_rss_mib"])
        assert rep["run"]["parallel"] == "fsdp" and rep["run"]["num_processes"] == WORLD
    assert reports[0]["ranks"] == reports[1]["ranks"] == single.ranks  # IncreLoRA grew the same ranks

    # The adapter equals the one-process run on the same global batch.
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert set(sharded) == set(single.adapter.modules)
    for path, m in single.adapter.modules.items():
        torch.testing.assert_close(sharded[path], m.delta(), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_an_interrupted_sharded_run_resumes_to_the_same_result(tmp_path):
    """Checkpoints hold the whole LoRA factors (the same on every process), written by process 0 only."""
    make_adapter("llama", tmp_path / "adapter", r=8)
    torch.multiprocessing.spawn(_resume_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert resumed.pop("from") == 3  # the SIGINT during step 3 saved a checkpoint after it (replacing step 2's)
    assert set(resumed) == set(full)
    for path, delta in full.items():
        torch.testing.assert_close(resumed[path], delta, atol=0, rtol=0)  # measured: bit-identical


def test_fsdp_without_a_launcher_is_a_one_line_error(tmp_path):
    make_adapter("llama", tmp_path / "adapter", r=8)
    with pytest.raises(LoraCompressError, match="torchrun --nproc-per-node"):
        _run(tmp_path / "adapter", _batches(2, 4), fsdp=True)


def test_fsdp_flag_errors_name_the_fix(tmp_path, capsys):
    from loracompress_cli.app import main
    from tests.calibration.test_engine import calib_files

    files = calib_files(tmp_path / "f", "llama")
    capsys.readouterr()  # the fixture's own output
    common = ["prune", str(files["adapter"]), "--budget", "0.25", "--base-model", str(files["base"]), "--fsdp",
              "-o", str(tmp_path / "o")]
    for extra, message in ((["--method", "svd"], "--fsdp applies to calibration"),
                           (["--data", str(files["data"]), "--device", "cpu"], "torchrun --nproc-per-node")):
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_fsdp_write_one_report(tmp_path):
    """The documented command: ``torchrun --nproc-per-node 2 -m loracompress prune ... --device cpu --fsdp``."""
    from tests.calibration.test_engine import calib_files

    files = calib_files(tmp_path / "f", "llama")
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "loracompress", "prune",
           str(files["adapter"]), "--method", "increlora", "--budget", "0.25", "--base-model", str(files["base"]),
           "--data", str(files["data"]), "--steps", "6", "--batch-size", "8", "--seq-len", "32", "--device", "cpu",
           "--fsdp", "--gradient-checkpointing", "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "compression_report.json").read_text())
    run = report["settings"]["run"]
    assert run["parallel"] == "fsdp" and run["num_processes"] == 2
    assert report["settings"]["engine"]["fsdp"] is True
    sharding = run["sharding"]
    assert sharding["processes"] == 2 and all(b < sharding["base_bytes"] for b in sharding["shard_bytes"])
    assert report["quality"]["kl"] >= 0  # the held-out evaluation ran on the sharded model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "o"]  # one output, no leftovers
    assert load_adapter(out).num_params == report["params_after"]
