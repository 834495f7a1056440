"""The typer app and the entry point that maps lcpaq errors to exit code 2."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from lcpaq.errors import LcpaqError

app = typer.Typer(
    name="lcpaq",
    help="Hardware-in-the-loop mixed-precision quantization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def make_console(**kw: Any) -> Any:
    """A rich console; wide when stdout is not a terminal so tables in logs are not truncated."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 180, **kw)


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (for ``--json``)."""
    typer.echo(json.dumps(obj, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app; LcpaqError, a usage error or an unusable path -> a
    one-line message on stderr and exit code 2; Ctrl-C -> exit code 130."""
    from lcpaq.cli import register_all

    register_all()
    try:
        rv = app(args=argv, prog_name="lcpaq", standalone_mode=False)  # returns Exit codes, not raises
    except LcpaqError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except typer.Exit as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as e:  # usage errors: bad option, missing argument
        return _usage_error(e)
    except KeyboardInterrupt:
        rv = 130
    except UnicodeDecodeError as e:  # a binary file given where text (JSON, TOML, a table) is read
        typer.echo(f"error: a file given is not UTF-8 text ({e.reason} at byte {e.start}); check the "
                   "paths passed to this command", err=True)
        return 2
    except OSError as e:  # a path the user gave: missing, a folder, read-only, ...
        if e.filename is None:
            raise
        typer.echo(f"error: {e.filename}: {e.strerror or e}; check the path", err=True)
        return 2
    if rv == 130:  # typer turns Ctrl-C into exit code 130 without a word
        typer.echo("interrupted", err=True)
    return rv if isinstance(rv, int) else 0


def _usage_error(e: Exception) -> int:
    """One line (``error: Missing option '--hw'; see `lcpaq profile --help```) instead of click's
    three; no-argument calls still print the help."""
    code = int(getattr(e, "exit_code", 2) or 2)
    fmt, ctx = getattr(e, "format_message", None), getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError" or fmt is None:
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {e}", err=True)
        return code
    where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
    typer.echo(f"error: {fmt().rstrip('.')}{where}", err=True)
    return code


def entry() -> None:
    sys.exit(main())
