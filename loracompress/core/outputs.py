"""Atomic output folders: written under a temporary sibling name, renamed into place on success.

An interrupted run (exception, Ctrl-C, SIGTERM, even ``kill -9``) never leaves a half-written
output at the requested path: at worst a ``.NAME.tmp-*`` sibling, which the next run removes.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from loracompress.errors import LoraCompressError


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_output_path(path: str | Path, force: bool = False, inputs: Sequence[Path | str] = ()) -> Path:
    """Validate an output folder before any work is done, so a long run cannot fail at the end."""
    out = Path(path)
    for src in inputs:
        src = Path(src)
        if not src.exists():
            continue  # the reader says the input is missing; an overlap message would only mislead
        src_dir = src if src.is_dir() else src.parent
        if _is_within(out, src_dir) or _is_within(src_dir, out):
            raise LoraCompressError(
                f"output {out} overlaps the input {src_dir}; choose an output folder outside the input"
            )
    if out.resolve().parent.is_dir():
        _cleanup_stale(out.resolve())  # may put back an output that a killed --force run had moved aside
    if out.exists() and not out.is_dir():
        raise LoraCompressError(f"output {out} exists and is a file; choose a folder path")
    if out.exists() and not force:
        raise LoraCompressError(f"output {out} already exists; pass --force to replace it or choose another -o")
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise LoraCompressError(f"cannot write {out}: {parent} is a file, not a folder; choose another -o")
    if not parent.is_dir():
        raise LoraCompressError(f"cannot write {out}: parent folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LoraCompressError(f"cannot write {out}: no write permission in {parent}; choose another -o")
    return out


def _cleanup_stale(out: Path) -> None:
    """Remove temporary siblings left by earlier runs that were killed (kill -9, power loss)."""
    # escape: an output named "run[1]" must not match (and delete) the temp folder of "run1"
    for kind in ("tmp", "old"):
        for stale in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            pid = stale.name.rsplit("-", 2)[-2] if stale.name.count("-") >= 2 else ""
            if pid.isdigit() and _pid_alive(int(pid)):
                continue  # another run is writing right now
            if kind == "old" and not out.exists():
                stale.rename(out)  # killed between the two renames of --force: put the previous output back
                continue
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_output_dir(path: str | Path, force: bool = False, inputs: Sequence[Path | str] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path``, on any failure it is removed."""
    out = check_output_path(path, force=force, inputs=inputs).resolve()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            try:
                _move_into_place(tmp, out)
            except BaseException:
                old.rename(out)  # the previous output stays where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            _move_into_place(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise LoraCompressError(
                f"disk full while writing {out} ({err.strerror}); free space or raise the quota/file-size limit "
                "and run again (nothing was written)"
            ) from None
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise LoraCompressError(f"cannot write {out}: {err.strerror}; choose another -o") from None
        if getattr(err, "final_move", False):
            raise LoraCompressError(
                f"could not move the finished output into {out} ({err.strerror or err}); check the disk and run "
                "again (nothing was changed)"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path) -> None:
    try:
        tmp.rename(out)
    except OSError as err:
        err.final_move = True  # type: ignore[attr-defined]  # tells the handler above which step failed
        raise
