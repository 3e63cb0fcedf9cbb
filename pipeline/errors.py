"""User-facing errors: one line that names what is wrong and where.

Stages raise these instead of letting a traceback reach the user; the CLI prints the message on one
line to stderr and exits with status 2.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class PipelineError(Exception):
    """Base class for errors the user can fix (bad parameters, bad data, missing inputs)."""


class ConfigError(PipelineError):
    """A parameter in params.yaml (or on the command line) is unknown, mistyped or out of range."""


class DataError(PipelineError):
    """An input file is missing, unreadable, or does not have the expected shape."""


def reports_errors(command: F) -> F:
    """Wrap a Typer command so a PipelineError becomes `error: <message>` and exit status 2."""
    import typer

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PipelineError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
