"""The `sdbatch` command.

Bad input (a manifest that breaks the schema, an unusable output folder, storage that refuses
us) exits with code 2 and the message on stderr, without a traceback; a traceback means a bug.
"""
from typing import Annotated

import typer

from jobs import manifest as manifests
from jobs import devices, sink, sources, storage
from jobs.cli_common import StorageOptions, user_errors
from jobs.manifest import Defaults
from jobs.manifest_build import manifest_app
from jobs.preview import preview_command
from sdcore.errors import NonFiniteOutputError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Stable Diffusion 1.x batch generation on Ray.")

# Job-wide defaults, shared by every command that reads a manifest.
SeedOption = Annotated[int, typer.Option("--seed", help="Job seed; a row without `seed` gets one derived from this and its id.")]
StepsOption = Annotated[int, typer.Option("--steps", help="Denoising steps for rows without `steps`.")]
GuidanceOption = Annotated[float, typer.Option("--guidance-scale", help="Classifier-free guidance for rows without `guidance_scale`.")]
WidthOption = Annotated[int, typer.Option("--width", help="Image width for rows without `width` (multiple of 8).")]
HeightOption = Annotated[int, typer.Option("--height", help="Image height for rows without `height` (multiple of 8).")]
SchedulerOption = Annotated[str, typer.Option("--scheduler", help="Scheduler for rows without `scheduler`.")]
NegativeOption = Annotated[str, typer.Option("--negative-prompt", help="Negative prompt for rows without `negative_prompt`.")]
ModelOption = Annotated[str, typer.Option("--model", help=(
    "A diffusers folder or single .safetensors/.ckpt file: a local path, an fsspec URI (s3://, gs://, ...), "
    "or a Hugging Face repo id owner/name[/file][@revision]; or builtin:tiny."))]
ModelCacheOption = Annotated[str | None, typer.Option("--model-cache", help=(
    "Where each node keeps downloaded model files (default: $SDBATCH_MODEL_CACHE, else $HF_HOME/sdbatch, "
    "else ~/.cache/sdbatch; Hub files go to the Hugging Face cache unless this is given)."))]
CompileOption = Annotated[bool, typer.Option(
    "--compile", help="Run the UNet through torch.compile: minutes of compiling per image size, then faster steps.")]


@app.callback()
def main() -> None:
    """Stable Diffusion 1.x batch generation on Ray."""


def program() -> None:
    """`sdbatch`, the installed program. `app` also runs inside other programs (tests, notebooks);
    only here, where the process is the command's own, may a command change process-wide settings."""
    app(obj={"owns_process": True})


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
    limit: Annotated[int, typer.Option("--limit", min=0, help="Lines of the per-shard timing and failures tables.")] = 10,
) -> None:
    """Show done and remaining shards and rows, per-shard timing, failures, and whether the job finished."""
    status = sink.Output(output, storage.parse_storage_options(storage_option or [])).status(failures=limit)
    typer.echo(status.format(limit=limit))


@app.command("generate")
@user_errors
def generate_command(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    model: ModelOption,
    output: Annotated[str, typer.Option("-o", "--output", help="Where to write the PNG (path or fsspec URL).")] = "out.png",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initial noise and of every stochastic step.")] = Defaults.seed,
    steps: StepsOption = Defaults.steps,
    guidance_scale: GuidanceOption = Defaults.guidance_scale,
    width: WidthOption = Defaults.width,
    height: HeightOption = Defaults.height,
    scheduler: SchedulerOption = Defaults.scheduler,
    negative_prompt: NegativeOption = Defaults.negative_prompt,
    device: Annotated[str, typer.Option("--device", help="auto, cuda or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16.")] = "fp32",
    compile_unet: CompileOption = False,
    model_cache: ModelCacheOption = None,
    storage_option: StorageOptions = None,
) -> None:
    """Generate one image; its PNG text chunk records every generation parameter."""
    # Everything the user typed is checked before the (slow) model load.
    params = Defaults(seed=seed, steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                      scheduler=scheduler, negative_prompt=negative_prompt)
    try:
        torch_device, torch_dtype = devices.resolve_device(device), devices.resolve_dtype(dtype)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    options = storage.parse_storage_options(storage_option or [])
    sources.check(model, options, torch_dtype, model_cache)
    fs, path = storage.resolve(output, options)

    from sdcore import load_pipeline
    from sdcore.allocator import keep_freed_memory

    if torch_device.type == "cpu" and (ctx.obj or {}).get("owns_process"):
        keep_freed_memory()  # reuse the activations' memory from one step to the next
    resolved = sources.resolve(model, storage_options=options, dtype=torch_dtype, cache=model_cache)
    pipe = load_pipeline(resolved.path, device=torch_device, dtype=torch_dtype)
    if compile_unet:
        pipe.compile()

    def show_step(step: int, total: int) -> None:
        typer.echo(f"\rstep {step}/{total}", err=True, nl=step == total)

    sched_config = pipe.make_scheduler(params.scheduler).config
    try:
        image = pipe.generate([prompt], seeds=[seed], negative_prompts=[negative_prompt], steps=steps,
                              guidance_scale=guidance_scale, height=height, width=width, scheduler=params.scheduler,
                              output="np", progress=show_step)[0]
    except NonFiniteOutputError as e:
        typer.echo(f"sdbatch: error: {e}; try --dtype fp32", err=True)
        raise typer.Exit(1) from None
    record = {
        "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
        "guidance_scale": guidance_scale, "width": width, "height": height, "scheduler": params.scheduler,
        "scheduler_config": sched_config, "model": storage.redact_url(model), "model_fingerprint": pipe.fingerprint,
        "model_revision": resolved.revision,
        "sdbatch_version": sink.SDBATCH_VERSION,
    }
    storage.write_atomic(fs, path, sink.encode_png(image, record))
    typer.echo(f"wrote {output}")


app.add_typer(manifest_app, name="manifest")
app.command("preview")(preview_command)


@app.command("run")
@user_errors
def run_command(
    manifest: Annotated[str, typer.Argument(help="Parquet manifest: a path or fsspec URL.")],
    model: ModelOption,
    output: Annotated[str, typer.Option("-o", "--output", help="Output dataset folder: a path or fsspec URL.")],
    model_cache: ModelCacheOption = None,
    actors: Annotated[int | None, typer.Option("--actors", help="Actors (default: one per GPU, or 1 without GPUs).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per pipeline call (same size, steps, scheduler, guidance).")] = 4,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Images per shard, the unit of work, commit and resume (a row with more images spans several shards).")] = 200,
    device: Annotated[str, typer.Option("--device", help="auto, cuda or cpu (resolved on each actor).")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16.")] = "fp32",
    compile_unet: CompileOption = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Join this Ray cluster (default: RAY_ADDRESS, else start a local one).")] = None,
    seed: SeedOption = Defaults.seed,
    steps: StepsOption = Defaults.steps,
    scheduler: SchedulerOption = Defaults.scheduler,
    guidance_scale: GuidanceOption = Defaults.guidance_scale,
    width: WidthOption = Defaults.width,
    height: HeightOption = Defaults.height,
    negative_prompt: NegativeOption = Defaults.negative_prompt,
    storage_option: StorageOptions = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the job in OUTPUT; refuse if there is none.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier sdbatch dataset in OUTPUT.")] = False,
    embed_images: Annotated[bool, typer.Option(
        "--embed-images", help="Also store each PNG in the metadata's `image` column (Hugging Face `datasets` Image feature).")] = False,
    shard_timeout: Annotated[float | None, typer.Option("--shard-timeout", help=(
        "Seconds a shard may run before its actor is killed and the shard retried (default: only the watchdog "
        "for actors that finish no image for 5x the job's batch time, at least 60 s)."))] = None,
    row_timeout: Annotated[float | None, typer.Option("--row-timeout", help=(
        "Seconds per image after which a batch stops; its rows run alone, and one that runs past it alone "
        "goes to failures/ (default: no limit)."))] = None,
) -> None:
    """Generate every image of a manifest into a dataset, on Ray actors; a re-run continues an interrupted job."""
    from jobs import driver  # imports Ray: only this command pays for it

    defaults = Defaults(seed=seed, steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                        scheduler=scheduler, negative_prompt=negative_prompt)
    opts = driver.RunOptions(
        manifest=manifest, model=model, model_cache=model_cache, output=output, defaults=defaults, actors=actors,
        batch_size=batch_size,
        shard_size=shard_size, device=device, dtype=dtype, compile=compile_unet, ray_address=ray_address,
        storage_options=storage.parse_storage_options(storage_option or []),
        mode="resume" if resume else "overwrite" if overwrite else "auto", embed_images=embed_images,
        shard_timeout=shard_timeout, row_timeout=row_timeout,
    )
    try:
        if resume and overwrite:
            raise driver.RunError("--resume and --overwrite exclude each other", 2)
        result = driver.run(opts)
    except driver.RunError as e:
        typer.echo(f"sdbatch: error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    typer.echo(driver.format_summary(result))
