"""The `sdbatch` command.

Bad input (a manifest that breaks the schema, an unusable output folder, storage that refuses
us) exits with code 2 and the message on stderr, without a traceback; a traceback means a bug.
"""
import json
from typing import Annotated

import typer

from jobs import manifest as manifests
from jobs import adapters, devices, images, progress, sink, sources, storage
from jobs.cli_common import (CommandError, CompileOption, DeviceOption, DtypeOption, EmbeddingOption, GuidanceOption,
                             HeightOption, ImageFormatOption, LoraOption, ModelCacheOption, ModelOption, NegativeOption,
                             QualityOption, ResizeOption, SchedulerOption, SeedOption, StepsOption, StorageOptions,
                             StrengthOption, WidthOption, declared_adapters, image_encoding, storage_options,
                             user_errors)
from jobs.lease import read_lease
from jobs.manifest import Defaults
from jobs.manifest_build import manifest_app
from jobs.plan import mode_of
from jobs.preview import preview_command
from sdcore.errors import ImageError, NonFiniteOutputError

# No rich markup: help texts hold brackets such as owner/name[/file][@revision].
app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="Stable Diffusion 1.x batch generation on Ray.")


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"sdbatch {sink.SDBATCH_VERSION}")  # the version the metadata's sdbatch_version records
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
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
    strength: StrengthOption = Defaults.strength,
    resize: ResizeOption = Defaults.resize,
    lora: LoraOption = None,
    embedding: EmbeddingOption = None,
    storage_option: StorageOptions = None,
) -> None:
    """Check every row of a manifest (and that the declared adapter files exist) and print a summary."""
    defaults = Defaults(seed=seed, steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                        scheduler=scheduler, negative_prompt=negative_prompt, strength=strength, resize=resize)
    options = storage_options(storage_option)
    declared = declared_adapters(lora, embedding, options)
    with manifests.open_manifest(manifest, options) as m:
        summary = manifests.validate(m, defaults, declared.loras)
    typer.echo(summary.format())


STATUS_JSON_HELP = """Print one JSON object instead of the text: url, manifest, model; shards_done,
shards_total, shards_remaining, rows_done, rows_total, images_done, images_total, failures;
finished (_SUCCESS is there and current), success_stale; running (the driver holding the
output's lease, or null), images_per_second and eta_seconds (the recent rate and the ETA while
running, else null); shard_timing (shard, images, seconds, images_per_second; up to --limit) and
timing_total; first_failures (id, error, attempts; up to --limit); damaged (shard: problem);
job_from; keep (with --keep: rule, rows, kept, rejected, dropped, attempts, and per
clause the attempts that passed it; else null)."""


@app.command("status")
@user_errors
def status_command(
    output: Annotated[str, typer.Argument(help="Output dataset: a path or fsspec URL.")],
    storage_option: StorageOptions = None,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Lines of the per-shard timing and failures tables.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help=STATUS_JSON_HELP)] = False,
) -> None:
    """Show done and remaining shards and rows, per-shard timing, failures, whether the job finished,
    the ETA while a driver is running it, and with --keep the rule's pass rates and the attempts spent."""
    from jobs.scorers import format_keep_report, keep_report

    out = sink.Output(output, storage_options(storage_option))
    status, holder = out.status(failures=limit), read_lease(out)
    if holder is not None and holder.is_live():
        status = progress.with_eta(status, holder, out.commit_times())
    keep = keep_report(out)
    if as_json:
        typer.echo(json.dumps(status.as_dict(limit=limit) | {"keep": keep}))
    else:
        typer.echo(status.format(limit=limit) + ("" if keep is None else "\n" + format_keep_report(keep)))


@app.command("verify")
@user_errors
def verify_command(
    output: Annotated[str, typer.Argument(help="Output dataset: a path or fsspec URL.")],
    storage_option: StorageOptions = None,
    quick: Annotated[bool, typer.Option("--quick", help=(
        "Check that each image exists and is not empty instead of hashing its bytes."))] = False,
    repair: Annotated[bool, typer.Option("--repair", help=(
        "Move each damaged shard's metadata and failures files (and orphan objects) into _sdbatch/damaged/, "
        "remove a stale _SUCCESS, write back a lost job.json: `sdbatch run --resume` then makes those shards "
        "again. Refused while a run holds the output."))] = False,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Problems listed in the text output.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help=(
        "Print one JSON object: the counts, intact, damaged_shards, and every problem (shard, id, what, kind)."))] = False,
) -> None:
    """Check that a dataset is complete and intact: every image against its sha256, every row done or
    failed once, no orphan objects, _SUCCESS. Exit code 0: intact, 1: damaged or incomplete."""
    from jobs.verify import verify

    report = verify(sink.Output(output, storage_options(storage_option)), quick=quick, repair=repair)
    typer.echo(json.dumps(report.as_dict()) if as_json else report.format(limit=limit))
    if not report.intact:
        raise typer.Exit(1)


@app.command("generate")
@user_errors
def generate_command(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    model: ModelOption,
    output: Annotated[str | None, typer.Option("-o", "--output", help=(
        "Where to write the image (path or fsspec URL; default out.png, out.jpg or out.webp)."))] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initial noise and of every stochastic step.")] = Defaults.seed,
    steps: StepsOption = Defaults.steps,
    guidance_scale: GuidanceOption = Defaults.guidance_scale,
    width: WidthOption = Defaults.width,
    height: HeightOption = Defaults.height,
    scheduler: SchedulerOption = Defaults.scheduler,
    negative_prompt: NegativeOption = Defaults.negative_prompt,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    compile_unet: CompileOption = False,
    model_cache: ModelCacheOption = None,
    storage_option: StorageOptions = None,
    image_format: ImageFormatOption = "png",
    quality: QualityOption = None,
    init_image: Annotated[str | None, typer.Option("--init-image", metavar="SRC", help=(
        "Start from this image (img2img): a path or fsspec URI."))] = None,
    mask_image: Annotated[str | None, typer.Option("--mask-image", metavar="SRC", help=(
        "Repaint the white part of --init-image (inpainting): a path or fsspec URI."))] = None,
    strength: StrengthOption = Defaults.strength,
    resize: ResizeOption = Defaults.resize,
    lora: LoraOption = None,
    embedding: EmbeddingOption = None,
    loras: Annotated[str | None, typer.Option("--loras", metavar="NAME:SCALE,...", help=(
        "Which declared --lora to apply, and how strongly (default: every one at 1.0)."))] = None,
) -> None:
    """Generate one image; its PNG text chunk or JPEG/WebP EXIF records every generation parameter."""
    # Everything the user typed is checked before the (slow) model load.
    params = Defaults(seed=seed, steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                      scheduler=scheduler, negative_prompt=negative_prompt, strength=strength, resize=resize)
    encoding = image_encoding(image_format, quality)
    output = output or f"out.{encoding.extension}"
    named = output.rsplit(".", 1)[-1].lower().replace("jpeg", "jpg")
    if named in sink.EXTENSIONS.values() and named != encoding.extension:
        raise CommandError(f"-o {output}: the name says {named}, but --image-format is {image_format}")
    try:
        torch_device = devices.resolve_device(device)
    except ValueError as e:  # --device cuda on a machine without one
        raise CommandError(str(e)) from None
    torch_dtype = devices.resolve_dtype(dtype, torch_device)
    options = storage_options(storage_option)
    sources.check(model, options, torch_dtype, model_cache)
    fs, path = storage.resolve(output, options)
    declared = declared_adapters(lora, embedding, options, model_cache)
    row_loras = adapters.parse_loras(loras) if loras is not None else tuple((n, 1.0) for n in sorted(declared.loras))
    undeclared = sorted({n for n, _ in row_loras} - declared.loras.keys())
    if undeclared:
        raise CommandError(f"--loras {loras}: {', '.join(undeclared)} not declared; declare each with --lora NAME=SRC")
    if mask_image is not None and init_image is None:
        raise CommandError("--mask-image needs --init-image: inpainting repaints the masked part of an init image")

    from sdcore import load_pipeline
    from sdcore.allocator import keep_freed_memory
    from sdcore.lora import Adapters as MergedLoRAs
    from sdcore.pipeline import first_step

    def load(option: str, source: str | None, column: str) -> tuple:
        """(pixels fitted to the size, sha256 of the file) of an input image; (None, None) without one."""
        if source is None:
            return None, None
        try:
            return images.load(source, column, width, height, resize, options)
        except ImageError as e:
            raise CommandError(f"{option} {source}: {e}") from None

    (init, init_sha256), (mask, mask_sha256) = (load("--init-image", init_image, "init_image"),
                                                load("--mask-image", mask_image, "mask_image"))
    image_args = {}
    if init is not None:
        try:
            first_step(steps, strength)
        except ValueError as e:
            raise CommandError(f"--strength {strength} --steps {steps}: {e}") from None
        image_args.update(init_images=[init], strength=strength)
    if mask is not None:
        image_args.update(mask_images=[mask])

    if torch_device.type == "cpu" and (ctx.obj or {}).get("owns_process"):
        keep_freed_memory()  # reuse the activations' memory from one step to the next
    resolved = sources.resolve(model, storage_options=options, dtype=torch_dtype, cache=model_cache)
    files = declared.resolve(options, model_cache)  # local paths and sha256 of the adapter files
    devices.prepare_backend(torch_device, torch_dtype)
    pipe = load_pipeline(resolved.path, device=torch_device, dtype=torch_dtype)
    lora_files, tokens = files.load(pipe, model)
    if row_loras:
        MergedLoRAs(pipe).activate([(lora_files[name], scale) for name, scale in row_loras])
    if compile_unet:
        pipe.compile()

    def show_step(step: int, total: int) -> None:
        typer.echo(f"\rstep {step}/{total}", err=True, nl=step == total)

    sched_config = pipe.make_scheduler(params.scheduler).config
    try:
        image = pipe.generate([prompt], seeds=[seed], negative_prompts=[negative_prompt], steps=steps,
                              guidance_scale=guidance_scale, height=height, width=width, scheduler=params.scheduler,
                              output="np", progress=show_step, **image_args)[0]
    except NonFiniteOutputError as e:
        raise CommandError(f"{e}; try --dtype fp32", 1) from None
    inputs = sink.Inputs(init_sha256, mask_sha256, adapters.tokens_used(prompt, negative_prompt, tokens))
    record = {
        "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
        "guidance_scale": guidance_scale, "width": width, "height": height, "scheduler": params.scheduler,
        "mode": mode_of(init is not None, mask is not None), "strength": None if init is None else strength,
        **sink.input_columns(row_loras, inputs, files.fingerprints()), "resize": None if init is None else resize,
        "scheduler_config": sched_config, "model": storage.redact_url(model), "model_fingerprint": pipe.fingerprint,
        "model_revision": resolved.revision,
        "sdbatch_version": sink.SDBATCH_VERSION,
    }
    storage.write_atomic(fs, path, encoding.encode(image, record))
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
    batch_size: Annotated[str, typer.Option("--batch-size", metavar="<auto|N>", help=(
        "Images per pipeline call (same size, steps, scheduler, guidance); auto: 4 on the CPU, on a GPU per image "
        "size the largest of 1, 2, 4, 8, 16, 32 that fits its memory. Fewer after an out-of-memory error."))] = "auto",
    shard_size: Annotated[int | None, typer.Option("--shard-size", help=(
        "Images per shard, the unit of work, commit and resume (a row with more images spans several shards); "
        "default 200, 1000 for --format webdataset (one tar per shard); a continued job keeps its own."))] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    compile_unet: CompileOption = False,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help=(
        "Replay the UNet's steps as CUDA graphs (torch.compile's reduce-overhead mode; implies --compile, "
        "needs CUDA)."))] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Join this Ray cluster (default: RAY_ADDRESS, else start a local one).")] = None,
    seed: SeedOption = Defaults.seed,
    steps: StepsOption = Defaults.steps,
    scheduler: SchedulerOption = Defaults.scheduler,
    guidance_scale: GuidanceOption = Defaults.guidance_scale,
    width: WidthOption = Defaults.width,
    height: HeightOption = Defaults.height,
    negative_prompt: NegativeOption = Defaults.negative_prompt,
    strength: StrengthOption = Defaults.strength,
    resize: ResizeOption = Defaults.resize,
    lora: LoraOption = None,
    embedding: EmbeddingOption = None,
    storage_option: StorageOptions = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the job in OUTPUT; refuse if there is none.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier sdbatch dataset in OUTPUT.")] = False,
    output_format: Annotated[str, typer.Option("--format", metavar="<files|webdataset|parquet>", help=(
        "files: one image object each under images/; webdataset: one tar per shard under shards/; parquet: the "
        "files and each image in the metadata's `image` column (Hugging Face `datasets` Image feature)."))] = "files",
    embed_images: Annotated[bool, typer.Option("--embed-images", help="The same as --format parquet.")] = False,
    image_format: ImageFormatOption = "png",
    quality: QualityOption = None,
    shard_timeout: Annotated[float | None, typer.Option("--shard-timeout", help=(
        "Seconds a shard may run before its actor is killed and the shard retried (default: only the watchdog "
        "for actors that finish no image for 5x the job's batch time, at least 60 s)."))] = None,
    row_timeout: Annotated[float | None, typer.Option("--row-timeout", help=(
        "Seconds per image after which a batch stops; its rows run alone, and one that runs past it alone "
        "goes to failures/ (default: no limit)."))] = None,
    score: Annotated[str | None, typer.Option("--score", metavar="clip,nsfw,aesthetic", help=(
        "Score each image on the actor, before it is encoded: clip (clip_score, how well it matches its prompt), "
        "nsfw (nsfw_score and nsfw, the safety checker's verdict; nothing is blacked out), aesthetic "
        "(aesthetic_score, the LAION predictor). Any subset; each is a metadata column."))] = None,
    clip_model: Annotated[str | None, typer.Option("--clip-model", metavar="SRC", help=(
        "A transformers CLIP folder (e.g. openai/clip-vit-large-patch14) for --score clip and aesthetic: a path, "
        "Hub id or fsspec URI."))] = None,
    safety_checker: Annotated[str | None, typer.Option("--safety-checker", metavar="SRC", help=(
        "A folder holding a diffusers safety_checker/ and its feature_extractor/, for --score nsfw "
        "(default: the model's own)."))] = None,
    aesthetic_model: Annotated[str | None, typer.Option("--aesthetic-model", metavar="SRC", help=(
        "The LAION aesthetic predictor's weight file (.pth or .safetensors), for --score aesthetic."))] = None,
    keep: Annotated[str | None, typer.Option("--keep", metavar="EXPR", help=(
        "Keep only images passing EXPR, e.g. \"clip_score >= 26 and not nsfw\": comparisons, and, or, not over "
        "the score columns and the row's prompt, negative_prompt, steps, guidance_scale, width, height, "
        "scheduler. A failing row is made again with its next seed, up to --max-attempts."))] = None,
    max_attempts: Annotated[int | None, typer.Option("--max-attempts", help=(
        "Attempts per image under --keep (default 3); the last failing one is written with kept = false."))] = None,
    drop_rejected: Annotated[bool, typer.Option("--drop-rejected", help=(
        "Write no image for a row that never passed --keep; its metadata row stays, with kept = false."))] = False,
) -> None:
    """Generate every image of a manifest into a dataset, on Ray actors; a re-run continues an interrupted job."""
    from jobs import driver  # imports Ray: only this command pays for it
    from jobs.scorers import DEFAULT_MAX_ATTEMPTS, KeepRuleError, ScoreSpec, parse_scores

    defaults = Defaults(seed=seed, steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                        scheduler=scheduler, negative_prompt=negative_prompt, strength=strength, resize=resize)
    opts = driver.RunOptions(
        manifest=manifest, model=model, model_cache=model_cache, output=output, defaults=defaults, actors=actors,
        batch_size=parse_batch_size(batch_size), shard_size=shard_size, device=device, dtype=dtype,
        compile=compile_unet or cuda_graphs, cuda_graphs=cuda_graphs, ray_address=ray_address,
        storage_options=storage_options(storage_option),
        mode="resume" if resume else "overwrite" if overwrite else "auto",
        format=output_format_with_alias(output_format, embed_images),
        image=image_encoding(image_format, quality),
        shard_timeout=shard_timeout, row_timeout=row_timeout, adapters=adapters.Adapters.of(lora, embedding),
    )
    try:
        scores = parse_scores(score)
    except KeepRuleError as e:
        raise CommandError(str(e)) from None
    opts.scoring = ScoreSpec(scores, clip_model=clip_model, safety_checker=safety_checker,
                             aesthetic_model=aesthetic_model, keep=keep, drop_rejected=drop_rejected,
                             max_attempts=max_attempts if max_attempts is not None
                             else DEFAULT_MAX_ATTEMPTS if keep is not None else 1)
    if resume and overwrite:
        raise CommandError("--resume and --overwrite exclude each other")
    try:
        result = driver.run(opts)
    except driver.RunError as e:
        raise CommandError(str(e), e.exit_code) from None
    typer.echo(progress.format_summary(result))


def output_format_with_alias(output_format: str, embed_images: bool) -> str:
    """--format, with --embed-images as the older name of --format parquet."""
    if embed_images and output_format == "webdataset":
        raise CommandError("--embed-images is --format parquet; it does not go with --format webdataset")
    return "parquet" if embed_images else output_format


def parse_batch_size(value: str) -> int | None:
    """--batch-size: None for auto, else the number (driver.check_options checks its range)."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise CommandError(f"--batch-size must be auto or a number of images, got {value!r}") from None


if __name__ == "__main__":  # python -m jobs.cli: the command from a source tree
    program()
