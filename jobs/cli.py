"""The `sdbatch` command.

Bad input (a manifest that breaks the schema, an unusable output folder, storage that refuses
us) exits with code 2 and the message on stderr, without a traceback; a traceback means a bug.
"""
import functools
from typing import Annotated

import typer

from jobs import manifest as manifests
from jobs import sink, storage
from jobs.manifest import Defaults

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Stable Diffusion 1.x batch generation on Ray.")

USER_ERRORS = (manifests.ManifestError, storage.StorageError, sink.OutputError, PermissionError, FileNotFoundError)

# Job-wide defaults, shared by every command that reads a manifest.
SeedOption = Annotated[int, typer.Option("--seed", help="Job seed; a row without `seed` gets one derived from this and its id.")]
StepsOption = Annotated[int, typer.Option("--steps", help="Denoising steps for rows without `steps`.")]
GuidanceOption = Annotated[float, typer.Option("--guidance-scale", help="Classifier-free guidance for rows without `guidance_scale`.")]
WidthOption = Annotated[int, typer.Option("--width", help="Image width for rows without `width` (multiple of 8).")]
HeightOption = Annotated[int, typer.Option("--height", help="Image height for rows without `height` (multiple of 8).")]
SchedulerOption = Annotated[str, typer.Option("--scheduler", help="Scheduler for rows without `scheduler`.")]
NegativeOption = Annotated[str, typer.Option("--negative-prompt", help="Negative prompt for rows without `negative_prompt`.")]
StorageOptions = Annotated[list[str] | None, typer.Option(
    "--storage-option", help="fsspec storage option key=value (repeatable; JSON values are decoded).")]


@app.callback()
def main() -> None:
    """Stable Diffusion 1.x batch generation on Ray."""


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


@app.command("validate")
@user_errors
def validate_command(
    manifest: Annotated[str, typer.Argument(help="Parquet manifest: a path or fsspec URL.")],
    seed: SeedOption = Defaults.seed,
    steps: StepsOption = Defaults.steps,
    guidance_scale: GuidanceOption = Defaults.guidance_scale,
    width: WidthOption = Defaults.width,
    height: HeightOption = Defaults.height,
    scheduler: SchedulerOption = Defaults.scheduler,
    negative_prompt: NegativeOption = Defaults.negative_prompt,
    storage_option: StorageOptions = None,
) -> None:
    """Check every row of a manifest and print a summary."""
    defaults = Defaults(seed=seed, steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                        scheduler=scheduler, negative_prompt=negative_prompt)
    with manifests.open_manifest(manifest, storage.parse_storage_options(storage_option or [])) as m:
        summary = manifests.validate(m, defaults)
    typer.echo(summary.format())


@app.command("status")
@user_errors
def status_command(
    output: Annotated[str, typer.Argument(help="Output dataset: a path or fsspec URL.")],
    storage_option: StorageOptions = None,
) -> None:
    """Show done and remaining shards and rows, failures, and whether the job finished."""
    status = sink.Output(output, storage.parse_storage_options(storage_option or [])).status()
    typer.echo(status.format())
