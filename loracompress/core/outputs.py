"""Atomic output folders: written under a temporary sibling name, renamed into place on success.

An interrupted run (exception, Ctrl-C, SIGTERM, even ``kill -9``) never leaves a half-written
output at the requested path: at worst a ``.NAME.tmp-*`` sibling, which the next run removes.
An existing output is replaced (``force``) only when loracompress wrote it or it is empty, and never
when it is the current folder or an input of the run.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from loracompress.errors import LoraCompressError

#: The record file each loracompress command writes into its output folder (prune: compression_report.json;
#: truncate with several budgets: truncate_report.json; merge; export; bank: bank.json). ``--force`` replaces only a folder
#: holding one of these, or an empty folder: never a folder the tool did not make.
OUTPUT_RECORDS = ("compression_report.json", "truncate_report.json", "merge_report.json", "export_report.json",
                  "bank.json")
#: An adapter input given as one of its own files stands for its folder.
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _check_inputs(out: Path, inputs: Sequence[Path | str | None]) -> None:
    """An output never equals, holds or sits inside an input folder, and never is or holds an input file."""
    for src in inputs:
        if src is None or str(src) == "":
            continue
        src = Path(src)
        if not src.exists():
            continue  # a hub id, or a missing path the reader reports; an overlap message would only mislead
        if src.is_file() and src.name in _ADAPTER_FILES:
            src = src.parent
        if src.is_dir():
            overlaps = _is_within(out, src) or _is_within(src, out)
        else:  # a data file, a .gguf base: writing beside it is fine, replacing it (or a folder holding it) is not
            overlaps = _is_within(src, out) or _is_within(out, src)
        if overlaps:
            raise LoraCompressError(
                f"output {out} overlaps the input {src}; choose an output folder outside the input"
            )


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (the folder ``-o``'s missing parents are made in)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _check_not_cwd(out: Path) -> None:
    if out.exists() and _is_within(Path.cwd(), out):
        raise LoraCompressError(
            f"refusing to replace {out}: it is the current folder or holds it; choose a new -o (e.g. -o out/small)"
        )


def _check_replaceable(out: Path, force: bool) -> None:
    """An existing output: only a folder loracompress wrote (or an empty one), and only with ``force``."""
    resolved = out.resolve()
    _check_not_cwd(out)
    if not out.is_dir():
        raise LoraCompressError(f"output {out} exists and is a file; choose a folder path")
    try:
        names = {p.name for p in resolved.iterdir()}
    except OSError as err:
        raise LoraCompressError(f"cannot read the existing output {out} ({err.strerror}); choose another -o") from None
    if names and not names & set(OUTPUT_RECORDS):
        raise LoraCompressError(
            f"output {out} already exists and loracompress did not write it (no {', '.join(OUTPUT_RECORDS)} in it); "
            "--force replaces only loracompress outputs: choose another -o, or empty the folder yourself"
        )
    if not force:
        raise LoraCompressError(f"output {out} already exists; pass --force to replace it or choose another -o")


def check_output_path(
    path: str | Path, force: bool = False, inputs: Sequence[Path | str | None] = ()
) -> Path:
    """Validate an output folder before any work is done, so a long run cannot fail at the end.

    ``inputs``: every path the command reads (adapters, base model, data files, reference, graph):
    the output may not overlap any of them, ``--force`` or not.
    """
    out = Path(path)
    try:
        _check_not_cwd(out)
        _check_inputs(out, inputs)
        if out.resolve().parent.is_dir():
            _cleanup_stale(out.resolve())  # may put back an output that a killed --force run had moved aside
        if out.exists():
            _check_replaceable(out, force)
        anchor = _nearest_existing(out.resolve().parent)
    except OSError as err:  # a name longer than the file system allows, a path through a file ...
        raise LoraCompressError(f"cannot write {out} ({err.strerror or err}); choose another -o") from None
    if not anchor.is_dir():
        raise LoraCompressError(f"cannot write {out}: {anchor} is a file, not a folder; choose another -o")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise LoraCompressError(f"cannot write {out}: no write permission in {anchor}; choose another -o")
    return out


#: Longest file name (bytes) the common file systems allow; a temp sibling must fit in it too.
_NAME_MAX = 255
#: What a sibling adds to the stem: "." + ".tmp-" + a pid (up to 10 digits) + "-" + 8 hex digits.
_SIBLING_EXTRA = 1 + 5 + 10 + 1 + 8


def sibling_stem(out: Path) -> str:
    """The part of a temp sibling's name that stands for ``out``: its name, or, when the sibling would then be
    longer than a file name may be (a legal 250-character ``-o``), a prefix of it and a hash of the whole.
    Deterministic, so the next run finds a killed run's leftovers under the same stem."""
    raw = os.fsencode(out.name)
    if len(raw) + _SIBLING_EXTRA <= _NAME_MAX:
        return out.name
    prefix = raw[:96].decode("utf-8", "ignore")  # a cut inside a multi-byte character drops that character
    return f"{prefix}~{hashlib.sha256(raw).hexdigest()[:16]}"


def _sibling(out: Path, kind: str) -> Path:
    """A fresh ``.NAME.{kind}-PID-RANDOM`` beside ``out`` (the pid tells a later run whether its writer lives)."""
    return out.parent / f".{sibling_stem(out)}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _cleanup_stale(out: Path) -> None:
    """Remove temporary siblings left by earlier runs that were killed (kill -9, power loss)."""
    # escape: an output named "run[1]" must not match (and delete) the temp folder of "run1"
    for kind in ("tmp", "old"):
        for stale in sorted(out.parent.glob(f".{glob.escape(sibling_stem(out))}.{kind}-*")):
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


def file_mode(mode: int = 0o666) -> int:
    """The permissions ``open()`` gives a new file under the current umask: what every output gets. A file
    made by ``tempfile.mkstemp`` is 0600 (private), which a shared CI folder or web server cannot read."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it: put it straight back
    return mode & ~mask


@contextmanager
def atomic_output_dir(
    path: str | Path, force: bool = False, inputs: Sequence[Path | str | None] = ()
) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path``, on any failure it is removed.

    Missing parent folders of ``path`` are created here (as ``save_pretrained`` does), and removed
    again if the write fails, so a failed run leaves nothing behind.
    """
    out = check_output_path(path, force=force, inputs=inputs).resolve()
    made = _make_parents(out.parent)
    tmp = _sibling(out, "tmp")
    try:
        tmp.mkdir()
    except OSError as err:  # /proc/x, a name too long, a folder that vanished: the -o cannot be written
        _remove_made(made)
        raise LoraCompressError(f"cannot write {out} ({err.strerror or err}); choose another -o") from None
    try:
        yield tmp
        if out.exists():
            _check_replaceable(out, force)  # someone may have put files there while we worked
            old = _sibling(out, "old")
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
        _remove_made(made)
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
        _remove_made(made)
        raise


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors; returns the ones made, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_made(missing)
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC):
            raise LoraCompressError(f"cannot create {folder} ({err.strerror}); choose another -o") from None
        raise
    return missing


def _remove_made(made: list[Path]) -> None:
    """Remove the parent folders this run created, deepest first; one that is no longer empty stays."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


def _move_into_place(tmp: Path, out: Path) -> None:
    try:
        tmp.rename(out)
    except OSError as err:
        err.final_move = True  # type: ignore[attr-defined]  # tells the handler above which step failed
        raise
