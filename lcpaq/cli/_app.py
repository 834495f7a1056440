"""The typer app and the entry point that maps lcpaq errors to exit code 2."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
import typer

from lcpaq.errors import LcpaqError

app = typer.Typer(
    name="lcpaq",
    help="Hardware-in-the-loop mixed-precision quantization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (for ``--json``)."""
    typer.echo(json.dumps(obj, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app; LcpaqError -> message on stderr and exit code 2."""
    from lcpaq.cli import register_all

    register_all()
    try:
        app(args=argv, standalone_mode=False)
    except LcpaqError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:  # usage errors: bad option, missing argument
        e.show()
        return 2
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        return 130
    return 0


def entry() -> None:
    sys.exit(main())
