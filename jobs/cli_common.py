"""The pieces of the `sdbatch` CLI that every command module shares: options and error handling.

They live apart from jobs.cli so that a command module (jobs.manifest_build, jobs.preview) can
import them at import time: jobs.cli imports the command modules to register them, so importing
jobs.cli from one of them would be an import loop.

Errors: a command decorated with `user_errors` turns the errors its input causes (USER_ERRORS, and
CommandError with its own exit code) into one line `sdbatch: error: ...` on stderr and an exit
code, without a traceback; a traceback means a bug. Values click refuses itself (a `--dtype` that
is not one of its choices, `--steps abc`) exit with code 2 and click's usage message.
"""
import functools
from typing import Annotated, Literal

import typer

from jobs import adapters, devices, sink, storage
from jobs import manifest as manifests
from sdcore.errors import SdcoreError

USER_ERRORS = (manifests.ManifestError, adapters.AdapterError, storage.StorageError, sink.OutputError, SdcoreError,
               PermissionError, FileNotFoundError)


class CommandError(Exception):
    """A command cannot go on: the message goes to stderr and the process exits with `exit_code`
    (2: the input is at fault, 1: something else, 130: interrupted)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def user_errors(command):
    """Turn USER_ERRORS into exit code 2 and CommandError into its exit code, with a one-line message."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as e:
            message, code = str(e), 2
        except CommandError as e:
            message, code = str(e), e.exit_code
        typer.echo(f"sdbatch: error: {message}", err=True)
        raise typer.Exit(code)  # outside the except block: no traceback chained to it or kept alive

    return run


def storage_options(values: list[str] | None) -> dict:
    """The `--storage-option key=value` list as fsspec keyword arguments."""
    return storage.parse_storage_options(values or [])


StorageOptions = Annotated[list[str] | None, typer.Option(
    "--storage-option", help="fsspec storage option key=value (repeatable; JSON values are decoded).")]

# Job-wide defaults, shared by every command that reads a manifest.
SeedOption = Annotated[int, typer.Option("--seed", help="Job seed; a row without `seed` gets one derived from this and its id.")]
StepsOption = Annotated[int, typer.Option("--steps", help="Denoising steps for rows without `steps`.")]
GuidanceOption = Annotated[float, typer.Option("--guidance-scale", help="Classifier-free guidance for rows without `guidance_scale`.")]
WidthOption = Annotated[int, typer.Option("--width", help="Image width for rows without `width` (multiple of 8).")]
HeightOption = Annotated[int, typer.Option("--height", help="Image height for rows without `height` (multiple of 8).")]
# Literal[choices]: --help lists them, and click refuses anything else with exit code 2.
SchedulerOption = Annotated[Literal[manifests.scheduler_names()], typer.Option(
    "--scheduler", help="Scheduler for rows without `scheduler`.")]
NegativeOption = Annotated[str, typer.Option("--negative-prompt", help="Negative prompt for rows without `negative_prompt`.")]
StrengthOption = Annotated[float, typer.Option("--strength", help=(
    "For rows with an init image and no `strength`: how much of it is repainted, 0 < strength <= 1."))]
ResizeOption = Annotated[Literal[manifests.RESIZE_POLICIES], typer.Option("--resize", help=(
    "How init images and masks are fitted to a row's size: stretch (resize to it) or crop (resize to cover it, "
    "then cut out the middle)."))]

# Adapters, declared once per job (jobs.adapters).
LoraOption = Annotated[list[str] | None, typer.Option("--lora", metavar="NAME=SRC", help=(
    "A LoRA rows may name in `loras` (repeatable): a .safetensors (kohya/A1111 or diffusers/PEFT) as a local path, "
    "fsspec URI or Hugging Face owner/name/file."))]
EmbeddingOption = Annotated[list[str] | None, typer.Option("--embedding", metavar="TOKEN=SRC", help=(
    "A textual-inversion embedding (repeatable): prompts that hold TOKEN use it. A1111 .pt/.safetensors or "
    "diffusers learned_embeds, as a local path, fsspec URI or Hugging Face owner/name/file."))]

# The model and where it runs.
ModelOption = Annotated[str, typer.Option("--model", help=(
    "A diffusers folder or single .safetensors/.ckpt file: a local path, an fsspec URI (s3://, gs://, ...), "
    "or a Hugging Face repo id owner/name[/file][@revision]; or builtin:tiny."))]
ModelCacheOption = Annotated[str | None, typer.Option("--model-cache", help=(
    "Where each node keeps downloaded model files (default: $SDBATCH_MODEL_CACHE, else $HF_HOME/sdbatch, "
    "else ~/.cache/sdbatch; Hub files go to the Hugging Face cache unless this is given)."))]
CompileOption = Annotated[bool, typer.Option(
    "--compile", help="Run the UNet through torch.compile: minutes of compiling per image size, then faster steps.")]
DeviceOption = Annotated[Literal[devices.DEVICES], typer.Option(
    "--device",
    help="Where the model runs; auto: a GPU if the machine that loads the model has one, else the CPU.")]
DtypeOption = Annotated[Literal[devices.DTYPE_CHOICES], typer.Option(
    "--dtype", help=("Precision of the model's weights and activations; auto: fp16 on a GPU, fp32 on the CPU "
                     "(fp32 on a GPU uses its TF32 tensor cores)."))]

# How images are stored.
ImageFormatOption = Annotated[Literal[tuple(sink.EXTENSIONS)], typer.Option(
    "--image-format", help="File format of the images: png (lossless), jpeg or webp (lossy, far smaller).")]
QualityOption = Annotated[int | None, typer.Option("--quality", help=(
    f"JPEG/WebP quality, 1..100 (default {sink.DEFAULT_QUALITY}: visually lossless); refused with png, which is lossless."))]


def declared_adapters(lora: list[str] | None, embedding: list[str] | None, storage: dict,
                      cache: str | None = None) -> adapters.Adapters:
    """--lora and --embedding, each file checked to exist (listed, not downloaded): exit 2 otherwise."""
    declared = adapters.Adapters.of(lora, embedding)
    problems = declared.problems(storage, cache)
    if problems:
        raise CommandError("; ".join(problems))
    return declared


def image_encoding(image_format: str, quality: int | None) -> sink.ImageEncoding:
    """--image-format and --quality, checked: exit 2 for a quality out of range or one given with png."""
    try:
        return sink.ImageEncoding.of(image_format, quality)
    except ValueError as e:
        raise CommandError(str(e)) from None
