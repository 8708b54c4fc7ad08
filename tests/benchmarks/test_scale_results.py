"""benchmarks/scale.py's results file: the calibration breakdown, and re-running one command keeps the rest."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import scale  # noqa: E402
from synthetic import LlamaShape, lora_parameters, write_lora  # noqa: E402

GiB = 2**30


def test_lora_parameters_counts_what_write_lora_writes(tmp_path):
    from safetensors import safe_open

    shape = LlamaShape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=100)
    folder = write_lora(tmp_path / "lora", tmp_path / "base", shape, r=4)
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        count = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    assert lora_parameters(shape, 4) == count


def _run(command: str, peak: float, size: str = "0.25B", threads: str | None = "2") -> scale.Run:
    return scale.Run(size, command, 266_888_192, 533_788_960, int(peak * GiB), 10.0, 0, ["python", "-c", "pass"],
                     "", threads)


def test_results_keep_hand_written_notes_and_break_the_calibration_peak_down(tmp_path):
    out = tmp_path / "scale.md"
    out.write_text("# old table\n\n" + scale.NOTES_MARKER + "\n\n## Notes\n\nhand-written\n")
    runs = [_run("baseline", 0.38), _run("merge", 0.57), _run("calibrate", 1.50, threads="1")]
    scale.write_results(runs, out, tmp_path / "scale.png", tmp_path / "scale.json", set())
    text = out.read_text()
    assert "# old table" not in text and text.endswith(scale.NOTES_MARKER + "\n\n## Notes\n\nhand-written\n")
    assert "`OMP_NUM_THREADS` 2 for 0.25B baseline, 0.25B merge; 1 for 0.25B calibrate" in text
    state = lora_parameters(scale.SIZES["0.25B"][0], scale.RANK) * 4 * 7
    row = next(line for line in text.splitlines() if line.startswith("| 0.25B | 1.50 GiB"))
    assert f"{state / GiB:.2f} GiB" in row
    target = (1.50 * GiB - 0.38 * GiB - state) / 533_788_960
    assert row.endswith(f"| {target:.2f}× |")
    scale.write_results(runs, out, tmp_path / "scale.png", tmp_path / "scale.json", set())
    assert out.read_text() == text  # rewriting keeps the notes once, not twice


def test_sharded_row_shows_each_process_against_one_process():
    one = _run("calibrate", 3.89, size="1.1B")
    two = _run("calibrate-fsdp", 2.60, size="1.1B")
    two.process_peaks, two.shard_bytes = [int(2.60 * GiB), int(2.50 * GiB)], [int(0.5 * GiB), int(0.5 * GiB)]
    lines = scale.sharded_rows([one, two])
    row = next(line for line in lines if line.startswith("| 1.1B"))
    assert "| 3.89 GiB | 2.60, 2.50 GiB | 0.67× | 0.50, 0.50 GiB of" in row
    assert scale.sharded_rows([one]) == []  # no sharded run, no section


def test_projection_starts_from_measured_rows():
    ratios = scale.measured_ratios([_run("calibrate", 1.0), _run("merge", 0.5, threads=None)])
    assert ratios["calibrate"] == ratios["calibrate-fsdp"] == GiB / 533_788_960
    assert ratios["merge"] == 0.5 * GiB / 533_788_960


def test_the_4bit_calibration_is_the_same_run_with_the_base_in_nf4(tmp_path):
    """The calibrate-4bit row differs from the calibrate row by --load-in-4bit alone, so the two compare."""
    flags = {"--base-dtype", "--gradient-checkpointing"}
    paths = (tmp_path / "base", tmp_path / "lora", tmp_path / "calib.jsonl", tmp_path / "out")
    plain = scale.argv_for("calibrate", *paths, flags)
    nf4 = scale.argv_for("calibrate-4bit", *paths, flags)
    assert nf4 == [*plain, "--load-in-4bit"]
    assert scale.SIZES["7B"][0].parameters() == 6_738_415_616  # Llama-2-7B's count


def test_a_timed_out_case_is_killed_not_left_running(tmp_path):
    """Regression: on a timeout only /usr/bin/time was killed; its child (a 7B calibration) went on beside the
    next case for minutes, holding 15 GB."""
    import subprocess
    import uuid

    marker = f"lc-timeout-{uuid.uuid4().hex}"
    rc, _, seconds, err = scale.measure([sys.executable, "-c", f"import time; time.sleep(60)  # {marker}"], timeout=1)
    assert rc == -9 and "timed out" in err and seconds < 30
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.strip()
    assert not left, f"the command is still running: {left}"
