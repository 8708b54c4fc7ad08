"""``kill -9`` during a write leaves no partial output folder, and the next run cleans up.

The output is written to a ``.NAME.tmp-PID-*`` sibling and renamed into place, so a process
killed mid-write (which runs no cleanup at all) leaves at worst that sibling. These tests kill a
real ``loracompress prune`` subprocess while it writes and check what is left on disk.
(SIGINT/SIGTERM during calibration and ``--resume`` belong to the engine's tests.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from loracompress.core.reader import load_adapter
from loracompress_cli.app import main
from tests.robustness.hostile import base_config, lora_tensors, stray_temps, write_adapter

REPO = Path(__file__).resolve().parents[2]

# Runs prune with the real writer, but after the files are written the safetensors file is cut
# to half and the process announces itself and sleeps: a run frozen in the middle of its write.
FROZEN_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import loracompress.core.writer as adapter_mod
    from loracompress_cli.app import main

    real = adapter_mod.write_adapter_files

    def frozen(adapter, directory, dtype=None):
        real(adapter, directory, dtype)
        f = directory / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        part = Path(sys.argv[1] + ".part")
        part.write_text(str(directory))
        part.rename(sys.argv[1])  # the test polls for this name: it must never see it empty
        time.sleep(600)

    adapter_mod.write_adapter_files = frozen
    sys.exit(main(sys.argv[2:]))
    """
)


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"prune exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("prune never reached its write")
        time.sleep(0.05)


@contextmanager
def _running(cmd: list[str]) -> Iterator[subprocess.Popen]:
    """A subprocess that is killed and reaped on the way out, whatever happens."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def _kill_mid_write(tmp_path: Path, src: Path, out: Path, *extra: str) -> Path:
    """Start prune in a subprocess, SIGKILL it mid-write; returns the temp folder it was writing."""
    script = tmp_path / "frozen_prune.py"
    script.write_text(FROZEN_WRITER)
    ready = tmp_path / "writing"
    with _running([sys.executable, str(script), str(ready), "prune", str(src), "--budget", "0.5", "-o", str(out),
                   *extra]) as proc:
        _wait_for(ready, proc)
        tmp = Path(ready.read_text())
        assert tmp.parent == out.parent.resolve() and tmp.name.startswith(f".{out.name}.tmp-{proc.pid}-")
        assert (tmp / "adapter_model.safetensors").is_file()  # really caught with a half-written file
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    return tmp


def test_kill_9_mid_write_leaves_no_output_and_next_run_cleans_up(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "adapter")
    out = tmp_path / "small"
    tmp = _kill_mid_write(tmp_path, src, out)
    assert not out.exists(), "a killed run left a partial output folder"
    assert stray_temps(tmp_path) == [tmp.name]  # the only trace: the temp sibling, with a dead pid in its name

    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out)]) == 0
    assert stray_temps(tmp_path) == [], "the next run did not remove the stale temp folder"
    small = load_adapter(out)
    assert small.num_params <= load_adapter(src).num_params // 2
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "compression_report.json"]


def test_kill_9_with_force_keeps_the_previous_output(tmp_path: Path) -> None:
    """--force replaces the old output only at the final rename: killed before it, the old one is intact."""
    src = write_adapter(tmp_path / "adapter")
    out = tmp_path / "small"
    assert main(["prune", str(src), "--budget", "rank=1", "-o", str(out)]) == 0
    old = {name: (out / name).read_bytes() for name in os.listdir(out)}
    _kill_mid_write(tmp_path, src, out, "--force")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == old
    assert load_adapter(out).num_params > 0


def _big_adapter(directory: Path) -> Path:
    """~2 MB of LoRA factors, so that the write is not over before the kill lands."""
    modules = [(f"model.layers.{i}.mlp.up_proj", 512, 512) for i in range(8)]
    return write_adapter(directory, base_config(r=64, alpha=64), lora_tensors(r=64, modules=modules))


@pytest.mark.slow  # ~40 s on a busy 2-core machine; the frozen-writer tests above cover the default run
@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05])
def test_kill_9_real_writer_all_or_nothing(tmp_path: Path, delay: float) -> None:
    """No patching: kill the real writer as soon as (or shortly after) its temp folder appears.

    Whenever the kill lands, the output path holds nothing or a complete adapter.
    """
    src = _big_adapter(tmp_path / "adapter")
    out = tmp_path / "small"
    with _running([sys.executable, "-m", "loracompress", "prune", str(src), "--budget", "0.5", "-o", str(out)]) as proc:
        deadline = time.monotonic() + 240
        while not stray_temps(tmp_path) and not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    if out.exists():  # the rename happened before the kill: then it is complete
        small = load_adapter(out)
        assert small.num_params <= load_adapter(src).num_params // 2
        assert (out / "compression_report.json").is_file()
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out), "--force"]) == 0
    assert stray_temps(tmp_path) == []
    assert load_adapter(out).modules.keys() == load_adapter(src).modules.keys()


def test_live_writers_temp_is_kept_and_dead_ones_removed(tmp_path: Path) -> None:
    """Only temp folders of dead processes are stale; names are matched literally, not as globs."""
    src = write_adapter(tmp_path / "adapter")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        dead_pid = int(dead.stdout)
        out = tmp_path / "run[1]"
        stale = tmp_path / f".run[1].tmp-{dead_pid}-deadbeef"
        live = tmp_path / f".run[1].tmp-{sleeper.pid}-cafecafe"
        other = tmp_path / f".run1.tmp-{dead_pid}-0badf00d"  # another output's temp; "run[1]" as a glob matches it
        for d in (stale, live, other):
            d.mkdir()
            (d / "adapter_model.safetensors").write_bytes(b"partial")
        assert main(["prune", str(src), "--budget", "0.5", "-o", str(out)]) == 0
        assert not stale.exists()
        assert live.exists(), "removed the temp folder of a run that is still writing"
        assert other.exists(), "removed the temp folder of a different output"
        assert load_adapter(out).num_params > 0
    finally:
        sleeper.kill()
        sleeper.wait()


def test_failure_inside_the_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception (not a kill) mid-write: the temp folder is removed on the way out."""
    import loracompress.core.writer as adapter_mod

    real = adapter_mod.write_adapter_files

    def fail(adapter, directory, dtype=None):  # noqa: ANN001, ANN202
        real(adapter, directory, dtype)
        raise KeyboardInterrupt  # Ctrl-C during the write

    monkeypatch.setattr(adapter_mod, "write_adapter_files", fail)
    src = write_adapter(tmp_path / "adapter")
    code = main(["prune", str(src), "--budget", "0.5", "-o", str(tmp_path / "out")])
    assert code == 130
    assert not (tmp_path / "out").exists() and stray_temps(tmp_path) == []
    assert torch.equal(load_adapter(src).modules["model.layers.0.mlp.up_proj"].A,
                       lora_tensors()["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"])


def test_failed_final_rename_with_force_keeps_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--force moves the old output aside, then renames the new one in; if that second rename fails
    the old output is put back, and no .NAME.old-* is left behind."""
    src = write_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = Path.rename

    def rename(self: Path, target: Path | str) -> Path:
        if ".tmp-" in self.name and Path(target) == out.resolve():
            raise OSError(5, "Input/output error")  # the rename of the new output fails
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    capsys.readouterr()
    assert main(["prune", str(src), "--budget", "0.25", "-o", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not move the finished output" in err and "Input/output error" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert stray_temps(tmp_path) == []


def test_output_moved_aside_by_a_killed_run_is_restored(tmp_path: Path) -> None:
    """kill -9 between the two renames of --force leaves only .out.old-PID-*: the next run puts it back
    before it writes (and removes it when a newer output is already in place)."""
    src = write_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.rename(tmp_path / f".out.old-{int(dead.stdout)}-deadbeef")
    code = main(["prune", str(src), "--budget", "0.5", "-o", str(out)])
    assert code == 2  # the restored output exists and --force was not given: refused, nothing changed
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert stray_temps(tmp_path) == []
