"""The worker side of `sdbatch run`: one pipeline, loaded once, turning shards into committed output.

`ShardRunner` is the whole of it, in plain Python (tests drive it without Ray); `ShardActor` is
the Ray actor around it, one per GPU (or per CPU core). For each shard the driver hands over,
the runner reads the shard's rows from the manifest itself (the driver never holds prompts or
images), batches images of equal key (jobs.plan: mode, size, steps, scheduler, guided or not,
strength, LoRA set) — as many as jobs.buckets allows for their size, a short batch padded to that
on a GPU — generates, and passes each image to the `ImageWriter`, whose threads encode and store
images while the next batch denoises. Then it commits the shard (metadata written last; see jobs.sink).

The job's LoRAs and learned tokens are read once, when the actor starts; each batch's LoRA set is
merged into the weights before its call (sdcore.lora), and its rows' init images and masks are
read and fitted to their size (jobs.images, sdcore.images).

Failures are per image, never per shard:
- a row whose init image or mask cannot be read or decoded is recorded as a failure, with the reason;
- a row whose image comes out NaN/inf is recorded as a failure at once (the same seed would fail
  the same way again);
- a batch that runs out of memory halves the rows for its image size (for the rest of the actor's
  life) and runs again in batches of that many; a row that runs out of memory alone is tried once
  more alone;
- any other error in a batch runs the batch again one row at a time, so only the rows that fail
  alone are recorded as failures;
- a batch that runs past `row_timeout` seconds per image (checked after every denoising step)
  stops; its rows then run alone, and a row that runs past it alone is recorded as a failure;
- if every image of a shard failed with an error, the fault is more likely the actor (a broken
  device, say) than the rows: the shard raises, and the driver retries it on a fresh actor.

With --score, each batch's decoded images are scored (jobs.scorers) before they go to the writer.
With --keep, an image that fails the rule is not written: its row goes into the next attempt round,
with the seed of its next attempt, and once the shard's batches are done the rows of that round run
in batches of their own, round after round, until every row passed or used its --max-attempts.
The last attempt's image is written with `kept = false` (or, with --drop-rejected, only its row).
"""
import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import ray
import torch

from jobs import devices, images, lease, scorers, sources, storage
from jobs.adapters import Adapters, tokens_used
from jobs.buckets import BatchSizes, allow_recompiles
from jobs.manifest import Defaults, open_manifest
from jobs.plan import Shard, WorkItem, batches, read_shard
from jobs.sink import ImageWriter, Inputs, Output, ShardWriter
from sdcore import allocator, load_pipeline, lora
from sdcore.batching import Batching
from sdcore.errors import NonFiniteOutputError


@dataclass(frozen=True)
class ActorConfig:
    """Everything an actor needs, small enough to send to every node."""

    manifest: str
    output: str
    model: str
    defaults: Defaults
    model_cache: str | None = None  # None: sources.default_cache() of the actor's node
    device: str = "auto"  # resolved on the actor's node
    dtype: str = "auto"  # resolved for the device (the driver sends the job's dtype, never "auto")
    compile: bool = False  # Pipeline.compile() after loading
    cuda_graphs: bool = False  # compile in mode "reduce-overhead": the UNet's steps replay CUDA graphs
    batch_size: int | None = None  # rows per pipeline call; None: auto (jobs.buckets)
    pad_batches: bool | None = None  # pad short batches to their size's rows; None: on a GPU, when auto or compiled
    storage_options: dict = field(default_factory=dict)
    cpu_threads: int | None = None  # torch threads on the CPU (None: leave the process setting)
    keep_freed_memory: bool = False  # sdcore.allocator's setting, process-wide: for a CPU actor in a process of its own
    writer_threads: int = 4
    writer_queue: int = 16  # images waiting for the writer before generation blocks (at least two batches)
    row_timeout: float | None = None  # seconds per image before a batch is stopped (None: no limit)
    run_id: str | None = None  # the driver's lease: each commit checks that it still holds it (None: no check)
    scoring: scorers.ScoreSpec = scorers.ScoreSpec()  # --score, --keep and the scorers' sources
    adapters: Adapters = Adapters()  # --lora and --embedding


# Which scorer source each score needs, and its layout (the aesthetic predictor reads CLIP's image embeddings).
SCORER_SOURCES = {"clip": ("clip_model", sources.CLIP), "nsfw": ("safety_checker", sources.SAFETY_CHECKER),
                  "aesthetic": ("aesthetic_model", sources.AESTHETIC)}


@dataclass
class _Tries:
    """A row's attempts so far under --keep."""

    row_seed: int
    clauses_passed: list[int]  # per clause of the rule: attempts that passed it
    attempt: int = 1
    seconds: float = 0.0


@dataclass
class _RowInputs:
    """A row's input images, decoded and fitted to its size, and what its metadata says of its inputs."""

    init_image: np.ndarray | None  # [H, W, 3] uint8
    mask_image: np.ndarray | None  # [H, W] uint8
    inputs: Inputs


class ShardFailed(Exception):
    """Every image of a shard failed with an error: probably the actor, not the rows."""


class RowTimeout(Exception):
    """A batch ran past --row-timeout seconds per image: a verdict on the rows, like NaN, not on the actor."""


class ShardRunner:
    def __init__(self, config: ActorConfig):
        self.config = config
        self.allocator = allocator.keep_freed_memory() if config.keep_freed_memory else allocator.DEFAULT
        device = devices.resolve_device(config.device)
        self.dtype = devices.dtype_name(config.dtype, device)
        dtype = devices.DTYPES[self.dtype]
        self.model = sources.resolve(config.model, storage_options=config.storage_options, dtype=dtype,
                                     cache=config.model_cache)
        devices.prepare_backend(device, dtype)
        self.pipe = load_pipeline(self.model.path, device=device, dtype=dtype)
        self.adapter_files = config.adapters.resolve(config.storage_options, config.model_cache)
        self.loras, self.embeddings = self.adapter_files.load(self.pipe, config.model)
        # Made before compiling: on the CPU a compiled UNet would otherwise freeze the base weights into its code.
        self.merged_loras = lora.Adapters(self.pipe) if self.loras else None
        if config.compile or config.cuda_graphs:
            self.pipe.compile(mode="reduce-overhead" if config.cuda_graphs else None)
        self.batch_sizes = BatchSizes(config.batch_size, self.pipe.device, dtype)
        self.pad_batches = config.pad_batches
        if self.pad_batches is None:  # a compiled UNet on the CPU takes one row at a time (sdcore.batching)
            self.pad_batches = self.pipe.device.type != "cpu" and (config.batch_size is None or self.pipe.compiled)
        if self.pipe.compiled:
            self._compile_ahead()
        spec = config.scoring
        self.rule = spec.rule()
        self.scorer_sources = {name: sources.resolve(getattr(spec, option), storage_options=config.storage_options,
                                                     cache=config.model_cache, layout=layout)
                               for name, (option, layout) in SCORER_SOURCES.items() if getattr(spec, option)}
        self.scorers = scorers.Scorers(spec, {n: r.path for n, r in self.scorer_sources.items()},
                                       self.pipe.device) if spec.scores else None
        self._tries: dict[str, _Tries] = {}  # the current shard's rows under --keep, by image id
        self._next_round: list[WorkItem] = []  # their next attempts
        self._prepared: tuple | None = None  # (_call_key, Pipeline.prepare's result) for the next call
        self._inputs: dict[str, _RowInputs | str] = {}  # by image id: its inputs, or why they cannot be used
        self._scoring_seconds = 0.0
        self.manifest = open_manifest(config.manifest, config.storage_options)
        self.out = Output(config.output, config.storage_options)
        # Room for two batches: one batch's images are written while the next one denoises.
        queue = max(config.writer_queue, 2 * self.batch_sizes.largest)
        self.writer = ImageWriter(self.out, threads=config.writer_threads, max_pending=queue)
        # pyarrow imports pandas (up to half a second) the first time it turns Python values into an array:
        # paid here, it is part of the actor's start, not a stall in the middle of its first shard.
        pa.array([0])
        self._scheduler_configs: dict[str, dict] = {}
        self._job: dict | None = None  # job.json, read at the first shard: the driver writes it after actors start
        self._shard, self._images_done = "", 0  # read by `progress` from another thread

    def _compile_ahead(self) -> None:
        """Compile the UNet for the job's default image size at its batch size now, while the actor
        starts, rather than in its first shard, where minutes of compiling would count against the
        shard's time limits. A size first met in a shard compiles there."""
        d = self.config.defaults
        rows = self.batch_sizes.rows(d.height, d.width)
        out_of_memory = False
        try:
            self.pipe.generate([""] * rows, seeds=[0] * rows, steps=1, guidance_scale=d.guidance_scale, height=d.height,
                               width=d.width, scheduler="ddim", output="latent")
        except NonFiniteOutputError:
            pass  # compiled all the same
        except torch.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:  # out of the except block, so that the failed call's tensors are free
            torch.cuda.empty_cache()
            if rows > 1:
                self.batch_sizes.halve(d.height, d.width, rows)

    def info(self) -> dict:
        return {
            "model": self.config.model, "fingerprint": self.pipe.fingerprint, "source": self.model.report(),
            "device": str(self.pipe.device),
            "dtype": str(self.pipe.dtype).removeprefix("torch."), "node": ray_node(), "pid": os.getpid(),
            "allocator": self.allocator,
            "scorer_fingerprints": self.scorers.fingerprints if self.scorers else {},
            "scorer_sources": {n: r.report() for n, r in self.scorer_sources.items()},
            "adapters": self.adapter_files.fingerprints(), "inpainting_unet": self.pipe.inpainting_unet,
        }

    def progress(self) -> tuple[str, int]:
        """(current shard, images of it with an outcome so far)."""
        return self._shard, self._images_done

    def run_shard(self, shard: Shard) -> dict:
        start = time.perf_counter()
        self._shard, self._images_done = shard.id, 0
        if self.pipe.device.type == "cpu":
            if self.config.cpu_threads:
                torch.set_num_threads(self.config.cpu_threads)  # here: the setting belongs to the calling thread
            # Rows per call depend on this thread's torch thread count.
            self.pipe.batching = Batching.for_device(self.pipe.device, self.pipe.dtype, self.pipe.compiled)
        rows = storage.DEFAULT_RETRY.call(f"reading the rows of {shard.id}", read_shard, self.manifest, shard,
                                          self.config.defaults)
        if self._job is None:
            self._job = self.out.read_job()
        shard_writer = ShardWriter(self.out, self.writer, rows, job=self._job, model=self.config.model,
                                   model_fingerprint=self.pipe.fingerprint, model_revision=self.model.revision,
                                   fence=self._fence)
        generating, errors = 0.0, []
        if self.pipe.compiled:
            allow_recompiles(self.batch_sizes.unet_shapes())
        self._tries, self._scoring_seconds = {}, 0.0
        attempt_round = rows.items
        while attempt_round:  # the rows, then round after round the next attempts of those --keep rejected
            self._next_round = []
            round_batches = batches(attempt_round, lambda item: self.batch_sizes.rows(item.height, item.width))
            for batch, next_batch in zip(round_batches, round_batches[1:] + [None]):
                t = time.perf_counter()
                errors += self._run_batch(shard_writer, batch, next_batch)
                generating += time.perf_counter() - t
            attempt_round = self._next_round
        self._prepared = None  # made for a call that did not come (a halved batch); its memory goes back
        if rows.items and len(errors) == len(rows.items):
            raise ShardFailed(f"{shard.id}: all {len(errors)} images failed; the first error: {errors[0]}")
        if shard.piece:  # one row of a split shard: the driver commits the shard once every piece is back
            records = shard_writer.collect()
            failures = sum("error" in r for r in records)
            return {"shard": shard.id, "images": len(records) - failures, "failures": failures, "records": records,
                    "generating_seconds": generating, "scoring_seconds": self._scoring_seconds,
                    "seconds": time.perf_counter() - start}
        result = shard_writer.commit()
        return {"shard": shard.id, "images": result.images, "failures": result.failures,
                "generating_seconds": generating, "scoring_seconds": self._scoring_seconds,
                "seconds": time.perf_counter() - start}

    def _run_batch(self, shard_writer: ShardWriter, batch: list[WorkItem],
                   next_batch: list[WorkItem] | None) -> list[str]:
        """Generate one batch and record every image's outcome; returns the errors (not NaNs) recorded. A row
        whose init image or mask cannot be used is recorded as a failure first, and the others run."""
        self._load_inputs(batch)
        for item in batch:
            if isinstance(self._inputs[item.id], str):  # a row's own fault: it fails alone, the actor is fine
                shard_writer.fail(item, self._inputs[item.id], attempts=1)
                self._images_done += 1
        usable = [item for item in batch if not isinstance(self._inputs[item.id], str)]
        try:
            return self._run_usable(shard_writer, usable, next_batch) if usable else []
        finally:
            for item in batch:
                self._inputs.pop(item.id, None)

    def _run_usable(self, shard_writer: ShardWriter, batch: list[WorkItem],
                    next_batch: list[WorkItem] | None) -> list[str]:
        """`_run_batch` for rows with their inputs loaded: in calls of their size's rows (fewer once a call runs
        out of memory). Each call prepares the next one's inputs (this batch's next rows, or `next_batch`'s
        first) before it waits for its images."""
        height, width = batch[0].height, batch[0].width
        errors, done = [], 0
        while done < len(batch):
            chunk, padded = self._call_rows(batch, done)
            following = (batch, done + len(chunk)) if done + len(chunk) < len(batch) else (next_batch, 0)
            start = time.perf_counter()
            failure, out_of_memory = None, False
            try:
                images = self._generate(padded, lambda: self._prepare(*following))[:len(chunk)]
            except NonFiniteOutputError as e:
                images = e.images[:len(chunk)]
            except torch.OutOfMemoryError as e:
                failure, out_of_memory = _describe(e), True
            except Exception as e:
                failure = _describe(e)
            # Out of the except block: the failed call's tensors, held by its traceback, are free now.
            if failure is None:
                self._record(shard_writer, chunk, images, (time.perf_counter() - start) / len(chunk), attempts=1)
            else:
                if self.pipe.device.type == "cuda":
                    torch.cuda.empty_cache()  # the failed call left its blocks cached
                if out_of_memory and len(padded) > 1:
                    self.batch_sizes.halve(height, width, len(padded))
                    continue
                errors += self._run_alone(shard_writer, chunk, failure)
            done += len(chunk)
        return errors

    def _call_rows(self, batch: list[WorkItem], done: int) -> tuple[list[WorkItem], list[WorkItem]]:
        """The rows of `batch`'s pipeline call that starts at row `done`, and those padded to a bucket
        (pad rows repeat the last row and are dropped: a compiled UNet meets only the buckets' row counts)."""
        rows = self.batch_sizes.rows(batch[0].height, batch[0].width)
        chunk = batch[done:done + rows]
        pad = self.batch_sizes.padded(len(chunk), rows) - len(chunk) if self.pad_batches else 0
        return chunk, chunk + [chunk[-1]] * pad

    def _prepare(self, batch: list[WorkItem] | None, done: int) -> None:
        """Encode the prompts and draw the noise of the call that will come next (Pipeline.prepare), while
        the device still works on this one."""
        self._prepared = None
        if batch is None:
            return
        _, padded = self._call_rows(batch, done)
        first = padded[0]
        if self.merged_loras is not None and self.merged_loras.active != first.loras:
            return  # its prompts need the text encoder with its own LoRAs, merged once this call is done
        self._load_inputs(padded)
        if any(isinstance(self._inputs[i.id], str) for i in padded):
            return  # the call will be of other rows
        try:
            self._prepared = (_call_key(padded), self.pipe.prepare(
                [i.prompt for i in padded], seeds=[i.seed for i in padded],
                negative_prompts=[i.negative_prompt for i in padded], guidance_scale=[i.guidance_scale for i in padded],
                height=first.height, width=first.width, **self._image_args(padded)))
        except Exception:  # the call itself prepares them again, and meets the error where it is handled
            self._prepared = None

    def _run_alone(self, shard_writer: ShardWriter, batch: list[WorkItem], batch_error: str) -> list[str]:
        """After a batch failed: each of its rows once more on its own, to find the rows at fault."""
        errors = []
        for item in batch:
            start = time.perf_counter()
            try:
                images = self._generate([item])
            except NonFiniteOutputError:
                images = [None]
            except Exception as e:
                error = _describe(e)
                shard_writer.fail(item, error if len(batch) == 1 else f"{error} (its batch failed with: {batch_error})",
                                  attempts=2)
                self._images_done += 1
                if not isinstance(e, RowTimeout):
                    errors.append(error)
                continue
            self._record(shard_writer, [item], images, time.perf_counter() - start, attempts=2)
        return errors

    def _record(self, shard_writer: ShardWriter, items: list[WorkItem], images: list, seconds: float, attempts: int):
        scores = self._score(items, images)
        for item, image, row_scores in zip(items, images, scores):
            if image is None:  # NaN/inf: the same seed would fail the same way, so no retry
                shard_writer.fail(item, f"NonFiniteOutputError: the image came out NaN/inf (dtype {self.dtype}; "
                                        "fp32 or a smaller guidance_scale may help)", attempts=attempts)
            elif self.rule is None:
                shard_writer.add(item, image, scheduler_config=self._scheduler_config(item.scheduler), seconds=seconds,
                                 scores=row_scores, inputs=self._inputs[item.id].inputs)
            elif not self._judge(shard_writer, item, image, row_scores, seconds):
                continue  # tried again in the next round
            self._images_done += 1

    def _score(self, items: list[WorkItem], images: list) -> list[dict | None]:
        """The score columns of each image (None for a NaN one); None each without --score or --keep."""
        if self.scorers is None:
            return [{} if self.rule else None for _ in images]
        start = time.perf_counter()
        made = [(item.prompt, image) for item, image in zip(items, images) if image is not None]
        scored = iter(self.scorers.score([p for p, _ in made], [i for _, i in made]))
        self._scoring_seconds += time.perf_counter() - start
        return [None if image is None else next(scored) for image in images]

    def _judge(self, shard_writer: ShardWriter, item: WorkItem, image, row_scores: dict, seconds: float) -> bool:
        """Apply --keep to one image: write it (kept, or rejected on its row's last attempt) and return
        True, or queue the row's next attempt and return False."""
        tries = self._tries.setdefault(item.id, _Tries(item.seed, [0] * len(self.rule.clauses)))
        passed = self.rule.clause_results({**row_scores, **{c: getattr(item, c) for c in scorers.PARAM_COLUMNS}})
        tries.clauses_passed = [n + p for n, p in zip(tries.clauses_passed, passed)]
        tries.seconds += seconds
        kept = all(passed)
        if not kept and tries.attempt < self.config.scoring.max_attempts:
            tries.attempt += 1
            self._next_round.append(replace(item, seed=scorers.attempt_seed(tries.row_seed, tries.attempt)))
            return False
        columns = {**row_scores, "row_seed": tries.row_seed, "attempt": tries.attempt, "kept": kept,
                   "keep_clauses_passed": tries.clauses_passed}
        dropped = not kept and self.config.scoring.drop_rejected
        shard_writer.add(item, None if dropped else image, scheduler_config=self._scheduler_config(item.scheduler),
                         seconds=tries.seconds, scores=columns, inputs=self._inputs[item.id].inputs)
        return True

    def _generate(self, batch: list[WorkItem], before_wait: Callable[[], None] | None = None) -> list:
        first = batch[0]  # a batch shares mode, size, steps, scheduler and LoRAs (see plan.WorkItem.batch_key)
        prepared, self._prepared = self._prepared, None
        if self.merged_loras is not None:
            self.merged_loras.activate([(self.loras[name], scale) for name, scale in first.loras])
        return self.pipe.generate(
            [i.prompt for i in batch], seeds=[i.seed for i in batch], negative_prompts=[i.negative_prompt for i in batch],
            steps=first.steps, guidance_scale=[i.guidance_scale for i in batch], height=first.height, width=first.width,
            scheduler=first.scheduler, output="np", progress=self._time_limit(len(batch)),
            prepared=prepared[1] if prepared is not None and prepared[0] == _call_key(batch) else None,
            before_wait=before_wait, **self._image_args(batch),
        )

    def _image_args(self, batch: list[WorkItem]) -> dict:
        """generate's init images, masks and strength for a batch of loaded rows (none for text to image)."""
        first, loaded = batch[0], [self._inputs[i.id] for i in batch]
        args = {}
        if first.init_image is not None:
            args.update(init_images=[r.init_image for r in loaded], strength=first.strength)
        if first.mask_image is not None:
            args.update(mask_images=[r.mask_image for r in loaded])
        return args

    def _load_inputs(self, items: list[WorkItem]) -> None:
        """Read, decode and fit to its size each input image of `items` not loaded yet; a row whose image
        cannot be used gets the reason instead. An image that several of them use at one size (a row's
        `num_images`, a picture shared by rows) is read once."""
        loaded: dict[tuple, tuple | str] = {}  # (column, the image, width, height) -> (pixels, sha256), or why not
        for item in items:
            if item.id not in self._inputs:
                self._inputs[item.id] = self._row_inputs(item, loaded)

    def _row_inputs(self, item: WorkItem, loaded: dict[tuple, tuple | str]) -> _RowInputs | str:
        fitted = {}
        for column, ref in (("init_image", item.init_image), ("mask_image", item.mask_image)):
            if ref is None:
                continue
            # Bytes from the manifest are one buffer object for all of a row's images.
            key = (column, ref if isinstance(ref, str) else id(ref), item.width, item.height)
            if key not in loaded:
                try:
                    loaded[key] = images.load(ref, column, item.width, item.height, self.config.defaults.resize,
                                              self.config.storage_options)
                except (OSError, ValueError, storage.StorageError) as e:
                    shown = ref if isinstance(ref, str) else f"({ref.size} bytes in the manifest)"
                    loaded[key] = f"{column} {storage.redact_url(shown)}: {_describe(e)}"
            if isinstance(loaded[key], str):
                return loaded[key]
            fitted[column] = loaded[key]
        init, mask = fitted.get("init_image", (None, None)), fitted.get("mask_image", (None, None))
        return _RowInputs(init[0], mask[0], Inputs(init[1], mask[1],
                                                   tokens_used(item.prompt, item.negative_prompt, self.embeddings)))

    def _time_limit(self, images: int):
        """A progress callback that stops the batch once it has run past --row-timeout per image."""
        limit = self.config.row_timeout
        if limit is None:
            return None
        deadline = time.monotonic() + limit * images

        def check(step: int, total: int) -> None:
            if time.monotonic() > deadline:
                raise RowTimeout(f"ran past --row-timeout {limit:g} s per image; stopped at step {step} of {total}")

        return check

    def _fence(self) -> None:
        if self.config.run_id is not None:
            lease.check_holder(self.out, self.config.run_id)

    def _scheduler_config(self, name: str) -> dict:
        if name not in self._scheduler_configs:
            self._scheduler_configs[name] = self.pipe.make_scheduler(name).config
        return self._scheduler_configs[name]

    def close(self) -> None:
        self.writer.close()
        self.manifest.close()


def _call_key(items: list[WorkItem]) -> tuple:
    """What identifies a pipeline call's rows (an image id's later --keep attempts have other seeds)."""
    return tuple((i.id, i.seed) for i in items)


def _describe(error: BaseException) -> str:
    """`Type: message` plus where it was raised — enough to act on from failures/ alone."""
    frame = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" (at {os.path.basename(frame[0].filename)}:{frame[0].lineno})" if frame else ""
    return f"{type(error).__name__}: {error}{where}"


def ray_node() -> str:
    if not ray.is_initialized():  # a runner outside Ray (asking Ray would start it)
        return "local"
    return ray.get_runtime_context().get_node_id()[:8]


class OneThreadRunner:
    """A ShardRunner whose model work (loading, compiling, every shard) runs on one thread of its own,
    whichever thread calls: CUDA graphs, compiled code and torch's thread settings belong to a thread.
    `progress` answers on the caller's thread. `start` loads the model (errors come back as themselves,
    which a failing constructor's would not); calls to `start` and `run_shard` queue for the thread."""

    def __init__(self, config: ActorConfig):
        self.config = config
        self.runner: ShardRunner | None = None
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdbatch-model")

    def start(self) -> dict:
        return self._model_thread.submit(self._start).result()

    def _start(self) -> dict:
        if self.runner is None:
            self.runner = ShardRunner(self.config)
        return self.runner.info()

    def run_shard(self, shard: Shard) -> dict:
        return self._model_thread.submit(self.runner.run_shard, shard).result()

    def progress(self) -> tuple[str, int]:
        runner = self.runner
        return ("", 0) if runner is None else runner.progress()


# Two Ray threads: `progress` answers while `run_shard` waits for the model thread.
ShardActor = ray.remote(max_concurrency=2)(OneThreadRunner)
