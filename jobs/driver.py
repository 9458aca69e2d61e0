"""`sdbatch run`: check everything, start or join Ray, hand shards to actors, finish the dataset.

1. Check, with nothing written and no Ray: options, job defaults, every manifest row, the model
   source (and the scorers' and adapters' sources, the keep rule), and OUT (empty, or the same job, and
   writable: a probe file). Bad input stops here (exit code 2). Then the lease on OUT
   (jobs.lease): a folder another driver holds is refused.
2. Ray: start a local cluster, or join one (`--ray-address`, or RAY_ADDRESS as set inside
   `ray job submit`).
3. Actors: one per GPU (`num_gpus=1`); without GPUs, CPU actors of one core each. Each loads
   the model and reports its fingerprint. The first report completes the job's identity, and
   OUT is prepared: `_sdbatch/job.json` written, or, on a re-run, the done shards listed.
4. Dispatch: the next shard goes to whichever actor is free (`ray.wait`), so a slow GPU only
   slows itself. A shard whose actor dies (or raises) is retried on a fresh actor up to
   SHARD_ATTEMPTS times, then its rows go to failures/; dead actors are replaced up to a budget.
   A shard that ran past its deadline twice is split: each of its rows runs alone, as a piece
   with a deadline of its own, so only a row that hangs fails; the driver commits the shard
   (one metadata file, as always) once every piece has an outcome.
   Watchdog: an actor whose shard runs past --shard-timeout, or that finishes no image for
   STALL_FACTOR times a batch's measured time (at least STALL_FLOOR seconds), is killed and
   replaced, and its shard counts as a failed attempt: progress replies alone do not prove work.
   A storage failure stops the job: retrying elsewhere would fail the same way.
5. Finish: `_SUCCESS` with the summary, once every shard is done.

The driver holds shard numbers and counters, never prompts or images: actors read their rows
from the manifest and write their outputs themselves.
"""
import datetime
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TextIO

import ray
import torch

from jobs import devices, scorers, sources, storage
from jobs.adapters import Adapters
from jobs.actor import SCORER_SOURCES, ActorConfig, ShardActor
from jobs.buckets import most_rows
from jobs.lease import Lease, LeaseLost, check_holder
from jobs.manifest import Defaults, open_manifest, validate
from jobs.plan import Shard, manifest_shards, read_shard
from jobs.progress import Progress
from jobs.sink import (DEFAULT_SHARD_SIZES, FORMATS, PNG, ImageEncoding, ImageWriter, JobSpec, Output, ShardWriter,
                       identity_of)
from sdcore.errors import SdcoreError

MODES = ("auto", "resume", "overwrite")
SHARD_ATTEMPTS = 3  # tries of one shard before its rows are recorded as failures
SPLIT_AFTER_EXPIRIES = 2  # a shard past its deadline this often runs its rows alone (its last attempt)
START_TIMEOUT = 600.0  # seconds without any working actor (loading, waiting for a GPU node) before giving up
TICK = 0.5  # seconds between progress updates
GET_TIMEOUT = 60.0  # for ray.get of results that ray.wait already reported ready
STALL_FACTOR = 5.0  # an image may take this many times the job's measured time per batch
STALL_FLOOR = 60.0  # seconds; before any image is measured, only --shard-timeout applies


class RunError(Exception):
    """The job cannot run or cannot finish. exit_code 2: the input is at fault; 1: something else."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunOptions:
    manifest: str
    model: str
    output: str
    defaults: Defaults = field(default_factory=Defaults)
    model_cache: str | None = None  # on each node; None: jobs.sources.default_cache() there
    actors: int | None = None  # default: one per GPU, or 1 without GPUs
    batch_size: int | None = None  # rows per pipeline call; None: auto (jobs.buckets)
    shard_size: int | None = None  # None: a continued job's own, else sink.DEFAULT_SHARD_SIZES[format]
    device: str = "auto"
    dtype: str = "auto"  # fp16 on GPU actors, fp32 on CPU ones; a resumed dataset keeps the dtype it was made in
    compile: bool = False  # torch.compile the UNet on every actor
    cuda_graphs: bool = False  # compile in mode "reduce-overhead" (CUDA graphs); implies compile
    ray_address: str | None = None
    storage_options: dict = field(default_factory=dict)
    mode: str = "auto"  # see sink.Output.prepare
    format: str = "files"  # --format: see sink.FORMATS
    image: ImageEncoding = PNG  # --image-format and --quality
    shard_timeout: float | None = None  # seconds a shard may run (None: only the stall watchdog)
    row_timeout: float | None = None  # seconds per image before a batch is stopped (see jobs.actor)
    scoring: scorers.ScoreSpec = scorers.ScoreSpec()  # --score, --keep, ... (see with_scorer_defaults)
    adapters: Adapters = field(default_factory=Adapters)  # --lora and --embedding


@dataclass
class ActorStats:
    """One actor slot over the job (a replacement continues its slot)."""

    slot: int
    device: str = "?"
    node: str = "?"
    allocator: str = "?"  # sdcore.allocator's report from the actor's process
    model_files_downloaded: int = 0  # by this slot's actors: the node's cache had the others
    images: int = 0
    failures: int = 0
    shards: int = 0
    busy_seconds: float = 0.0
    scoring_seconds: float = 0.0  # of busy_seconds: --score's scorers
    restarts: int = 0

    def as_dict(self) -> dict:
        rate = self.images / self.busy_seconds if self.busy_seconds else 0.0
        return {"actor": self.slot, "device": self.device, "node": self.node, "allocator": self.allocator,
                "model_files_downloaded": self.model_files_downloaded, "images": self.images, "failures": self.failures, "shards": self.shards,
                "busy_seconds": round(self.busy_seconds, 3), "scoring_seconds": round(self.scoring_seconds, 3),
                "images_per_second": round(rate, 3), "restarts": self.restarts}


@dataclass
class RunResult:
    output: str
    images: int  # in the whole dataset
    failures: int
    run_images: int  # made by this run
    run_failures: int
    shards_run: int
    shards_skipped: int  # done before this run
    wall_seconds: float
    startup_seconds: float | None  # from the start of the run until the first actor had loaded the model
    working_seconds: float | None  # from then until the last shard was committed (Ray's shutdown left out)
    actors: list[ActorStats]
    actor_restarts: int
    keep: dict | None = None  # jobs.scorers.keep_report, with --keep


# --- 1. checks before anything happens -----------------------------------------------------------

def check_options(opts: RunOptions) -> None:
    problems = []
    for name, value in (("--actors", opts.actors), ("--batch-size", opts.batch_size), ("--shard-size", opts.shard_size)):
        if value is not None and value < 1:
            problems.append(f"{name} must be at least 1, got {value}")
    for name, value in (("--shard-timeout", opts.shard_timeout), ("--row-timeout", opts.row_timeout)):
        if value is not None and not value > 0:
            problems.append(f"{name} must be a number of seconds > 0, got {value}")
    if opts.device not in devices.DEVICES:
        problems.append(f"--device must be one of {', '.join(devices.DEVICES)}, got {opts.device!r}")
    if opts.dtype not in devices.DTYPE_CHOICES:
        problems.append(f"--dtype must be one of {', '.join(devices.DTYPE_CHOICES)}, got {opts.dtype!r}")
    if opts.format not in FORMATS:
        problems.append(f"--format must be one of {', '.join(FORMATS)}, got {opts.format!r}")
    if opts.mode not in MODES:
        problems.append(f"mode must be one of {', '.join(MODES)}, got {opts.mode!r}")
    problems += scoring_problems(opts)
    problems += opts.adapters.problems(opts.storage_options, opts.model_cache)
    # A listing or an API call: seconds, nothing downloaded. auto is checked as fp32: each actor
    # selects the files again for the dtype it runs in.
    try:
        sources.check(opts.model, opts.storage_options, devices.DTYPES.get(opts.dtype, torch.float32), opts.model_cache)
    except (sources.SourceError, storage.StorageError, PermissionError) as e:
        problems.append(str(e))
    if opts.device == "cuda" and not joins_cluster(opts) and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device is visible here, and the local Ray cluster would have none; "
                        "use --device auto or cpu, or --ray-address of a cluster with GPUs")
    if opts.cuda_graphs and (opts.device == "cpu" or (not joins_cluster(opts) and not torch.cuda.is_available())):
        problems.append("--cuda-graphs needs CUDA, and " + ("--device cpu runs on the CPU" if opts.device == "cpu" else
                        "no CUDA device is visible here"))
    if problems:
        raise RunError("; ".join(problems), 2)


def with_scorer_defaults(spec: scorers.ScoreSpec, model: str) -> scorers.ScoreSpec:
    """--safety-checker defaults to the model's own (its folder's safety_checker/ and feature_extractor/)."""
    if "nsfw" in spec.scores and spec.safety_checker is None and sources.parse(model).kind != "builtin":
        return replace(spec, safety_checker=model)
    return spec


def scoring_problems(opts: RunOptions) -> list[str]:
    """What is wrong with --score, the scorers' sources and --keep (each source is listed, not loaded)."""
    spec, problems = opts.scoring, []
    try:
        spec.rule()
    except scorers.KeepRuleError as e:
        problems.append(str(e))
    if spec.max_attempts < 1:
        problems.append(f"--max-attempts must be at least 1, got {spec.max_attempts}")
    if spec.keep is None and (spec.max_attempts > 1 or spec.drop_rejected):
        problems.append("--max-attempts and --drop-rejected apply to images --keep rejects; there is no --keep")
    needs = {"clip_model": {"clip", "aesthetic"} & set(spec.scores), "safety_checker": {"nsfw"} & set(spec.scores),
             "aesthetic_model": {"aesthetic"} & set(spec.scores)}
    for option, layout in SCORER_SOURCES.values():
        source = getattr(spec, option)
        if needs[option] and source is None:
            why = f" ({opts.model} has no safety checker)" if option == "safety_checker" else ""
            problems.append(f"--score {','.join(sorted(needs[option]))} needs {layout.option}{why}")
        elif source is not None and not needs[option]:
            problems.append(f"{layout.option} is given, but no --score uses it")
        elif source is not None:
            try:
                sources.check(source, opts.storage_options, torch.float32, opts.model_cache, layout=layout)
            except (sources.SourceError, storage.StorageError, PermissionError) as e:
                problems.append(str(e))
    return problems


def inpainting_problems(modes: dict[str, int], inpainting_unet: bool) -> list[str]:
    """An inpainting UNet (9 input channels) makes only inpaint rows: the manifest's other modes
    (`validate`'s image counts by mode) stop the job once an actor has loaded the model, before any shard."""
    other = {mode: n for mode, n in sorted(modes.items()) if mode != "inpaint"}
    if not inpainting_unet or not other:
        return []
    return [f"--model is an inpainting model, which needs an init_image and a mask_image on every row; "
            f"the manifest also has {', '.join(f'{n:,} {mode}' for mode, n in other.items())} image(s)"]


def joins_cluster(opts: RunOptions) -> bool:
    return bool(opts.ray_address or os.environ.get("RAY_ADDRESS"))


def plan_job(opts: RunOptions) -> tuple[JobSpec, Output]:
    """Validate the whole manifest and check OUT, writing nothing but a probe file that is removed
    at once. The model's fingerprint stays None until an actor has loaded the model, and so does the
    dtype of a new dataset with --dtype auto until the actors' device is planned."""
    opts.scoring = with_scorer_defaults(opts.scoring, opts.model)
    check_options(opts)
    with open_manifest(opts.manifest, opts.storage_options) as m:
        summary = validate(m, opts.defaults, opts.adapters.loras)
    out = Output(opts.output, opts.storage_options)
    job = JobSpec(
        manifest=opts.manifest, manifest_fingerprint=summary.fingerprint, model=opts.model, model_fingerprint=None,
        rows=summary.rows, images=summary.images, shard_size=opts.shard_size, defaults=opts.defaults,
        dtype=None if opts.dtype == "auto" else opts.dtype, format=opts.format, image=opts.image,
        settings={"batch_size": opts.batch_size or "auto", "actors": opts.actors, "device": opts.device,
                  "compile": opts.compile or opts.cuda_graphs, "cuda_graphs": opts.cuda_graphs,
                  "dtype_requested": opts.dtype, "ray_address": storage.redact_url(opts.ray_address or ""),
                  "storage_options": opts.storage_options, "model_cache": opts.model_cache,
                  "scorers": {option: storage.redact_url(getattr(opts.scoring, option) or "") or None
                              for option, _ in SCORER_SOURCES.values()},
                  "adapters": opts.adapters.settings(), "modes": summary.modes},
        scoring=opts.scoring.identity() | {"scorer_fingerprints": None if opts.scoring.scores else {}},
        # the files' sha256 come from the first actor, which reads them anyway
        adapters={"loras": None if opts.adapters.loras else {}, "embeddings": None if opts.adapters.embeddings else {}},
    )
    existing = out.check(job, mode=opts.mode)
    if job.dtype is None and existing is not None and opts.mode != "overwrite":
        # A resume stays exact whatever machine runs it: auto continues in the dtype the dataset was made in.
        job.dtype = identity_of(existing).get("dtype")
    if job.shard_size is None:  # a default that depends on --format must not break continuing older jobs
        continued = existing is not None and opts.mode != "overwrite"
        job.shard_size = existing["identity"]["shard_size"] if continued else DEFAULT_SHARD_SIZES[opts.format]
    out.check_writable()
    return job, out


# --- 2. Ray and the actors' resources -------------------------------------------------------------

def connect_ray(opts: RunOptions) -> bool:
    """Start or join Ray; True if this call started it (and so must shut it down)."""
    if ray.is_initialized():  # an embedding program (or a test) already did
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    # ray.init installs a SIGTERM handler that exits at once with code 15; ours must stay in charge.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if joins_cluster(opts):
            ray.init(address=opts.ray_address, **quiet)
        else:
            # A CPU actor takes one core; make room for as many as were asked for.
            cpus = max(os.cpu_count() or 1, opts.actors or 1)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
    except BaseException as e:
        ray.shutdown()  # a start cut short (a signal, an error) must not leave Ray's processes running
        if isinstance(e, SystemExit) and e.code == signal.SIGTERM:
            raise KeyboardInterrupt from None
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    return True


@dataclass
class ActorPlan:
    count: int
    resources: dict  # ray .options(): num_gpus / num_cpus
    device: str  # what the actors resolve
    cpu_threads: int | None
    note: str | None = None  # a warning worth printing


def plan_actors(opts: RunOptions, cluster: dict) -> ActorPlan:
    gpus = int(cluster.get("GPU", 0))
    if opts.device == "cuda" or (opts.device == "auto" and gpus > 0):
        count = opts.actors or max(gpus, 1)
        note = None
        if gpus and count > gpus:
            note = f"--actors {count}, but the cluster has {gpus} GPU(s) now: the others wait for a GPU"
        elif not gpus:
            note = "the cluster has no GPU yet: the actors wait for one (an autoscaler may add GPU nodes)"
        # An actor on a GPU slot must run on its GPU: "auto" there would fall back to the CPU, silently.
        return ActorPlan(count, {"num_gpus": 1, "num_cpus": 1}, "cuda", None, note)
    # One core and one torch thread per CPU actor, whatever the machine: the number of threads
    # changes the low bits of CPU results, and images must not depend on how many actors ran.
    count = opts.actors or 1
    cpus = int(cluster.get("CPU", 1))
    note = f"--actors {count}, but the cluster has {cpus} CPU(s): the others wait" if count > cpus else None
    return ActorPlan(count, {"num_cpus": 1}, "cpu", 1, note)


def resolve_job_dtype(job: JobSpec, plan: ActorPlan) -> None:
    """--dtype auto for a new dataset, once the actors' device is planned and before they start: the
    actors all run one dtype, and job.json records that one."""
    if job.dtype is None:
        job.dtype = devices.dtype_name("auto", plan.device)


# --- 3-5. the run ---------------------------------------------------------------------------------

@dataclass
class _Slot:
    stats: ActorStats
    handle: object = None
    ready: object = None  # ObjectRef of start() while the actor loads
    task: object = None  # ObjectRef of run_shard()
    shard: Shard | None = None
    progress_ref: object = None
    partial: int = 0  # images of the current shard so far
    dispatched: float = 0.0  # time.monotonic() when the shard was handed out
    last_image: float = 0.0  # time.monotonic() when the shard's image count last grew

    @property
    def alive(self) -> bool:
        return self.handle is not None


@dataclass
class _Split:
    """A shard whose rows run alone: the outcomes of its pieces so far."""

    shard: Shard
    pieces_left: int
    records: dict[str, dict] = field(default_factory=dict)  # image id -> ShardWriter.collect() record
    failed: dict[int, str] = field(default_factory=dict)  # manifest row -> why its piece failed


def _name(shard: Shard) -> str:
    return f"{shard.id} (row {shard.start} alone)" if shard.piece else shard.id


class _Run:
    def __init__(self, opts: RunOptions, job: JobSpec, out: Output, lease: Lease, plan: ActorPlan, stream: TextIO,
                 on_dispatch: Callable | None, started_at: float):
        self.opts, self.job, self.out, self.lease, self.plan = opts, job, out, lease, plan
        self.stream, self.on_dispatch = stream, on_dispatch
        self.config = ActorConfig(
            manifest=opts.manifest, output=opts.output, model=opts.model, model_cache=opts.model_cache,
            defaults=opts.defaults, device=plan.device,
            dtype=job.dtype, compile=opts.compile, cuda_graphs=opts.cuda_graphs, batch_size=opts.batch_size,
            storage_options=opts.storage_options,
            cpu_threads=plan.cpu_threads, keep_freed_memory=plan.device == "cpu",
            row_timeout=opts.row_timeout, run_id=lease.run_id, scoring=opts.scoring, adapters=opts.adapters,
        )
        job.settings |= {"actors": plan.count, "actor_resources": plan.resources}
        self.slots = [_Slot(ActorStats(i)) for i in range(plan.count)]
        self.restarts_left = 2 * plan.count + 1
        self.retry_queue: deque[Shard] = deque()
        self.todo: Iterator[Shard] | None = None  # set once OUT is prepared
        self.exhausted = False
        self.attempts: Counter[str] = Counter()
        self.expiries: Counter[str] = Counter()
        self.splits: dict[str, _Split] = {}
        self._manifest = None  # open while shards are listed from it
        self.done_before = self.failed_before = 0
        self.images = self.failures = self.shards_run = self.shards_skipped = 0
        self.progress: Progress | None = None
        self.last_working = time.monotonic()  # for START_TIMEOUT
        # time.monotonic() when the run began (checks and Ray start included), when the first actor
        # was ready, and when the last shard was committed
        self.started_at, self.first_ready, self.all_done = started_at, None, None
        self._driver_writer: ImageWriter | None = None
        self.measured_images, self.measured_seconds = 0, 0.0  # generation over the shards done, for the watchdog

    # actors

    def start_actor(self, slot: _Slot) -> None:
        # SPREAD: CPU actors use every node rather than packing the first (GPU actors spread anyway).
        slot.handle = ShardActor.options(**self.plan.resources, scheduling_strategy="SPREAD").remote(self.config)
        slot.ready = slot.handle.start.remote()

    def lose_actor(self, slot: _Slot, why: str) -> None:
        """The actor died or misbehaved: kill it and start a replacement while the budget lasts."""
        try:
            ray.kill(slot.handle)
        except Exception:
            pass
        slot.handle = slot.ready = slot.task = slot.shard = slot.progress_ref = None
        slot.partial = 0
        if self.restarts_left > 0:
            self.restarts_left -= 1
            slot.stats.restarts += 1
            self.say(f"actor {slot.stats.slot}: {why}; starting a replacement")
            self.start_actor(slot)
        else:
            self.say(f"actor {slot.stats.slot}: {why}; no replacement (too many actors lost already)")

    def on_started(self, slot: _Slot) -> None:
        ref, slot.ready = slot.ready, None
        try:
            info = ray.get(ref, timeout=GET_TIMEOUT)
        except ray.exceptions.RayTaskError as e:  # the model (or the manifest, or OUT) failed to load there
            cause = e.cause
            user = isinstance(cause, (SdcoreError, ValueError, storage.StorageError, PermissionError, FileNotFoundError))
            raise RunError(f"an actor could not start: {type(cause).__name__}: {cause}", 2 if user else 1) from None
        except ray.exceptions.RayError as e:
            self.lose_actor(slot, f"died while loading the model ({_first_line(e)})")
            return
        if problems := inpainting_problems(self.job.settings["modes"], info["inpainting_unet"]):
            raise RunError("; ".join(problems), 2)
        slot.stats.device, slot.stats.node, slot.stats.allocator = info["device"], info["node"], info["allocator"]
        source = info["source"]
        slot.stats.model_files_downloaded += source["downloaded_files"]
        if source["downloaded_files"]:
            self.say(f"actor {slot.stats.slot} on node {info['node']}: downloaded {source['downloaded_files']} model "
                     f"file(s), {source['downloaded_bytes'] / 2**20:,.1f} MiB in {source['seconds']:.1f} s")
        if self.first_ready is None:
            self.first_ready = time.monotonic()
        if self.job.model_fingerprint is None:
            self.job.model_fingerprint = info["fingerprint"]
            self.job.scoring["scorer_fingerprints"] = info["scorer_fingerprints"]
            self.job.adapters = info["adapters"]
            self.job.settings["model_source"] = {"revision": source["revision"], "files": source["files"]}
            self.job.settings["scorer_sources"] = info["scorer_sources"]
            self.prepare_output()
        elif (info["fingerprint"], info["scorer_fingerprints"], info["adapters"]) != (
                self.job.model_fingerprint, self.job.scoring["scorer_fingerprints"], self.job.adapters):
            raise RunError(f"actor {slot.stats.slot} on node {info['node']} loaded a different model, scorer or adapter "
                           f"({info['fingerprint']} {info['scorer_fingerprints']} {info['adapters']}, not "
                           f"{self.job.model_fingerprint} {self.job.scoring['scorer_fingerprints']} {self.job.adapters}): "
                           f"are {self.opts.model}, the scorers and the adapters the same on every node?", 2)
        self.last_working = time.monotonic()

    # shards

    def prepare_output(self) -> None:
        done = self.out.prepare(self.job, mode=self.opts.mode)
        self.shards_skipped = len(done)
        if done:
            status = self.out.status()
            self.done_before, self.failed_before = status.images_done + status.failures, status.failures
            self.say(f"resuming: {len(done):,} of {self.job.shards:,} shards already done")
        self._manifest = open_manifest(self.opts.manifest, self.opts.storage_options)
        self.todo = manifest_shards(self._manifest, self.job.shard_size, skip=done)
        self.progress = Progress(self.stream, self.job.images, self.done_before)

    def next_shard(self) -> Shard | None:
        if self.retry_queue:
            return self.retry_queue.popleft()
        shard = next(self.todo, None)
        self.exhausted = shard is None
        return shard

    def dispatch(self) -> None:
        for slot in self.slots:
            if slot.alive and slot.ready is None and slot.task is None:
                shard = self.next_shard()
                if shard is None:
                    return
                slot.shard, slot.partial = shard, 0
                slot.dispatched = slot.last_image = time.monotonic()
                slot.task = slot.handle.run_shard.remote(shard)
                if self.on_dispatch is not None:
                    self.on_dispatch(slot.handle, shard)

    def on_shard_done(self, slot: _Slot) -> None:
        ref, shard = slot.task, slot.shard
        slot.task = slot.shard = slot.progress_ref = None
        slot.partial = 0
        try:
            result = ray.get(ref, timeout=GET_TIMEOUT)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause
            if isinstance(cause, LeaseLost):
                raise RunError(str(cause), 2) from None
            if isinstance(cause, storage.StorageError):
                where = "" if shard.id in str(cause) else f"{shard.id}: "  # storage errors name their shard already
                raise RunError(f"{where}{cause}. The job stopped; no shard is half-committed: "
                               "re-run the same command to continue.") from None
            # Whatever went wrong may have broken the actor (a CUDA error poisons its device): use a fresh one.
            self.shard_failed(shard, f"{type(cause).__name__}: {cause}")
            self.lose_actor(slot, f"{_name(shard)} failed ({type(cause).__name__})")
            return
        except ray.exceptions.RayError as e:
            self.shard_failed(shard, f"the actor died ({_first_line(e)})")
            self.lose_actor(slot, f"died during {_name(shard)}")
            return
        self.last_working = time.monotonic()
        self.images += result["images"]
        self.failures += result["failures"]
        slot.stats.images += result["images"]
        slot.stats.failures += result["failures"]
        if shard.piece:
            self.splits[shard.id].records.update((r["id"], r) for r in result["records"])
            self.piece_done(shard)
        else:
            self.shards_run += 1
            slot.stats.shards += 1
        slot.stats.busy_seconds += result["generating_seconds"]
        slot.stats.scoring_seconds += result["scoring_seconds"]
        self.measured_images += result["images"] + result["failures"]
        self.measured_seconds += result["generating_seconds"]

    def check_deadlines(self) -> None:
        """Kill and replace an actor whose shard ran past its deadline; the shard is tried again."""
        now = time.monotonic()
        stall = None
        if self.measured_images:
            per_batch = most_rows(self.opts.batch_size, self.plan.device) * self.measured_seconds / self.measured_images
            stall = max(STALL_FLOOR, STALL_FACTOR * per_batch)
        for slot in self.slots:
            if slot.task is None:
                continue
            if self.opts.shard_timeout is not None and now - slot.dispatched > self.opts.shard_timeout:
                why = f"ran past --shard-timeout {self.opts.shard_timeout:g} s"
            elif stall is not None and now - slot.last_image > stall:
                why = f"finished no image for {now - slot.last_image:.0f} s (the job's batches take {per_batch:.1f} s)"
            else:
                continue
            shard = slot.shard
            self.shard_failed(shard, f"{_name(shard)} {why}", expired=True)
            self.lose_actor(slot, f"{_name(shard)} {why}; killed")

    def shard_failed(self, shard: Shard, error: str, *, expired: bool = False) -> None:
        """Queue the shard again (first in line), split it into its rows after it expired twice, or give
        up on it after SHARD_ATTEMPTS. A piece of a split shard is its row's last attempt."""
        if shard.piece:
            split = self.splits[shard.id]
            split.failed[shard.start] = error
            self.piece_done(shard)
            return
        self.attempts[shard.id] += 1
        self.expiries[shard.id] += expired
        if self.expiries[shard.id] >= SPLIT_AFTER_EXPIRIES and shard.rows > 1:
            # One hanging row would otherwise take the whole shard down with it.
            pieces = shard.pieces()
            self.say(f"{shard.id}: ran past its deadline {self.expiries[shard.id]} times; "
                     f"its {len(pieces)} rows run again one at a time")
            self.splits[shard.id] = _Split(shard, len(pieces))
            self.retry_queue.extendleft(reversed(pieces))
        elif self.attempts[shard.id] < SHARD_ATTEMPTS:
            self.retry_queue.appendleft(shard)
        else:
            self.give_up(shard, error)

    def _shard_writer(self, shard: Shard) -> tuple[ShardWriter, list]:
        """A writer for committing `shard` here in the driver (no actor is needed for that), and its items."""
        with open_manifest(self.opts.manifest, self.opts.storage_options) as m:
            rows = read_shard(m, shard, self.opts.defaults)
        if self._driver_writer is None:
            self._driver_writer = ImageWriter(self.out, threads=1)
        writer = ShardWriter(self.out, self._driver_writer, rows, job=self.out.read_job(), model=self.opts.model,
                             model_fingerprint=self.job.model_fingerprint,
                             model_revision=self.job.settings["model_source"]["revision"],
                             fence=lambda: check_holder(self.out, self.lease.run_id))
        return writer, rows.items

    def give_up(self, shard: Shard, error: str) -> None:
        """Commit the shard with every image recorded as a failure."""
        self.say(f"{shard.id}: gave up after {SHARD_ATTEMPTS} attempts; its rows go to failures/ ({error})")
        writer, items = self._shard_writer(shard)
        for item in items:
            writer.fail(item, f"gave up after {SHARD_ATTEMPTS} attempts of its shard; the last: {error}",
                        attempts=SHARD_ATTEMPTS)
        result = writer.commit()
        self.failures += result.failures
        self.shards_run += 1

    def piece_done(self, piece: Shard) -> None:
        """One piece of a split shard has an outcome; after the last, commit the shard from them all."""
        split = self.splits[piece.id]
        split.pieces_left -= 1
        if split.pieces_left:
            return
        writer, items = self._shard_writer(split.shard)
        failed = 0
        for item in items:
            if item.id in split.records:
                writer.adopt(item, split.records[item.id])
            else:
                writer.fail(item, f"gave up after {SHARD_ATTEMPTS} attempts of its shard, the last of its row alone; "
                                  f"the last: {split.failed[item.row]}", attempts=SHARD_ATTEMPTS)
                failed += 1
        writer.commit()
        del self.splits[piece.id]
        self.failures += failed
        self.shards_run += 1
        failed_rows = sorted(split.failed)
        self.say(f"{piece.id}: committed; its rows made alone"
                 + (f", except row(s) {', '.join(map(str, failed_rows))}: see failures/" if failed_rows else ""))

    # the loop

    def poll_progress(self) -> None:
        for slot in self.slots:
            if slot.task is None:
                continue
            if slot.progress_ref is not None:
                ready, _ = ray.wait([slot.progress_ref], timeout=0)
                if not ready:
                    continue
                try:
                    shard_id, count = ray.get(slot.progress_ref, timeout=GET_TIMEOUT)
                    if shard_id == slot.shard.id:
                        if count > slot.partial:
                            slot.last_image = time.monotonic()
                        slot.partial = count
                except ray.exceptions.RayError:
                    pass  # a dead actor shows up through its task
            slot.progress_ref = slot.handle.progress.remote()

    def done_count(self) -> int:
        return self.done_before + self.images + self.failures + sum(s.partial for s in self.slots)

    def show(self, force: bool = False) -> None:
        if self.progress is not None:
            self.progress.show(self.done_count(), self.failed_before + self.failures,
                               sum(s.alive and s.ready is None for s in self.slots), force=force)

    def say(self, text: str) -> None:
        if self.progress is not None:
            self.progress.message(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def loop(self) -> None:
        for slot in self.slots:
            self.start_actor(slot)
        while True:
            if self.lease.lost is not None:
                raise RunError(self.lease.lost, 2)
            if self.todo is not None:
                self.dispatch()
                if self.exhausted and not self.retry_queue and not any(s.task for s in self.slots):
                    break
            waiting = {s.ready: (s, self.on_started) for s in self.slots if s.ready is not None}
            waiting |= {s.task: (s, self.on_shard_done) for s in self.slots if s.task is not None}
            if not waiting:
                raise RunError("every actor was lost and no replacement is left; re-run the same command to continue")
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=TICK)
            for ref in ready:
                slot, handle = waiting[ref]
                handle(slot)
            if any(s.task is not None for s in self.slots):
                self.last_working = time.monotonic()
            elif time.monotonic() - self.last_working > START_TIMEOUT:
                have = ray.available_resources()
                raise RunError(f"no actor could start within {START_TIMEOUT:.0f} s (asked for {self.plan.resources} "
                               f"each; free now: CPU {have.get('CPU', 0):g}, GPU {have.get('GPU', 0):g})")
            self.poll_progress()
            self.check_deadlines()
            self.show()
        self.all_done = time.monotonic()
        self.show(force=True)

    def shutdown(self) -> None:
        for slot in self.slots:
            if slot.handle is not None:
                try:
                    ray.kill(slot.handle)
                except Exception:
                    pass
                slot.handle = None
        if self._driver_writer is not None:
            self._driver_writer.close()
        if self._manifest is not None:
            self._manifest.close()
        if self.progress is not None:
            self.progress.close()


def run(opts: RunOptions, *, stream: TextIO | None = None, on_dispatch: Callable | None = None) -> RunResult:
    """Run the whole job. `on_dispatch(actor_handle, shard)` is called as each shard is handed out
    (tests use it to kill actors mid-shard). Raises RunError; manifest/storage/output errors as themselves."""
    stream = stream or sys.stderr
    wall = time.monotonic()
    with _sigterm_as_interrupt():
        try:
            job, out = plan_job(opts)
        except KeyboardInterrupt:
            raise RunError("interrupted while checking the manifest and the output; nothing was written", 130) from None
        lease = Lease(out)
        try:
            took_over = lease.acquire()
            if took_over:
                stream.write(f"{took_over}\n")
            job_run = _run_actors(opts, job, out, lease, stream, on_dispatch, wall)
            return finish(out, job_run, time.monotonic() - wall)  # _SUCCESS too is written under the lease
        except KeyboardInterrupt:
            raise RunError("interrupted; re-run the same command to continue where it stopped", 130) from None
        finally:
            lease.release()


def _run_actors(opts: RunOptions, job: JobSpec, out: Output, lease: Lease, stream: TextIO,
                on_dispatch: Callable | None, started_at: float) -> "_Run":
    started_ray = False
    job_run = None
    try:
        started_ray = connect_ray(opts)
        plan = plan_actors(opts, ray.cluster_resources())
        if opts.cuda_graphs and plan.device != "cuda":
            raise RunError("--cuda-graphs needs CUDA, and the Ray cluster has no GPU; use --device cuda to wait for one",
                           2)
        resolve_job_dtype(job, plan)
        job_run = _Run(opts, job, out, lease, plan, stream, on_dispatch, started_at=started_at)
        kind = "GPU" if "num_gpus" in plan.resources else "CPU"
        job_run.say(f"{job.rows:,} rows, {job.images:,} images in {job.shards:,} shards; "
                    f"starting {plan.count} {kind} actor(s), {job.dtype}")
        if plan.note:
            job_run.say(f"warning: {plan.note}")
        job_run.loop()
    except KeyboardInterrupt:
        if job_run is None or job_run.first_ready is None:
            raise RunError("interrupted during start-up, before any actor was ready: nothing was generated, and "
                           "Ray was shut down; re-run the same command to start again", 130) from None
        raise
    finally:
        if job_run is not None:
            job_run.shutdown()
        if started_ray:
            ray.shutdown()
    return job_run


def finish(out: Output, r: _Run, wall: float) -> RunResult:
    status = out.status()
    actors = [s.stats for s in r.slots]
    startup = working = None
    if r.first_ready is not None:
        startup = r.first_ready - r.started_at
        working = r.all_done - r.first_ready
    summary = {
        "images": status.images_done, "failures": status.failures, "rows": status.rows,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "last_run": {
            "images": r.images, "failures": r.failures, "shards": r.shards_run, "shards_skipped": r.shards_skipped,
            "wall_seconds": round(wall, 3), "images_per_second": round(r.images / wall, 3) if wall else 0.0,
            "startup_seconds": None if startup is None else round(startup, 3),
            "working_seconds": None if working is None else round(working, 3),
            "actor_restarts": sum(a.restarts for a in actors), "actors": [a.as_dict() for a in actors],
        },
    }
    keep = scorers.keep_report(out)
    if keep is not None:
        summary["keep"] = keep
    # A re-run of a finished job did nothing: keep the _SUCCESS of the run that made the dataset.
    if not (r.shards_run == 0 and status.success is not None) and not out.finish(summary):
        raise RunError(f"{out.name}: the dispatch loop ended but not every shard is done; re-run to finish")
    return RunResult(output=out.name, images=status.images_done, failures=status.failures,
                     run_images=r.images, run_failures=r.failures, shards_run=r.shards_run,
                     shards_skipped=r.shards_skipped, wall_seconds=wall, startup_seconds=startup,
                     working_seconds=working, actors=actors, actor_restarts=sum(a.restarts for a in actors), keep=keep)


class _sigterm_as_interrupt:
    """`ray job stop` and schedulers send SIGTERM: stop like Ctrl-C (actors killed, Ray shut down)."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
