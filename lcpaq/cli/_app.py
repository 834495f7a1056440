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
    """Console entry point: run the app; LcpaqError -> message on stderr and exit code 2."""
    from lcpaq.cli import register_all

    register_all()
    try:
        rv = app(args=argv, standalone_mode=False)  # click returns Exit codes here, not raises
    except LcpaqError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except typer.Exit as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as e:  # usage errors: bad option, missing argument
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {e}", err=True)
        return int(getattr(e, "exit_code", 2) or 2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


def entry() -> None:
    sys.exit(main())
