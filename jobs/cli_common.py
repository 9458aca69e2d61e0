"""The pieces of the `sdbatch` CLI that every command module shares.

They live apart from jobs.cli so that a command module (jobs.manifest_build, jobs.preview) can
import them at import time: jobs.cli imports the command modules to register them, so importing
jobs.cli from one of them would be an import loop.
"""
import functools
from typing import Annotated

import typer

from jobs import manifest as manifests
from jobs import sink, storage
from sdcore.errors import SdcoreError

USER_ERRORS = (manifests.ManifestError, storage.StorageError, sink.OutputError, SdcoreError, PermissionError, FileNotFoundError)

StorageOptions = Annotated[list[str] | None, typer.Option(
    "--storage-option", help="fsspec storage option key=value (repeatable; JSON values are decoded).")]


def user_errors(command):
    """Turn errors caused by the input into exit code 2 with a message on stderr."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as e:
            message = str(e)
        typer.echo(f"sdbatch: error: {message}", err=True)
        raise typer.Exit(2)  # outside the except block: no traceback chained to it or kept alive

    return run
