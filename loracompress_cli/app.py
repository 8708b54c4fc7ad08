"""The typer app. Each command lives in its own module with a ``register(app)`` function.

User errors (:class:`LoraCompressError`) exit 2 with one line on stderr and no traceback;
``--debug`` shows the traceback. A failed ``check`` exits 1.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import typer

from loracompress.core.validate import flag, require_finite
from loracompress.errors import CheckFailed, LoraCompressError
from loracompress_cli.common import no_breaks

# typer >= 0.20 vendors its own copy of click: its usage errors and Exit/Abort are not click's classes.
_USAGE_ERRORS: tuple[type[Exception], ...] = (click.ClickException,)
_EXITS: tuple[type[Exception], ...] = (click.exceptions.Exit, typer.Exit)
_ABORTS: tuple[type[BaseException], ...] = (click.exceptions.Abort, typer.Abort)
try:
    from typer._click.exceptions import ClickException as _VendoredClickException

    _USAGE_ERRORS += (_VendoredClickException,)
except ImportError:  # an older typer that uses click itself
    pass

app = typer.Typer(
    name="loracompress",
    help="Compress trained LoRA adapters under a parameter budget, then ship them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One module per command; each defines register(app).
COMMAND_MODULES = [
    "inspect_cmd",
    "prune_cmd",
    "check_cmd",
    "report_cmd",
    "eval_cmd",
    "truncate_cmd",
    "merge_cmd",
    "export_cmd",
    "bank_cmd",
]


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", metavar="", help="Show tracebacks and debug logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="", help="Only warnings and errors."),
) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if debug else "%(message)s")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"loracompress_cli.{name}")
        module.register(app)
    for info in app.registered_commands:
        info.callback = _finite_floats(info.callback)


def _flag_of(parameter: inspect.Parameter) -> str:
    decls = getattr(parameter.default, "param_decls", None) or ()
    longs = [d for d in decls if d.startswith("--")]
    return longs[0] if longs else flag(parameter.name)


def _finite_floats(callback: Any) -> Any:
    """Refuse ``nan``/``inf`` for every float option of a command, naming its flag, before the command runs.

    typer parses ``--kd-weight nan`` as a float, and ``nan`` then passes every ``x < 0`` check; one
    wrapper here covers each float option of each command, present and future.
    """
    signature = inspect.signature(callback)
    flags = {name: _flag_of(p) for name, p in signature.parameters.items()}

    @functools.wraps(callback)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
            require_finite(flags[name], value)
        return callback(*args, **kwargs)

    return checked


_register_all()


def _refresh_help() -> None:
    """Help texts built from registries (the calibration methods) are filled in at each parse."""
    for name in COMMAND_MODULES:
        refresh = getattr(importlib.import_module(f"loracompress_cli.{name}"), "refresh_help", None)
        if refresh is not None:
            refresh()


def hoist_debug(args: list[str]) -> list[str]:
    """``--debug`` anywhere before ``--`` means the root option: ``prune X --debug`` = ``--debug prune X``.

    click reads a group's options only before the subcommand; the flag is moved there so that it
    works wherever a user puts it (no subcommand has a ``--debug`` of its own).
    """
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug", *(a for a in args[:end] if a != "--debug"), *args[end:]]


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the same unwinding as Ctrl-C: every temporary output is removed on the way out


@contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM (``docker stop``, a CI runner cancelling a job, ``timeout``) stops a command as Ctrl-C does.

    Python's default for SIGTERM ends the process at once, without unwinding, which left a merge's or
    an export's temporary folder behind. Calibration installs its own handler (finish the step,
    checkpoint) for its loop and puts this one back after it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    with _sigterm_as_sigint():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = hoist_debug(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args or os.environ.get("LORACOMPRESS_DEBUG") == "1"
    try:
        _refresh_help()
        result = app(args=args, prog_name="loracompress", standalone_mode=False)
    except _EXITS as e:
        return e.exit_code
    except _USAGE_ERRORS as e:
        e.show()
        return e.exit_code
    except _ABORTS:
        print("aborted", file=sys.stderr)
        return 130
    except LoraCompressError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {no_breaks(str(e))}", file=sys.stderr)  # one line, whatever the paths it names hold
        return e.exit_code
    except CheckFailed as e:
        if str(e):
            print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    if result == 130:  # typer turns Ctrl-C inside a command into Exit(130) and returns the code
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
