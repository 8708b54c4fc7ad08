"""The typer app. Each command lives in its own module with a ``register(app)`` function.

User errors (:class:`LoraCompressError`) exit 2 with one line on stderr and no traceback;
``--debug`` shows the traceback. A failed ``check`` exits 1.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

import click
import typer

from loracompress.errors import CheckFailed, LoraCompressError

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


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
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
        print(f"error: {e}", file=sys.stderr)
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
