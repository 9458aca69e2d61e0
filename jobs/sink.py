"""The output dataset: its layout, image and Parquet writing, the shard commit, and resume.

    OUT/images/<shard>/<id>.png      PNG; iTXt chunk `sdbatch` = JSON of the generation parameters
                    (or .jpg, .webp)  JPEG or WebP; the same JSON in the EXIF UserComment
    OUT/shards/<shard>.tar           --format webdataset, instead of images/: per image <key>.<ext>,
                                     <key>.json (its metadata row) and <key>.txt (its prompt)
    OUT/metadata/<shard>.parquet     one row per image (METADATA_FIELDS + pass-through + version,
                                     + with --format parquet the image itself in an `image` column,
                                     + with --format webdataset its `key` and `tar`,
                                     + with --score or --keep SCORE_FIELDS);
                                     its key-value metadata holds job.json and the shard's bounds
    OUT/failures/<shard>.parquet     one row per image that failed for good (FAILURE_FIELDS + ...)
    OUT/_sdbatch/job.json            settings and the job's identity (fingerprints); no credentials
    OUT/_sdbatch/damaged/<time>/...  files found unreadable, moved aside (never deleted)
    OUT/_SUCCESS                     summary JSON, written last, once every shard is done

The one rule: a shard is done iff `metadata/<shard>.parquet` exists. A shard's images are
written first (by `ImageWriter`'s threads, overlapping the next batch's denoising; for webdataset
they are encoded there and kept in memory, and the shard's tar is written at commit), then its
failures file if it has failures, then its metadata file, atomically — even a shard whose
images all failed writes a metadata file with no rows. So resume is one listing of `metadata/`,
and a crash at any point leaves nothing that a re-run of that shard does not overwrite. Failure
files count only for done shards.

Damage is named and healed: a metadata or failures file that cannot be read is reported by
name, and the next run moves its shard's files into `_sdbatch/damaged/` and redoes the shard.
Every metadata file carries job.json in its Parquet key-value metadata, so a lost job.json is
rebuilt from them; `_SUCCESS` is removed as soon as a run finds a shard missing.

A folder holds one job: `Output.prepare` refuses to mix a different model, manifest, shard
size, sharding, dtype, defaults (--strength and --resize too), adapter files, output or image
format into it, and deletes an old dataset (only one it recognises by `_sdbatch/job.json`) only
when asked to overwrite.
"""
import contextlib
import datetime
import hashlib
import importlib.metadata
import io
import json
import os
import posixpath
import re
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import ExifTags, Image, PngImagePlugin

from jobs import storage
from jobs.adapters import LoRASet
from jobs.manifest import Defaults
from jobs.plan import ShardRows, WorkItem, count_shards, is_shard_id, shard_at, shard_id, shard_index
from jobs.progress import duration

try:
    SDBATCH_VERSION = importlib.metadata.version("sdbatch")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
    SDBATCH_VERSION = "unknown"

JOB_FILE = "_sdbatch/job.json"
DAMAGED_FOLDER = "_sdbatch/damaged"
JOB_KEY = b"sdbatch_job"  # the metadata files' key-value entry holding job.json
SHARD_KEY = b"sdbatch_shard"  # ... and the shard's bounds, [start, start_k, stop, stop_k] (see jobs.plan.Shard)
# How shards are cut: "images" (--shard-size images; jobs.plan) or "rows" (--shard-size rows, sdbatch
# before image shards). The two agree when every row asks for one image.
SHARDING = "images"
DATASET_FOLDERS = ("metadata", "failures", "images", "shards")
WRITE_PROBE = ".sdbatch-write-probe-"
# The hidden temporary files of local atomic writes (jobs.storage), and all the files sdbatch writes
# under DATASET_FOLDERS.
TEMPORARY = r"\.[^/]+\.tmp-[0-9a-f]{32}"
OURS = re.compile(rf"(metadata|failures)/shard-\d{{6,}}\.parquet|images/shard-\d{{6,}}/[^/]+\.(png|jpg|webp)"
                  rf"|shards/shard-\d{{6,}}\.tar"
                  rf"|(.*/)?{TEMPORARY}")
SUCCESS_FILE = "_SUCCESS"
PNG_KEY = "sdbatch"  # the PNG text chunk holding the generation parameters
PNG_COMPRESS_LEVEL = 6
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # --image-format -> file name extension
DEFAULT_QUALITY = 95  # JPEG/WebP: visually lossless, img2dataset's default, still far smaller than PNG
# Every encoder choice fixed, not left to Pillow's defaults, so that the same pixels give the same
# bytes (libjpeg-turbo and libwebp are deterministic for fixed settings).
JPEG_OPTIONS = {"subsampling": "4:2:0", "optimize": False, "progressive": False}
WEBP_OPTIONS = {"lossless": False, "method": 4}
USER_COMMENT_UNICODE = b"UNICODE\0"  # EXIF's character code for UCS-2/UTF-16 in the file's byte order
# --format: how a shard's images are stored. files: one object each; parquet: that and a copy in the
# metadata's `image` column (--embed-images); webdataset: one tar per shard, no loose files.
FORMATS = ("files", "webdataset", "parquet")
# --shard-size when a new job gives none (a continued job keeps its own). A webdataset shard is one
# tar, and WebDataset readers want tars of 100 MB-1 GB: 1000 images are ~80 MB of JPEG or ~450 MB of
# PNG at 512x512. Loose files gain nothing from big shards, which only make each redo cost more.
DEFAULT_SHARD_SIZES = {"files": 200, "parquet": 200, "webdataset": 1000}
# Tar members' fixed header fields, so the same shard gives the same tar bytes on any machine.
TAR_MEMBER = {"mtime": 0, "mode": 0o644, "uid": 0, "gid": 0, "uname": "", "gname": ""}

PARAM_FIELDS = [
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("steps", pa.int32()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("scheduler", pa.string()),
    pa.field("mode", pa.string()),  # txt2img, img2img or inpaint (jobs.plan.WorkItem.mode)
    pa.field("strength", pa.float64()),  # null for txt2img
]
# What an image was made from besides its parameters: the input images' sha256 (null where a row has
# none; never the bytes themselves) and the adapters, each with its file's sha256.
LORA_TYPE = pa.list_(pa.struct([("name", pa.string()), ("scale", pa.float64()), ("sha256", pa.string())]))
EMBEDDING_TYPE = pa.list_(pa.struct([("token", pa.string()), ("sha256", pa.string())]))
INPUT_FIELDS = [
    pa.field("init_image_sha256", pa.string()),
    pa.field("mask_image_sha256", pa.string()),
    pa.field("loras", LORA_TYPE),
    pa.field("embeddings", EMBEDDING_TYPE),  # the declared tokens its prompts use
]
METADATA_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("manifest_row", pa.int64()),
    *PARAM_FIELDS,
    *INPUT_FIELDS,
    pa.field("scheduler_config", pa.string()),  # JSON
    pa.field("model", pa.string()),
    pa.field("model_fingerprint", pa.string()),
    pa.field("model_revision", pa.string()),  # the Hub's commit or the remote files' versions; null for a local model
    pa.field("image_path", pa.string()),  # relative to OUT
    pa.field("image_sha256", pa.string()),
    pa.field("generation_seconds", pa.float64()),
]
# --score and --keep (jobs.scorers): the scores (null where not asked for), and the keep rule's
# outcome. `seed` is the seed the image was made with: `row_seed` on attempt 1, then derived from it.
SCORE_FIELDS = [
    pa.field("clip_score", pa.float64()),
    pa.field("nsfw_score", pa.float64()),
    pa.field("nsfw", pa.bool_()),
    pa.field("aesthetic_score", pa.float64()),
    pa.field("attempt", pa.int32()),  # which attempt made the image (1 without --keep)
    pa.field("row_seed", pa.int64()),  # the manifest row's seed for this image (before retries)
    pa.field("kept", pa.bool_()),  # passed --keep (true without one); false: its last attempt failed the rule
    pa.field("keep_clauses_passed", pa.list_(pa.int32())),  # per clause of --keep: attempts that passed it
]
# job.json's identity for a job without --score and --keep (so, too, for one written before them).
NO_SCORING = {"scores": [], "keep": "", "max_attempts": 1, "drop_rejected": False, "scorer_fingerprints": {}}
# ... and for one without adapters: the files' sha256 by LoRA name and by embedding token.
NO_ADAPTERS = {"loras": {}, "embeddings": {}}
FAILURE_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("manifest_row", pa.int64()),
    pa.field("error", pa.string()),
    pa.field("attempts", pa.int32()),
    *PARAM_FIELDS,
]
VERSION_FIELD = pa.field("sdbatch_version", pa.string())
# --format webdataset: where each image is, as WebDataset names it (see `webdataset_key`)
WEBDATASET_FIELDS = [pa.field("key", pa.string()), pa.field("tar", pa.string())]
# Not in a webdataset sample's JSON: it changes from run to run, and a redone shard's tar must not.
TIMING_FIELD = "generation_seconds"
# --format parquet: the image's bytes in the metadata, in the layout of the Hugging Face `datasets`
# Image feature, which the schema metadata names, so `load_dataset("parquet", ...)` shows images.
IMAGE_FIELD = pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))
HF_SCHEMA_METADATA = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}


T = TypeVar("T")


class OutputError(Exception):
    """OUT cannot be used for this job (a different job, not an sdbatch folder, ...)."""


class DamagedFile(OutputError):
    """A file of the dataset exists but cannot be read as what it should be."""

    def __init__(self, rel: str, reason: str):
        super().__init__(f"{rel}: {reason}")
        self.rel, self.reason = rel, reason


def metadata_schema(passthrough: pa.Schema, *, format: str = "files", scored: bool = False) -> pa.Schema:
    """The schema of every metadata file of a job: the fixed columns (and the scores), the manifest's
    pass-through columns with their own types, then the version (and the embedded image, or the
    webdataset key)."""
    fixed = METADATA_FIELDS + SCORE_FIELDS if scored else METADATA_FIELDS
    if format == "parquet":
        return pa.schema([*fixed, *passthrough, VERSION_FIELD, IMAGE_FIELD], metadata=HF_SCHEMA_METADATA)
    if format == "webdataset":
        return pa.schema([*fixed, *passthrough, VERSION_FIELD, *WEBDATASET_FIELDS])
    return pa.schema([*fixed, *passthrough, VERSION_FIELD])


def identity_of(job: dict | None) -> dict:
    """A job.json's identity; none for a runner used without a driver, whose job has the defaults."""
    return (job or {}).get("identity", {})


def is_scored(job: dict | None) -> bool:
    """Whether a job.json's metadata has SCORE_FIELDS."""
    identity = identity_of(job)
    return bool(identity.get("scores") or identity.get("keep"))


def failures_schema(passthrough: pa.Schema) -> pa.Schema:
    return pa.schema([*FAILURE_FIELDS, *passthrough, VERSION_FIELD])


def image_path(shard: str, image_id: str, extension: str) -> str:
    return f"images/{shard}/{image_id}.{extension}"


def metadata_path(shard: str) -> str:
    return f"metadata/{shard}.parquet"


def failures_path(shard: str) -> str:
    return f"failures/{shard}.parquet"


def tar_path(shard: str) -> str:
    return f"shards/{shard}.tar"


def webdataset_key(shard: str, position: int) -> str:
    """The WebDataset key of the image at `position` (0-based, manifest order) of `shard`:
    `shard-000003-000017`. Unique in the dataset, with no dot (WebDataset cuts names at the
    first one) whatever the ids hold; the metadata maps it to the id."""
    return f"{shard}-{position:06d}"


def webdataset_tar(members: dict[str, bytes]) -> bytes:
    """A tar of `members` (name -> bytes) that depends on nothing else: sorted names, which keeps
    each key's files together, fixed header fields, and POSIX ustar, the plainest format."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            for attribute, value in TAR_MEMBER.items():
                setattr(info, attribute, value)
            tar.addfile(info, io.BytesIO(members[name]))
    return buf.getvalue()


def output_format_of(job: dict | None) -> str:
    """The --format a job.json names; one written before formats says whether images were embedded."""
    identity = identity_of(job)
    return identity.get("format") or ("parquet" if identity.get("embed_images") else "files")


@dataclass(frozen=True)
class Inputs:
    """What the actor learnt of an image's inputs while making it: the sha256 of its init image and
    mask (jobs.images.read), and the declared embedding tokens its prompts use."""

    init_image_sha256: str | None = None
    mask_image_sha256: str | None = None
    embeddings: tuple[str, ...] = ()


def input_columns(loras: LoRASet, inputs: Inputs, adapters: dict) -> dict:
    """INPUT_FIELDS' values of one image made with `loras`; `adapters`: job.json's {"loras": {name: sha256},
    "embeddings": {token: sha256}}."""
    return {
        "init_image_sha256": inputs.init_image_sha256, "mask_image_sha256": inputs.mask_image_sha256,
        "loras": [{"name": n, "scale": s, "sha256": adapters["loras"].get(n)} for n, s in loras],
        "embeddings": [{"token": t, "sha256": adapters["embeddings"].get(t)} for t in sorted(inputs.embeddings)],
    }


def adapters_of(job: dict | None) -> dict:
    """A job.json's adapter files' sha256 (NO_ADAPTERS for one without, or written before them)."""
    identity = identity_of(job)
    return {k: identity.get(k) or v for k, v in NO_ADAPTERS.items()}


def generation_params(item: WorkItem, *, scheduler_config: dict, model: str, model_fingerprint: str,
                      model_revision: str | None, inputs: Inputs = Inputs(), adapters: dict = NO_ADAPTERS) -> dict:
    """What each image's metadata records: everything needed to make the image again."""
    return {
        "id": item.id, "prompt": item.prompt, "negative_prompt": item.negative_prompt, "seed": item.seed,
        "steps": item.steps, "guidance_scale": item.guidance_scale, "width": item.width, "height": item.height,
        "scheduler": item.scheduler, "mode": item.mode, "strength": item.strength,
        **input_columns(item.loras, inputs, adapters), "scheduler_config": scheduler_config, "model": model,
        "model_fingerprint": model_fingerprint, "model_revision": model_revision, "sdbatch_version": SDBATCH_VERSION,
    }


@dataclass(frozen=True)
class ImageEncoding:
    """--image-format and --quality: how generated pixels become the bytes of an image file."""

    format: str = "png"
    quality: int | None = None  # jpeg and webp; PNG is lossless and takes none

    def __post_init__(self):
        if self.format not in EXTENSIONS:
            raise ValueError(f"--image-format must be one of {', '.join(EXTENSIONS)}, got {self.format!r}")
        if self.format == "png" and self.quality is not None:
            raise ValueError("--quality applies to jpeg and webp; png is lossless")
        if self.format != "png" and not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise ValueError(f"--quality must be 1..100, got {self.quality}")

    @classmethod
    def of(cls, format: str, quality: int | None) -> "ImageEncoding":
        """From the command line's options: jpeg and webp without --quality get DEFAULT_QUALITY."""
        return cls(format, DEFAULT_QUALITY if quality is None and format != "png" else quality)

    @classmethod
    def of_job(cls, job: dict | None) -> "ImageEncoding":
        """The encoding a job.json names; one written before image formats (or none, for a runner used
        without a driver) means PNG."""
        identity = identity_of(job)
        return cls(identity.get("image_format", "png"), identity.get("quality"))

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    def encode(self, image, params: dict) -> bytes:
        """The image file of `image` (PIL image or uint8 [H, W, 3] array) with `params` as JSON:
        a PNG iTXt chunk, or the EXIF UserComment of a JPEG or WebP, where Automatic1111's
        "PNG Info" and exiftool look for generation parameters.

        Byte-deterministic: same pixels and params → same bytes (no timestamps, fixed encoder settings).
        UTF-8 iTXt rather than Latin-1 tEXt, and UTF-16 rather than ASCII in EXIF, because prompts are Unicode.
        """
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        text = json.dumps(params, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        buf = io.BytesIO()
        if self.format == "png":
            info = PngImagePlugin.PngInfo()
            info.add_itxt(PNG_KEY, text)
            image.save(buf, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
            return buf.getvalue()
        exif = Image.Exif()
        exif.endian = ">"  # the byte order of the UTF-16 below
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = USER_COMMENT_UNICODE + text.encode("utf-16-be")
        options = JPEG_OPTIONS if self.format == "jpeg" else WEBP_OPTIONS
        image.save(buf, format=self.format.upper(), exif=exif, quality=self.quality, **options)
        return buf.getvalue()


PNG = ImageEncoding()


def read_params(data: bytes) -> dict:
    """The generation parameters that `ImageEncoding.encode` put into an image file."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "PNG":
            return json.loads(im.text[PNG_KEY])
        exif = im.getexif()
        comment = exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        if not comment.startswith(USER_COMMENT_UNICODE):
            raise ValueError(f"{im.format} image: its EXIF UserComment is not sdbatch's parameters")
        return json.loads(comment[len(USER_COMMENT_UNICODE):].decode("utf-16-be" if exif.endian == ">" else "utf-16-le"))


@dataclass
class JobSpec:
    """One job's description, stored as `_sdbatch/job.json`. `identity()` is what must match for a
    re-run to continue the dataset in the same folder."""

    manifest: str
    manifest_fingerprint: str
    model: str
    model_fingerprint: str | None  # None only while checking OUT before the model is loaded
    rows: int
    images: int
    shard_size: int | None  # None only while checking OUT: then a continued job's, or a new one's default
    defaults: Defaults
    dtype: str | None  # None only while checking OUT for a new dataset with --dtype auto
    settings: dict = field(default_factory=dict)  # informational (batch size, actors, device, storage options, ...)
    format: str = "files"  # part of the identity: a dataset's shards are stored one way, with one schema
    image: ImageEncoding = PNG  # part of the identity: a dataset's images are of one format and quality
    sharding: str = SHARDING
    # part of the identity: --score, --keep, --max-attempts, --drop-rejected and the scorers' fingerprints
    # (None until an actor has loaded them), as in NO_SCORING
    scoring: dict = field(default_factory=lambda: dict(NO_SCORING))
    # part of the identity: the adapter files' sha256 as in NO_ADAPTERS (None until an actor has read them)
    adapters: dict = field(default_factory=lambda: dict(NO_ADAPTERS))

    @property
    def shards(self) -> int:
        return count_shards(self.images if self.sharding == "images" else self.rows, self.shard_size)

    def identity(self) -> dict:
        return {
            "manifest_fingerprint": self.manifest_fingerprint, "model_fingerprint": self.model_fingerprint,
            "shard_size": self.shard_size, "sharding": self.sharding, "defaults": asdict(self.defaults),
            "dtype": self.dtype, "format": self.format,
            "image_format": self.image.format, "quality": self.image.quality, **self.scoring, **self.adapters,
        }

    def to_json(self) -> dict:
        return {
            "format": 1,
            "sdbatch_version": SDBATCH_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "identity": self.identity(),
            "manifest": storage.redact_url(self.manifest),
            "model": storage.redact_url(self.model),
            "rows": self.rows,
            "images": self.images,
            "shards": self.shards,
            "settings": storage.redact(self.settings),
        }


def sharding_of(job: dict) -> str:
    """How a job.json's shards are cut; one written before image shards says nothing: rows."""
    sharding = identity_of(job).get("sharding")
    if sharding is None:  # the two schemes agree then: such a dataset goes on as an image-sharded one
        return "images" if job["images"] == job["rows"] else "rows"
    return sharding


def total_shards(job: dict) -> int:
    size = job["identity"]["shard_size"]
    return count_shards(job["images"] if sharding_of(job) == "images" else job["rows"], size)


def rows_done(bounds: dict[int, tuple[int, int, int, int]]) -> int:
    """Rows all of whose images are in done shards, from the done shards' bounds by shard index."""
    done = 0
    for index, (start, start_k, stop, _) in bounds.items():
        n = stop - start  # the rows whose last image is in this shard
        if n and start_k:  # the first of them began in earlier shards, which must be done too
            j = index - 1
            while j in bounds and bounds[j][0] == start and bounds[j][1] > 0:
                j -= 1
            if j not in bounds:
                n -= 1
        done += n
    return done


@dataclass
class OutputStatus:
    url: str
    job: dict
    shards: int
    shards_done: int
    rows: int
    rows_done: int
    images: int  # images the manifest asks for
    images_done: int  # rows in done shards' metadata
    failures: int  # rows in done shards' failure files
    success: dict | None  # the _SUCCESS summary, if the job finished
    # (shard, images, generation seconds) of every done shard, in shard order
    shard_timing: list[tuple[str, int, float]] = field(default_factory=list)
    first_failures: list[dict] = field(default_factory=list)  # id, error, attempts of the first few
    damaged: dict[str, str] = field(default_factory=dict)  # shard -> "file: why it cannot be read"
    job_from: str | None = None  # the metadata file job.json was rebuilt from, when it was missing
    # while a driver holds the lease (jobs.progress.with_eta): who, and the recent rate and ETA
    running: str | None = None
    images_per_second: float | None = None
    eta_seconds: float | None = None

    @property
    def success_is_stale(self) -> bool:
        return self.success is not None and self.shards_done < self.shards

    @property
    def finished(self) -> bool:
        return self.success is not None and not self.success_is_stale

    def as_dict(self, *, limit: int = 10) -> dict:
        """The facts `format` prints, as JSON-ready values (`sdbatch status --json`); the per-shard
        timing and failure lists are cut to `limit` entries like the tables, the totals are not."""
        images, seconds = sum(t[1] for t in self.shard_timing), sum(t[2] for t in self.shard_timing)

        def timing(shard: str, n: int, s: float) -> dict:
            return {"shard": shard, "images": n, "seconds": s, "images_per_second": n / s if s > 0 else None}

        return {
            "url": self.url, "manifest": self.job.get("manifest"), "model": self.job.get("model"),
            "shards_done": self.shards_done, "shards_total": self.shards, "shards_remaining": self.shards - self.shards_done,
            "rows_done": self.rows_done, "rows_total": self.rows,
            "images_done": self.images_done, "images_total": self.images, "failures": self.failures,
            "finished": self.finished, "success_stale": self.success_is_stale,
            "running": self.running,
            "images_per_second": None if self.images_per_second is None else round(self.images_per_second, 3),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "shard_timing": [timing(*t) for t in self.shard_timing[:limit]],
            "timing_total": timing("all", images, seconds),
            "first_failures": self.first_failures[:limit],
            "damaged": dict(sorted(self.damaged.items())),
            "job_from": self.job_from,
        }

    def format(self, *, limit: int = 10) -> str:
        """The counts, then up to `limit` lines each of per-shard timing and of failures."""
        success = "no" if self.success is None else (
            f"stale: {self.shards - self.shards_done:,} shard(s) missing; the next run removes it" if self.success_is_stale
            else "yes")
        lines = [
            f"{self.url}: sdbatch dataset of {self.job.get('manifest')} with {self.job.get('model')}",
            f"  shards    {self.shards_done:,}/{self.shards:,} done ({self.shards - self.shards_done:,} remaining)",
            f"  rows      {self.rows_done:,}/{self.rows:,} done",
            f"  images    {self.images_done:,}/{self.images:,} written",
            f"  failures  {self.failures:,}",
            f"  _SUCCESS  {success}",
        ]
        if self.running:
            rate = "-" if self.images_per_second is None else f"{self.images_per_second:.2f}"
            lines.append(f"  running   {self.running}: {rate} images/s recently, ETA {duration(self.eta_seconds)}")
        if self.job_from:
            lines.append(f"  job.json  missing; read from {self.job_from} (the next run writes it back)")
        for shard, problem in sorted(self.damaged.items()):
            lines.append(f"  damaged   {problem} (the next run moves it to {DAMAGED_FOLDER}/ and redoes {shard})")
        if self.shard_timing:
            # generation_seconds is each image's share of its batch's time: the sum is the time an
            # actor spent generating the shard, without reading rows and committing.
            lines += ["", f"  {'shard':<14}{'images':>8}{'seconds':>10}{'images/s':>10}"]
            images, seconds = sum(t[1] for t in self.shard_timing), sum(t[2] for t in self.shard_timing)
            for shard, n, s in [*self.shard_timing[:limit], ("all", images, seconds)]:
                lines.append(f"  {shard:<14}{n:>8,}{s:>10.1f}{_rate(n, s):>10}")
            if len(self.shard_timing) > limit:
                lines.insert(-1, f"  ... {len(self.shard_timing) - limit:,} more shards")
        if self.first_failures:
            lines += ["", f"  {'failed id':<20}{'attempts':>8}  error"]
            lines += [f"  {_cut(f['id'], 20):<20}{f['attempts']:>8}  {_cut(f['error'], 100)}" for f in self.first_failures[:limit]]
            if self.failures > limit:
                lines.append(f"  ... {self.failures - min(limit, len(self.first_failures)):,} more in failures/")
        return "\n".join(lines)


def _rate(images: int, seconds: float) -> str:
    return f"{images / seconds:.2f}" if seconds > 0 else "-"


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())  # errors can span lines
    return text if len(text) <= width else text[:width - 3] + "..."


class Output:
    """An output folder (any fsspec URL) and the operations on it as a whole."""

    def __init__(self, url: str, storage_options: dict | None = None, *, retry: storage.RetryPolicy = storage.DEFAULT_RETRY):
        self.url = url
        self.name = storage.redact_url(url)
        self.fs, self.root = storage.resolve(url, storage_options)
        self.retry = retry
        self.job_from: str | None = None  # set by read_job when job.json was missing

    def path(self, rel: str) -> str:
        return storage.join(self.root, rel)

    def write(self, rel: str, data: bytes) -> None:
        storage.write_atomic(self.fs, self.path(rel), data, retry=self.retry)

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        # s3fs answers from its cached listing of the parent when it has one; another process may have written since.
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self.retry.call(f"checking {self.name}/{rel}", self.fs.exists, path)

    def remove(self, rel: str, *, recursive: bool = False) -> None:
        try:
            self.retry.call(f"removing {self.name}/{rel}", self.fs.rm, self.path(rel), recursive=recursive)
        except FileNotFoundError:
            pass

    def _list(self, folder: str, suffix: str) -> list[str]:
        """Stems of the files in `folder` ending in `suffix` — one listing, temporary files skipped."""
        path = self.path(folder)
        self.fs.invalidate_cache(path)  # object-store listings are cached; another process may have written
        try:
            names = self.retry.call(f"listing {self.name}/{folder}", self.fs.ls, path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        stems = []
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(suffix) and not base.startswith("."):
                stems.append(base[: -len(suffix)])
        return stems

    def done_shards(self) -> set[str]:
        """The shards whose metadata file exists — the whole resume scan."""
        return {s for s in self._list("metadata", ".parquet") if is_shard_id(s)}

    def read_job(self) -> dict | None:
        """job.json; if it is missing, the copy in the first metadata file that has one (`job_from`
        says which), or None for a folder without shards."""
        self.job_from = None
        try:
            data = storage.read_bytes(self.fs, self.path(JOB_FILE), retry=self.retry)
        except (FileNotFoundError, NotADirectoryError):
            return self._job_from_metadata()
        try:
            return json.loads(data)
        except ValueError as e:
            raise OutputError(f"{self.name}/{JOB_FILE} is not valid JSON ({e}); remove it: "
                              "the next command rebuilds it from the metadata files") from None

    def _job_from_metadata(self) -> dict | None:
        shards = sorted(self.done_shards())
        for shard in shards:
            try:
                kv = self._parse(metadata_path(shard), lambda f: pq.read_schema(f).metadata or {})
            except DamagedFile:
                continue
            if JOB_KEY in kv:
                self.job_from = metadata_path(shard)
                return json.loads(kv[JOB_KEY])
        if shards:
            raise OutputError(
                f"{self.name}: {JOB_FILE} is missing and no metadata file records the job (written by an "
                f"older sdbatch?); restore {JOB_FILE} from a copy, or start anew: rm -r {self.name}")
        return None

    def success(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.fs, self.path(SUCCESS_FILE), retry=self.retry))
        except FileNotFoundError:
            return None

    def check(self, job: JobSpec, *, mode: str = "auto") -> dict | None:
        """What `prepare` would decide, without writing anything: the job already here (None for a
        new dataset), or OutputError if `job` may not go here.

        Identity values that are None are not compared: the driver checks OUT before any actor has
        loaded the model, i.e. before the model's fingerprint is known (and, with --dtype auto,
        before the dtype is).
        """
        if mode not in ("auto", "resume", "overwrite"):
            raise ValueError(f"mode must be auto, resume or overwrite, got {mode!r}")
        with self._errors():
            existing = self.read_job()
            if existing is None and mode == "resume":
                raise OutputError(f"{self.name}: nothing to resume (no {JOB_FILE})")
            if existing is None:
                self._require_empty()
            elif mode == "overwrite":
                self._dataset_files()
            else:
                there = {"image_format": "png", **NO_SCORING, **NO_ADAPTERS, **identity_of(existing),
                         "sharding": sharding_of(existing), "format": output_format_of(existing)}
                # defaults added since (--strength, --resize) had their default values then
                there["defaults"] = {**asdict(Defaults()), **there.get("defaults", {})}
                now = job.identity()
                differs = [k for k in sorted({*there, *now}) if now.get(k) is not None and there.get(k) != now.get(k)]
                if differs:
                    detail = "; ".join(f"{k}: {_brief(there.get(k))} there, {_brief(now.get(k))} now" for k in differs)
                    if "sharding" in differs:
                        detail += (" — an older sdbatch cut its shards by rows, and this manifest has rows of "
                                   "several images, which this one cuts by images")
                    raise OutputError(f"{self.name} holds a different job ({detail}); "
                                      "use --overwrite to replace it, or choose another output")
            return existing

    def prepare(self, job: JobSpec, *, mode: str = "auto") -> set[str]:
        """Make OUT ready for `job`; returns the shards already done.

        auto: start a new dataset in a missing or empty folder, or continue the same job.
        resume: continue the same job; refuse if there is none.
        overwrite: delete an earlier sdbatch dataset here (never anything else), start anew.
        """
        existing = self.check(job, mode=mode)
        with self._errors():
            if existing is None or mode == "overwrite":
                if existing is not None:
                    self._delete_dataset()
                self.write(JOB_FILE, json.dumps(job.to_json(), indent=2).encode())
                return set()
            return self._heal()

    def _heal(self) -> set[str]:
        """Before a run continues the job here: write back a lost job.json, move damaged shards'
        files aside, drop a `_SUCCESS` that no longer holds; the shards done and readable."""
        status = self.status(failures=0)
        if status.job_from is not None:
            self.write(JOB_FILE, json.dumps(status.job, indent=2).encode())
        if status.damaged:
            aside = self.damaged_folder()
            for shard in status.damaged:
                self.set_aside([metadata_path(shard), failures_path(shard)], aside)
        if status.success_is_stale:
            self.remove(SUCCESS_FILE)
        if storage.is_local(self.fs):
            self._remove_unfinished_writes()
        return {s for s, _, _ in status.shard_timing}

    def _remove_unfinished_writes(self) -> None:
        """Delete the temporary files of local writes that a kill cut short. Only this run writes here
        now (it holds the lease), so none of them will be finished."""
        temporary = re.compile(TEMPORARY)
        for folder in DATASET_FOLDERS:
            for parent, _, names in os.walk(self.path(folder)):
                for name in filter(temporary.fullmatch, names):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(parent, name))

    def damaged_folder(self) -> str:
        """A new folder under DAMAGED_FOLDER for the files moved aside now."""
        return f"{DAMAGED_FOLDER}/{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S.%fZ}"

    def set_aside(self, rels: list[str], aside: str) -> None:
        """Move those of `rels` (files or folders) that exist into `aside`, under their own paths."""
        for rel in rels:
            if self.exists(rel):
                self._move(rel, f"{aside}/{rel}")

    def listing(self, folder: str, *, recursive: bool = True) -> dict[str, int]:
        """Path relative to OUT -> size of the files under `folder` (with `recursive`, else of its
        entries, folders included), hidden ones too: one listing."""
        path = self.path(folder)
        self.fs.invalidate_cache(path)
        list_ = self.fs.find if recursive else self.fs.ls
        try:
            found = self.retry.call(f"listing {self.name}/{folder}", list_, path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        infos = found.values() if isinstance(found, dict) else found
        names = ((info["name"].rstrip("/"), info.get("size") or 0) for info in infos)
        return {name[len(self.root) + 1:]: size for name, size in names if name != path}  # some stores list a prefix as itself

    def _move(self, rel: str, to: str) -> None:
        if storage.is_local(self.fs):
            self.fs.makedirs(posixpath.dirname(self.path(to)), exist_ok=True)
        self.retry.call(f"moving {self.name}/{rel} to {to}", self.fs.mv, self.path(rel), self.path(to), recursive=True)

    def check_writable(self) -> None:
        """Write and remove a small file: storage that refuses writes (read-only, full, no permission)
        is found in seconds, before Ray starts and the model loads."""
        probe = f"{WRITE_PROBE}{uuid.uuid4().hex}"  # hidden: listings skip it if a kill leaves it
        with self._errors():
            try:
                self.write(probe, b"sdbatch checks that it can write here\n")
            except storage.StorageError as e:
                raise OutputError(f"{self.name}: cannot write here: {e}") from None
            self.remove(probe)

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except PermissionError as e:
            raise OutputError(f"{self.name}: permission denied ({e})") from None
        except FileNotFoundError as e:
            raise OutputError(f"{self.name}: cannot write here ({e})") from None

    def _require_empty(self) -> None:
        if self.fs.isfile(self.root):
            raise OutputError(f"{self.name} is a file, not a folder")
        self.fs.invalidate_cache(self.root)  # s3fs would answer from a listing cached before the write probe
        try:
            entries = self.retry.call(f"listing {self.name}", self.fs.ls, self.root, detail=False)
        except FileNotFoundError:
            return
        # SeaweedFS lists a prefix whose objects were all deleted (the write probe's) as itself;
        # _sdbatch/ holds the lease, taken before OUT is prepared; another driver may be probing
        names = [e.rstrip("/") for e in entries]
        ours = (self.root, self.path("_sdbatch"))
        if [n for n in names if n not in ours and not n.rsplit("/", 1)[-1].startswith(WRITE_PROBE)]:
            raise OutputError(f"{self.name} is not empty and is not an sdbatch dataset (no {JOB_FILE}); "
                              "refusing to write into it or delete it — choose an empty or new folder")

    def _dataset_files(self) -> list[str]:
        """The files under DATASET_FOLDERS (relative to OUT), or OutputError if any of them is not
        one sdbatch writes: --overwrite deletes only its own."""
        files = []
        for folder in DATASET_FOLDERS:
            self.fs.invalidate_cache(self.path(folder))
            try:
                found = self.retry.call(f"listing {self.name}/{folder}", self.fs.find, self.path(folder))
            except FileNotFoundError:
                continue
            files += [path[len(self.root) + 1:] for path in found]
        foreign = [rel for rel in files if not OURS.fullmatch(rel)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5:,} more" if len(foreign) > 5 else "")
            raise OutputError(f"{self.name}: --overwrite would delete files sdbatch did not write ({shown}); "
                              "move them out of the dataset's folders first")
        return files

    def _delete_dataset(self) -> None:
        # Commit markers first, so a crash half-way leaves no shard looking done, and job.json last,
        # so the folder stays recognisable as ours until the end. _sdbatch/damaged/ stays.
        files = self._dataset_files()
        self.remove(SUCCESS_FILE)
        markers = [f for f in files if f.startswith("metadata/")]
        for batch in (markers, [f for f in files if not f.startswith("metadata/")]):
            if batch:
                self.retry.call(f"removing {len(batch):,} files of {self.name}", self.fs.rm, [self.path(f) for f in batch])
        for folder in DATASET_FOLDERS:  # empty by now: only folders left, on file systems that have them
            self.remove(folder, recursive=True)
        self.remove(JOB_FILE)
        self.fs.invalidate_cache(self.root)

    def finish(self, summary: dict) -> bool:
        """Write `_SUCCESS` (the summary plus counts) iff every shard of the job is done."""
        job = self.read_job()
        if job is None:
            raise OutputError(f"{self.name}: not an sdbatch dataset (no {JOB_FILE})")
        done = self.done_shards()
        total = total_shards(job)
        if any(shard_id(i) not in done for i in range(total)):
            return False
        self.write(SUCCESS_FILE, json.dumps({"shards": total, **summary}, indent=2).encode())
        return True

    def status(self, *, failures: int = 10) -> OutputStatus:
        """Counts, per-shard timing, and the first `failures` failure records."""
        job = self.read_job()
        if job is None:
            raise OutputError(f"{self.name}: not an sdbatch dataset (no {JOB_FILE})")
        job_from = self.job_from
        rows, size = job["rows"], job["identity"]["shard_size"]
        total = total_shards(job)
        listed = sorted(s for s in self.done_shards() if shard_index(s) < total)
        with_failures = set(self._list("failures", ".parquet"))

        def inspect(shard: str) -> tuple[list[float], int, tuple] | DamagedFile:
            try:
                seconds = self._parse(metadata_path(shard), lambda f: pq.read_table(f, columns=["generation_seconds"]))
                failed = self._parse(failures_path(shard), lambda f: pq.ParquetFile(f).metadata.num_rows) \
                    if shard in with_failures else 0
            except DamagedFile as e:
                return e
            kv = seconds.schema.metadata or {}
            if SHARD_KEY in kv:
                bounds = tuple(json.loads(kv[SHARD_KEY]))
            else:  # written before shards had their bounds: rows, or images that are rows
                s = shard_at(shard_index(shard), rows, size)
                bounds = (s.start, 0, s.stop, 0)
            return seconds.column(0).to_pylist(), failed, bounds

        timing, failed, damaged, bounds = [], {}, {}, {}
        with ThreadPoolExecutor(16) as pool:  # object stores answer slowly but in parallel
            for shard, found in zip(listed, pool.map(inspect, listed)):
                if isinstance(found, DamagedFile):
                    damaged[shard] = str(found)
                else:
                    timing.append((shard, len(found[0]), sum(found[0])))
                    failed[shard] = found[1]
                    bounds[shard_index(shard)] = found[2]
        first_failures = []
        for shard in (s for s, n in failed.items() if n):
            if len(first_failures) >= failures:
                break
            table = self._parse(failures_path(shard), lambda f: pq.read_table(f, columns=["id", "error", "attempts"]))
            first_failures += table.to_pylist()[:failures - len(first_failures)]
        return OutputStatus(
            url=self.name, job=job, shards=total, shards_done=len(timing), rows=rows,
            rows_done=rows_done(bounds), images=job["images"],
            images_done=sum(n for _, n, _ in timing), failures=sum(failed.values()), success=self.success(),
            shard_timing=timing, first_failures=first_failures, damaged=damaged, job_from=job_from,
        )

    def commit_times(self) -> dict[str, float]:
        """Shard -> unix time its metadata file was written (its commit), where the file system's
        listing gives one: one listing."""
        path = self.path("metadata")
        self.fs.invalidate_cache(path)
        try:
            infos = self.retry.call(f"listing {self.name}/metadata", self.fs.ls, path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        times = {}
        for info in infos:
            base = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(".parquet") and is_shard_id(base[: -len(".parquet")]):
                t = _modified_time(info)
                if t is not None:
                    times[base[: -len(".parquet")]] = t
        return times

    def _parse(self, rel: str, parse: Callable[[object], T]) -> T:
        """`parse(file)` of a Parquet file of the dataset, or DamagedFile naming it.

        A first try reads through the file system; if it fails, the bytes are fetched with retries
        (so network trouble is retried and reported as such) and parsed from memory, where any
        error is the file's own.
        """
        try:
            with storage.open_for_arrow(self.fs, self.path(rel)) as f:
                return parse(f)
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError):
            pass
        data = storage.read_bytes(self.fs, self.path(rel), retry=self.retry)
        try:
            return parse(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as e:
            raise DamagedFile(rel, f"not a readable Parquet file ({len(data):,} bytes: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _modified_time(info: dict) -> float | None:
    """An fsspec listing entry's last-modified time as unix seconds; file systems name and type it
    differently (local: mtime float, s3fs: LastModified datetime, gcsfs: updated string, memory: created)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=datetime.timezone.utc)
            return value.timestamp()
    return None


def _brief(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


class ImageWriter:
    """Encodes and writes images on background threads, so encoding and upload overlap denoising.

    At most `max_pending` images are queued or in flight; `submit` blocks beyond that, so a slow
    store slows the producer down instead of filling memory with images.
    """

    def __init__(self, out: Output, *, threads: int = 4, max_pending: int = 16):
        self.out, self.max_pending = out, max_pending
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sdbatch-writer")
        self._slots = threading.BoundedSemaphore(max_pending)

    def submit(self, rel_path: str | None, image, params: dict, *, encoding: ImageEncoding = PNG,
               keep: bool = False) -> Future:
        """Queue one image; the future gives the file's sha256 once it is durably written, or with
        `keep` (sha256, file bytes). A `rel_path` of None only encodes (a webdataset image waits
        for its shard's tar)."""
        self._slots.acquire()
        try:
            future = self._pool.submit(self._write, rel_path, image, params, encoding, keep)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _write(self, rel_path: str | None, image, params: dict, encoding: ImageEncoding,
               keep: bool) -> str | tuple[str, bytes]:
        data = encoding.encode(image, params)
        if rel_path is not None:
            self.out.write(rel_path, data)
        digest = hashlib.sha256(data).hexdigest()
        return (digest, data) if keep else digest

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class ShardResult:
    shard: str
    images: int
    failures: int


@dataclass
class _Done:
    item: WorkItem
    future: Future | None  # None: --drop-rejected, recorded without its image
    scheduler_config: str
    seconds: float
    scores: dict = field(default_factory=dict)  # SCORE_FIELDS' values
    inputs: Inputs = Inputs()


@dataclass
class _Failed:
    item: WorkItem
    error: str
    attempts: int


class ShardWriter:
    """Collects one shard's images and failures, then commits the shard.

    Each image id is recorded once; recording it again (a retried batch) replaces the earlier
    outcome. `commit` waits until every image is written, then writes failures, the tar (webdataset)
    and metadata. Images are encoded and stored as `job` (job.json) says, so every writer of a
    dataset writes one format.

    A webdataset shard's encoded images stay in memory until its tar is written at commit, and the
    tar is built in memory too: about twice the shard's image bytes per actor at the commit
    (2 x 1000 x ~450 KB for PNG at 512x512, under 200 MB for JPEG). They are not spooled to a local
    disk because a split shard's pieces, made on several actors, are handed to the driver in memory.
    """

    def __init__(self, out: Output, writer: ImageWriter, rows: ShardRows, *, job: dict, model: str,
                 model_fingerprint: str, model_revision: str | None = None, fence: Callable[[], None] | None = None):
        self.out, self.writer, self.rows = out, writer, rows
        self.fence = fence  # raises if this writer may no longer commit (see jobs.lease)
        self.job = job  # job.json, copied into the metadata file: it can be rebuilt from any of them
        self.image = ImageEncoding.of_job(job)
        self.format = output_format_of(job)
        self.keep = self.format != "files"  # the bytes go into the metadata or the tar
        self.model, self.model_fingerprint = storage.redact_url(model), model_fingerprint
        self.model_revision = model_revision
        self.shard = rows.shard.id
        self.scored = is_scored(job)
        self.adapters = adapters_of(job)
        self._records: dict[str, _Done | _Failed] = {}
        self._positions = {it.id: i for i, it in enumerate(rows.items)}  # for webdataset keys

    def add(self, item: WorkItem, image, *, scheduler_config: dict, seconds: float, scores: dict | None = None,
            inputs: Inputs = Inputs()) -> None:
        """Hand one generated image to the writer (blocks only while the writer's queue is full);
        `image` None records the row (with its `scores`) without an image (--drop-rejected)."""
        params = generation_params(item, scheduler_config=scheduler_config, model=self.model,
                                   model_fingerprint=self.model_fingerprint, model_revision=self.model_revision,
                                   inputs=inputs, adapters=self.adapters)
        rel_path = None if self.format == "webdataset" else self._image_path(item)
        future = None if image is None else self.writer.submit(rel_path, image, params, encoding=self.image,
                                                                keep=self.keep)
        self._records[item.id] = _Done(item, future, json.dumps(scheduler_config, sort_keys=True), seconds,
                                       scores or {}, inputs)

    def fail(self, item: WorkItem, error: str, attempts: int) -> None:
        self._records[item.id] = _Failed(item, error, attempts)

    def collect(self) -> list[dict]:
        """Every outcome, once every image is written, for the driver to `adopt` (a piece of a split
        shard is not committed on its own; see jobs.driver)."""
        records = sorted(self._records.values(), key=lambda r: (r.item.row, r.item.k))
        written = iter(self._wait([r for r in records if isinstance(r, _Done)]))
        return [{"id": r.item.id, "seed": r.item.seed, "written": next(written), "scheduler_config": r.scheduler_config,
                 "seconds": r.seconds, "scores": r.scores, "inputs": r.inputs}
                if isinstance(r, _Done) else {"id": r.item.id, "error": r.error, "attempts": r.attempts} for r in records]

    def adopt(self, item: WorkItem, record: dict) -> None:
        """Record an outcome that `collect` gave for `item`: its image is written already."""
        if "error" in record:
            self.fail(item, record["error"], record["attempts"])
            return
        future = None
        if record["written"] is not None:
            future = Future()
            future.set_result(record["written"])
        # a retried row's image was made with another seed than the manifest's
        self._records[item.id] = _Done(replace(item, seed=record["seed"]), future, record["scheduler_config"],
                                       record["seconds"], record["scores"], record["inputs"])

    def commit(self) -> ShardResult:
        """Wait for the images, then write failures (if any) and the metadata file — the commit point.

        Every image of the shard must have been added or failed: a shard is all its rows, once.
        """
        expected = {item.id for item in self.rows.items}
        if expected != self._records.keys():
            missing, foreign = sorted(expected - self._records.keys()), sorted(self._records.keys() - expected)
            raise ValueError(f"{self.shard}: cannot commit; no outcome for {missing[:5]}, not in this shard: {foreign[:5]}")
        records = sorted(self._records.values(), key=lambda r: (r.item.row, r.item.k))
        done = [r for r in records if isinstance(r, _Done)]
        failed = [r for r in records if isinstance(r, _Failed)]
        written = self._wait(done)
        if self.fence is not None:
            self.fence()
        passthrough = self.rows.passthrough
        if failed:
            if self.format != "webdataset":  # an earlier attempt may have written one; the dataset must not show it
                for r in failed:
                    self.out.remove(self._image_path(r.item))
            failures = self._table(failures_schema(passthrough.schema), failed, {
                "error": [r.error for r in failed], "attempts": [r.attempts for r in failed]})
            self.out.write(failures_path(self.shard), _parquet_bytes(failures))
        elif self.out.exists(failures_path(self.shard)):  # left by an attempt that did not commit
            self.out.remove(failures_path(self.shard))
        for r in done:
            # dropped by --drop-rejected; an earlier attempt of the shard may have written it
            if r.future is None and self.format != "webdataset":
                self.out.remove(self._image_path(r.item))
        paths = [None if r.future is None else self._image_path(r.item) for r in done]
        inputs = [input_columns(r.item.loras, r.inputs, self.adapters) for r in done]
        columns = {
            **{f.name: [i[f.name] for i in inputs] for f in INPUT_FIELDS},
            "scheduler_config": [r.scheduler_config for r in done],
            "model": [self.model] * len(done),
            "model_fingerprint": [self.model_fingerprint] * len(done),
            "model_revision": [self.model_revision] * len(done),
            "image_path": paths,
            "image_sha256": [w[0] if self.keep and w is not None else w for w in written],
            "generation_seconds": [r.seconds for r in done],
        }
        if self.scored:
            columns |= {f.name: [r.scores.get(f.name) for r in done] for f in SCORE_FIELDS}
            columns["row_seed"] = [r.scores.get("row_seed", r.item.seed) for r in done]
            columns["attempt"] = [r.scores.get("attempt", 1) for r in done]
            columns["kept"] = [r.scores.get("kept", True) for r in done]
        if self.format == "parquet":
            columns["image"] = [None if w is None else {"bytes": w[1], "path": p} for w, p in zip(written, paths)]
        if self.format == "webdataset":  # a row dropped by --drop-rejected has no member in the tar
            columns["key"] = [None if w is None else self._key(r.item) for r, w in zip(done, written)]
            columns["tar"] = [None if w is None else tar_path(self.shard) for w in written]
        schema = metadata_schema(passthrough.schema, format=self.format, scored=self.scored)
        shard = self.rows.shard
        schema = schema.with_metadata({**(schema.metadata or {}), JOB_KEY: json.dumps(self.job).encode(),
                                       SHARD_KEY: json.dumps([shard.start, shard.start_k, shard.stop, shard.stop_k]).encode()})
        table = self._table(schema, done, columns)
        if self.format == "webdataset":  # before the metadata: a tar without it is never counted, and is redone
            self.out.write(tar_path(self.shard), self._tar(table, [None if w is None else w[1] for w in written]))
        self.out.write(metadata_path(self.shard), _parquet_bytes(table))
        return ShardResult(self.shard, len(done), len(failed))

    def _tar(self, table: pa.Table, images: list[bytes]) -> bytes:
        """The shard's tar: per image <key>.<ext>, <key>.json (its metadata row but the timing) and <key>.txt."""
        members = {}
        for row, data in zip(table.drop_columns([TIMING_FIELD]).to_pylist(), images):
            if data is None:  # dropped by --drop-rejected: in the metadata only
                continue
            members[f"{row['key']}.{self.image.extension}"] = data
            # pass-through values JSON has no type for (dates, bytes, decimals) as their str()
            members[f"{row['key']}.json"] = json.dumps(row, ensure_ascii=False, sort_keys=True, default=str).encode()
            members[f"{row['key']}.txt"] = row["prompt"].encode()
        return webdataset_tar(members)

    def _key(self, item: WorkItem) -> str:
        return webdataset_key(self.shard, self._positions[item.id])

    def _image_path(self, item: WorkItem) -> str:
        """Relative to OUT; for webdataset the tar's path and the member's name: shards/<shard>.tar/<key>.<ext>."""
        if self.format == "webdataset":
            return f"{tar_path(self.shard)}/{self._key(item)}.{self.image.extension}"
        return image_path(self.shard, item.id, self.image.extension)

    def _wait(self, done: list[_Done]) -> list:
        written, errors = [], []
        for r in done:
            try:
                written.append(None if r.future is None else r.future.result())
            except Exception as e:  # wait for every write before giving up, so none lands after
                errors.append(e)
        if errors:
            raise storage.StorageError(f"{self.shard}: {len(errors)} of {len(done)} images could not be written; "
                                       f"the shard is not committed. First error: {errors[0]}") from errors[0]
        return written

    def _table(self, schema: pa.Schema, records: list, extra: dict[str, list]) -> pa.Table:
        items = [r.item for r in records]
        values = {
            "id": [i.id for i in items], "manifest_row": [i.row for i in items],
            **{f.name: [getattr(i, f.name) for i in items] for f in PARAM_FIELDS},
            **extra, VERSION_FIELD.name: [SDBATCH_VERSION] * len(items),
        }
        passthrough = self.rows.passthrough.take(pa.array([i.row - self.rows.shard.start for i in items], pa.int64()))
        columns = [values[f.name] if f.name in values else passthrough.column(f.name) for f in schema]
        return pa.Table.from_arrays(
            [c if isinstance(c, pa.ChunkedArray) else pa.array(c, f.type) for c, f in zip(columns, schema)], schema=schema)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
