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
]


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if debug else "%(message)s")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"loracompress_cli.{name}")
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LORACOMPRESS_DEBUG") == "1"
    try:
        app(args=args, prog_name="loracompress", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
