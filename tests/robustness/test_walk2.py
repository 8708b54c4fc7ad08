"""The second hostile walk (issue 23), items 3-9: each case failed on the main of that day.

Every refusal is exit 2 with one ``error:`` line and nothing written (the whole temp tree is
compared before and after).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loracompress_cli.app import main
from tests.robustness.hostile import refused as _refused
from tests.robustness.hostile import stray_temps, write_adapter

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- 6. SIGTERM cleans up like SIGINT

# Runs the CLI with the real writer; once the output is complete in its temporary folder (just before
# the rename into place) the process announces the folder and sleeps: a run caught at its fullest.
PAUSED_BEFORE_RENAME = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import loracompress.core.outputs as outputs
    from loracompress_cli.app import main

    def paused(tmp, out):
        part = Path(sys.argv[1] + ".part")
        part.write_text(str(tmp))
        part.rename(sys.argv[1])
        time.sleep(600)

    outputs._move_into_place = paused
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.tiny import make_adapter, save_tiny_base

    root = tmp_path_factory.mktemp("bert")
    adapter, _ = make_adapter("bert", root / "adapter", r=4)
    return {"adapter": adapter, "base": save_tiny_base("bert", root / "base")}


def _terminate_while_writing(tmp_path: Path, args: list[str]) -> tuple[int, str, Path]:
    script = tmp_path / "paused.py"
    script.write_text(PAUSED_BEFORE_RENAME)
    ready = tmp_path / "writing"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(ready), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "never reached the final rename"
            time.sleep(0.05)
        tmp = Path(ready.read_text())
        assert tmp.is_dir() and any(tmp.iterdir())  # really caught with a full temporary folder
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    return proc.returncode, err, tmp


@pytest.mark.parametrize("command", ["merge", "export"])
def test_sigterm_removes_the_temporary_folder(tmp_path: Path, bert: dict[str, Path], command: str) -> None:
    """A container runtime's SIGTERM left a merge's 289 MB of shards behind; now it unwinds as Ctrl-C does."""
    out = tmp_path / "out"
    extra = ["--format", "onnx"] if command == "export" else []
    code, err, tmp = _terminate_while_writing(
        tmp_path, [command, str(bert["adapter"]), "--base-model", str(bert["base"]), *extra, "-o", str(out)])
    assert code == 130, err[-2000:]
    assert "interrupted: nothing was written" in err and "Traceback" not in err, err[-2000:]
    assert not tmp.exists() and not out.exists()
    assert stray_temps(tmp_path) == []


# --------------------------------------------------------------------------- 7. tracebacks become one line


def test_a_legal_250_character_output_name_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The temporary sibling ``.NAME.tmp-PID-RANDOM`` of a 250-character name was longer than 255 bytes."""
    src = write_adapter(tmp_path / "adapter")
    out = tmp_path / ("x" * 250)
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert main(["prune", str(src), "--budget", "0.25", "-o", str(out), "--force"]) == 0  # the .old sibling too
    assert stray_temps(tmp_path) == []
    assert json.loads((out / "compression_report.json").read_text())["budget"]


def test_a_killed_run_with_a_long_name_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    from loracompress.core.outputs import _sibling

    src = write_adapter(tmp_path / "adapter")
    out = tmp_path / ("y" * 250)
    stale = _sibling(out, "tmp")
    stale.mkdir()
    dead = stale.with_name(stale.name.replace(f"-{os.getpid()}-", "-999999999-"))  # a pid no process has
    stale.rename(dead)
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(out)]) == 0
    assert stray_temps(tmp_path) == []


@pytest.mark.parametrize("name", ["z" * 300, "/proc/x"])
def test_an_output_that_cannot_be_made_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    if name.startswith("/proc") and not Path("/proc").is_dir():
        pytest.skip("no /proc")
    src = write_adapter(tmp_path / "adapter")
    out = name if name.startswith("/") else str(tmp_path / name)
    _refused(capsys, tmp_path, ["prune", src, "--budget", "0.5", "-o", out], "cannot write", "choose another -o")


@pytest.mark.parametrize("folder", ["/sys", "/proc"])
def test_report_plot_into_an_unwritable_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            folder: str) -> None:
    """``/sys`` refuses even root (PermissionError), ``/proc`` has no room for files (FileNotFoundError)."""
    pytest.importorskip("matplotlib")
    if not Path(folder).is_dir():
        pytest.skip(f"no {folder}")
    src = write_adapter(tmp_path / "adapter")
    _refused(capsys, tmp_path, ["report", src, "--plot", f"{folder}/ranks.png"], "--plot", "cannot write",
             "choose another path")
