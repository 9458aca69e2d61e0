"""The manifest: its schema, its validation, and streaming reads of its rows.

A manifest is one Parquet file, read through fsspec by record batches — never whole, so tens of
millions of rows cost the memory of one batch. Columns:

  prompt           string, required, no nulls (may be empty), at most MAX_PROMPT_CHARS characters
  id               string or integer, unique; default the row number (rows count from 0)
  negative_prompt  string, at most MAX_PROMPT_CHARS characters
  seed             integer, 0 <= seed < 2**63; default derive_seed(--seed, id)
  steps            integer 1..1000
  guidance_scale   number >= 0, finite
  width, height    integer multiples of 8 in 64..2048
  scheduler        a name in sdcore.schedulers.NAMES
  num_images       integer 1..10000, default 1
  init_image       the image to start from (img2img): a path or fsspec URI, relative paths relative
                   to the manifest's folder; or its bytes (a binary column, or a Hugging Face
                   `Image` struct {bytes, path}); it must exist (see jobs.images)
  mask_image       the same forms; white = repaint (inpainting); only with an init_image
  strength         number, 0 < strength <= 1: how much of the init image is repainted
  loras            LoRAs declared with --lora: a list of {name, scale} structs, or a string
                   "name:0.8,other:0.5" (a name alone: scale 1.0); see jobs.adapters

A null in an optional column means "the job-wide default" (`Defaults`, from the command line).
Floating-point columns are accepted for the integer parameters when every value is integral
(pandas stores integer columns with gaps as float64). Every other column passes through
unchanged into the output metadata, except names that look like typos of the columns above
(an error that suggests the right name) and the names the output itself uses (`RESERVED`).

Image ids: a row with num_images == 1 makes one image whose id is the row id; a row with
num_images == n > 1 makes images `{id}-0` ... `{id}-{n-1}`, image k with seed (seed + k) mod 2**63.
Image ids name files (`images/<shard>/<id>.png`, `.jpg`, `.webp`), so they must be unique across the whole
manifest after this expansion and usable as file names — unique even after case folding and
Unicode (NFC) normalisation, since case-insensitive or normalising stores would merge them.
"""
import difflib
import hashlib
import math
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import adapters, storage
from jobs import images as input_images  # `images` counts images in validate
from sdcore.images import RESIZE_POLICIES  # how init images and masks are fitted to a row's size

MAX_SEED = 2**63  # exclusive
MAX_NUM_IMAGES = 10_000
STEPS_RANGE = (1, 1000)
SIZE_RANGE = (64, 2048)
MAX_ID_BYTES = 200
# CLIP reads 77 tokens; this leaves room for any real prompt while keeping a runaway cell (a
# whole document pasted in) out of every PNG's text chunk and metadata row.
MAX_PROMPT_CHARS = 10_000
READ_BATCH_ROWS = 16_384
READ_BUFFER_BYTES = 8 << 20  # read column chunks in pieces: a huge row group must not be loaded whole
FINGERPRINT_READ_BYTES = 8 << 20
SHOW = 5  # offending rows quoted per violation

STRING_PARAMS = ("prompt", "negative_prompt", "scheduler")
PARAMS = ("id", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler", "num_images",
          "init_image", "mask_image", "strength", "loras")
# Output metadata/failure columns (see jobs.sink) and the future embedded `image` column: a
# pass-through column of the same name would collide with them.
RESERVED = (
    "manifest_row", "scheduler_config", "model", "model_fingerprint", "image_path", "image_sha256",
    "generation_seconds", "sdbatch_version", "error", "attempts", "image",
    "mode", "init_image_sha256", "mask_image_sha256", "embeddings",
)
# Names people use for our columns that no spelling distance would catch.
ALIASES = {
    "guidance": "guidance_scale", "cfg": "guidance_scale", "cfg_scale": "guidance_scale",
    "sampler": "scheduler", "sampler_name": "scheduler",
    "num_inference_steps": "steps", "num_steps": "steps", "n_steps": "steps",
    "negative": "negative_prompt", "neg_prompt": "negative_prompt", "negative_prompts": "negative_prompt",
    "num_images_per_prompt": "num_images", "n_images": "num_images", "n_samples": "num_images",
    "random_seed": "seed",
    "init": "init_image", "init_img": "init_image", "source_image": "init_image",
    "mask": "mask_image", "mask_path": "mask_image", "denoising_strength": "strength", "denoise": "strength",
    "lora": "loras",
}


class ManifestError(ValueError):
    """The manifest (or a job-wide default) breaks the schema; the message says where."""


def scheduler_names() -> tuple[str, ...]:
    from sdcore.schedulers import NAMES  # lazily: validating must not pay for it at import time

    return tuple(NAMES)


@dataclass(frozen=True)
class Defaults:
    """Job-wide values for rows that leave a parameter out (the `--seed`, `--steps`, ... options)."""

    seed: int = 0
    steps: int = 50
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    scheduler: str = "pndm"  # what SD v1.5 ships with
    negative_prompt: str = ""
    strength: float = 0.8  # for rows with an init image
    resize: str = "stretch"  # no column: one policy per job (RESIZE_POLICIES)

    def __post_init__(self):
        problems = []
        if not 0 <= self.seed < MAX_SEED:
            problems.append(f"--seed {self.seed} is out of range 0..2^63-1")
        if not STEPS_RANGE[0] <= self.steps <= STEPS_RANGE[1]:
            problems.append(f"--steps {self.steps} is out of range {STEPS_RANGE[0]}..{STEPS_RANGE[1]}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            problems.append(f"--guidance-scale {self.guidance_scale} must be a finite number >= 0")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v % 8 or not SIZE_RANGE[0] <= v <= SIZE_RANGE[1]:
                problems.append(f"--{name} {v} must be a multiple of 8 in {SIZE_RANGE[0]}..{SIZE_RANGE[1]}")
        if len(self.negative_prompt) > MAX_PROMPT_CHARS:
            problems.append(f"--negative-prompt is {len(self.negative_prompt):,} characters long; the limit is {MAX_PROMPT_CHARS:,}")
        names = scheduler_names()
        if self.scheduler not in names:
            problems.append(f"--scheduler {self.scheduler!r} is not one of {', '.join(names)}")
        if not 0 < self.strength <= 1:  # also false for nan
            problems.append(f"--strength {self.strength} must be a number in 0 < strength <= 1")
        if self.resize not in RESIZE_POLICIES:
            problems.append(f"--resize {self.resize!r} is not one of {', '.join(RESIZE_POLICIES)}")
        if problems:
            raise ManifestError("; ".join(problems))


def derive_seed(job_seed: int, row_id: str) -> int:
    """The seed of a row without one: a hash of (job seed, row id) in [0, 2**63).

    Part of the reproducibility contract: it depends on nothing but these two values.
    """
    digest = hashlib.blake2b(f"{job_seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def image_ids(row_id: str, num_images: int) -> list[str]:
    return [image_id_of(row_id, num_images, k) for k in range(num_images)]


def image_id_of(row_id: str, num_images: int, k: int) -> str:
    return row_id if num_images == 1 else f"{row_id}-{k}"


@dataclass
class Summary:
    """What `validate` found; `format()` is what `sdbatch validate` prints."""

    manifest: str
    rows: int
    images: int
    columns: list[str]
    passthrough: list[str]
    sizes: dict[tuple[int, int], int]  # (width, height) -> images
    schedulers: dict[str, int]  # name -> images
    modes: dict[str, int]  # txt2img, img2img, inpaint -> images
    steps_total: int  # denoising steps over all images
    row_groups: int
    fingerprint: str

    def format(self) -> str:
        sizes = ", ".join(f"{w}x{h}: {n:,}" for (w, h), n in sorted(self.sizes.items(), key=lambda kv: -kv[1]))
        scheds = ", ".join(f"{s}: {n:,}" for s, n in sorted(self.schedulers.items(), key=lambda kv: -kv[1]))
        return "\n".join([
            f"{self.manifest}: OK",
            f"  rows             {self.rows:,}",
            f"  images           {self.images:,}",
            f"  columns          {', '.join(self.columns)}",
            f"  pass-through     {', '.join(self.passthrough) or '-'}",
            f"  sizes (images)   {sizes}",
            f"  schedulers       {scheds}",
            f"  modes (images)   {', '.join(f'{m}: {n:,}' for m, n in sorted(self.modes.items(), key=lambda kv: (-kv[1], kv[0])))}",
            f"  denoising steps  {self.steps_total:,} ({self.steps_total / max(self.images, 1):.1f} per image)",
            f"  row groups       {self.row_groups:,}",
            f"  fingerprint      {self.fingerprint}",
        ])


class Manifest:
    """An opened manifest: schema and row count come from the footer; rows are read on demand.

    Opening already rejects schema problems (missing `prompt`, wrong column types, typo'd or
    reserved column names); `validate` checks the values.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.name = storage.redact_url(url)
        self.storage_options = storage_options or {}
        self.fs, self.path = storage.resolve(url, storage_options)
        try:
            self._file = storage.open_for_arrow(self.fs, self.path)
        except FileNotFoundError:
            raise ManifestError(f"{self.name}: no such file") from None
        except PermissionError as e:
            raise ManifestError(f"{self.name}: permission denied ({e})") from None
        except OSError as e:
            if self.fs.isdir(self.path):
                raise ManifestError(f"{self.name}: is a directory; give one Parquet file") from None
            raise ManifestError(f"{self.name}: cannot open: {e}") from None
        try:
            # pre_buffer (pyarrow's default) would read every selected column chunk of the file into
            # memory before the first batch: the whole manifest, for a validation pass.
            self._pf = pq.ParquetFile(self._file, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
        except (pa.ArrowInvalid, OSError) as e:
            self._file.close()
            raise ManifestError(f"{self.name}: not a Parquet file ({e})") from None
        meta = self._pf.metadata
        self.schema: pa.Schema = self._pf.schema_arrow
        self.num_rows: int = meta.num_rows
        self.row_group_rows: list[int] = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.has_id = "id" in self.schema.names
        self.params = [n for n in self.schema.names if n in PARAMS]
        self.passthrough = pa.schema([f for f in self.schema if f.name not in PARAMS]).remove_metadata()
        self._check_schema()
        if self.num_rows == 0:
            raise ManifestError(f"{self.name}: the manifest has no rows")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._file.close()

    def _check_schema(self) -> None:
        names = self.schema.names
        problems = [f"column {n!r} appears {names.count(n)} times" for n in sorted({n for n in names if names.count(n) > 1})]
        if problems:
            raise ManifestError("\n".join(f"{self.name}: {p}" for p in problems))
        for name in names:
            if name in PARAMS:
                continue
            if name in RESERVED:
                problems.append(f"column {name!r} is a name the output metadata uses; rename it")
            elif (guess := typo_of(name)) is not None:
                problems.append(f"unknown column {name!r}: did you mean {guess!r}? (rename it, or it would be ignored)")
        if "prompt" not in names:
            problems.append(f"missing required column 'prompt' (columns: {', '.join(names)})")
        for name in self.params:
            t = _value_type(self.schema.field(name).type)
            if name in input_images.COLUMNS:
                if not input_images.is_image_type(t):
                    problems.append(f"column {name!r} has type {t}; expected paths (strings), bytes (binary) or "
                                    "Hugging Face Image structs {bytes, path}")
                continue
            if name == "loras":
                if not adapters.is_loras_type(t):
                    problems.append(f"column 'loras' has type {t}; expected strings 'name:scale,...' or lists of "
                                    "{name, scale} structs")
                continue
            ok = pa.types.is_null(t) or (
                _is_string(t) if name in STRING_PARAMS
                else _is_string(t) or pa.types.is_integer(t) if name == "id"
                else pa.types.is_integer(t) or pa.types.is_floating(t)
            )
            if not ok:
                expected = "strings" if name in STRING_PARAMS else "strings or integers" if name == "id" else (
                    "numbers" if name in ("guidance_scale", "strength") else "integers")
                problems.append(f"column {name!r} has type {t}; expected {expected}")
        if problems:
            raise ManifestError("\n".join(f"{self.name}: {p}" for p in problems))

    def batches(self, columns: list[str] | None = None, batch_rows: int = READ_BATCH_ROWS) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first row number, record batch) over the whole file, in order."""
        start = 0
        for batch in self._pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
            yield start, batch
            start += batch.num_rows

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Rows [start, stop) — decoding only the row groups that hold them, a batch at a time."""
        groups, first, offset = [], None, 0
        for i, n in enumerate(self.row_group_rows):
            if offset < stop and offset + n > start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        pieces, pos = [], first or 0
        if groups:
            for batch in self._pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=columns, use_threads=False):
                lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
                if lo < hi:
                    pieces.append(batch.slice(lo, hi - lo))
                pos += batch.num_rows
                if pos >= stop:
                    break
        return pa.Table.from_batches(pieces, schema=schema)

    def fingerprint(self) -> str:
        """Identifies the manifest's content: a streaming sha256 of every byte of the file, so that
        any edit, even one that keeps the size and the footer, makes a different job."""
        h = hashlib.sha256(b"sdbatch-manifest-v2\x00")
        with self.fs.open(self.path, "rb", block_size=FINGERPRINT_READ_BYTES) as f:
            while chunk := f.read(FINGERPRINT_READ_BYTES):
                h.update(chunk)
        return h.hexdigest()[:32]


def open_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    return Manifest(url, storage_options)


def typo_of(name: str) -> str | None:
    """The known column an unknown name was probably meant to be, or None for a real pass-through.

    Decided by edit distance, not by difflib's similarity ratio alone: a ratio flags legitimate
    extra columns such as `prompt_id` (0.8 against `prompt`), while one or two edits are typos.
    difflib only picks among close candidates.
    """
    norm = name.strip().lower().replace("-", "_").replace(" ", "_")
    if norm in PARAMS:
        return norm
    if norm in ALIASES:
        return ALIASES[norm]
    candidates = [p for p in PARAMS if _edit_distance(norm, p) <= (0 if len(p) <= 3 else 1 if len(p) <= 6 else 2)]
    if not candidates:
        return None
    return (difflib.get_close_matches(norm, candidates, n=1, cutoff=0) or candidates)[0]


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance counting an adjacent transposition ('widht') as one edit."""
    prev2, prev = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            d = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if prev2 is not None and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                d = min(d, prev2[j - 2] + 1)
            cur.append(d)
        prev2, prev = prev, cur
    return prev[-1]


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def column(batch: pa.RecordBatch | pa.Table, name: str) -> pa.Array | None:
    """A parameter column in a plain form: dictionaries decoded, strings as `string`; None if absent."""
    if name not in batch.schema.names:
        return None
    arr = batch.column(name)
    if pa.types.is_dictionary(arr.type):  # before combining: chunks may carry different dictionaries
        arr = arr.cast(arr.type.value_type)
    if _is_string(arr.type) and not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    if isinstance(arr, pa.ChunkedArray):  # one chunk is used as it is: image bytes are not copied
        return arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    return arr


def row_ids(batch: pa.RecordBatch | pa.Table, start: int) -> list[str]:
    """The row ids of a batch as strings (the `id` column, or the row numbers)."""
    ids = column(batch, "id")
    if ids is None or pa.types.is_null(ids.type):
        return [str(i) for i in range(start, start + batch.num_rows)]
    return [str(v) for v in ids.to_pylist()]


def _numbers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls as 0, non-null mask) as numpy arrays of the column's own dtype."""
    return arr.fill_null(0).to_numpy(zero_copy_only=False), ~_mask(arr.is_null())


def _mask(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


class _Violations:
    """Offending rows per (column, problem): a count and the first few (row, id, value)."""

    def __init__(self, name: str, has_id: bool):
        self.name, self.has_id = name, has_id
        self.found: dict[tuple[str, str], tuple[list, list, bool, str]] = {}

    def add(self, col: str, problem: str, bad: np.ndarray, start: int, ids: pa.Array | None,
            values: pa.Array | None = None, hint: str = "") -> None:
        where = np.flatnonzero(bad)
        if not len(where):
            return
        count, samples, _, _ = self.found.setdefault((col, problem), ([0], [], values is not None, hint))
        count[0] += len(where)
        for i in where[: SHOW - len(samples)].tolist():
            samples.append((start + i, None if ids is None else ids[i].as_py(), None if values is None else values[i].as_py()))

    def raise_if_any(self) -> None:
        lines = []
        for (col, problem), ([count], samples, with_values, hint) in self.found.items():
            rows = ", ".join(str(r) for r, _, _ in samples) + (", …" if count > len(samples) else "")
            detail = f"rows {rows}" if count > 1 else f"row {rows}"
            if with_values:
                detail += ": " + ", ".join(_show(value) for _, _, value in samples)
            if self.has_id:
                detail += "; ids " + ", ".join(_show(i) for _, i, _ in samples)
            lines.append(f"{self.name}: column {col!r}: {count:,} {'row' if count == 1 else 'rows'} {problem} ({detail}){hint}")
        if lines:
            raise ManifestError("\n".join(lines))


def _show(v) -> str:
    if isinstance(v, str):
        return repr(v if len(v) <= 40 else v[:37] + "...")
    return repr(v) if isinstance(v, float) else str(v)


# (column, lowest, highest, how the upper bound reads)
INTEGER_RANGES = (
    ("seed", 0, MAX_SEED - 1, "2^63-1"),
    ("steps", *STEPS_RANGE, str(STEPS_RANGE[1])),
    ("width", *SIZE_RANGE, str(SIZE_RANGE[1])),
    ("height", *SIZE_RANGE, str(SIZE_RANGE[1])),
    ("num_images", 1, MAX_NUM_IMAGES, str(MAX_NUM_IMAGES)),
)


def validate(manifest: Manifest, defaults: Defaults, lora_names: Collection[str] | None = (), *,
             check_files: bool = True) -> Summary:
    """Check every value of every row (one streaming pass; a second one only to name duplicate ids;
    and one over the file's bytes for the fingerprint). `lora_names`: the LoRAs the job declares
    (None: not known yet, names are not checked); `check_files`: whether image files must exist.

    Raises ManifestError naming each offending column and its first rows; returns the summary.
    """
    names = scheduler_names()
    v = _Violations(manifest.name, manifest.has_id)
    base = input_images.base_of(manifest.url)
    existence = input_images.Existence(manifest.storage_options)  # one listing per folder the rows name
    modes: Counter = Counter()
    id_keys: list[np.ndarray] = []  # 8 bytes per image id: a memory-bounded uniqueness check
    string_ids = manifest.has_id and _is_string(_value_type(manifest.schema.field("id").type))
    rows = images = steps_total = 0
    sizes: Counter = Counter()
    schedulers: Counter = Counter()

    for start, batch in manifest.batches(columns=manifest.params):
        n = batch.num_rows
        ids = column(batch, "id")
        v.add("prompt", "with null values", _mask(column(batch, "prompt").is_null()), start, ids,
              hint="; a prompt is required, use '' for an empty one")

        for col in ("prompt", "negative_prompt"):
            text = column(batch, col)
            if text is not None and not pa.types.is_null(text.type):
                v.add(col, f"longer than {MAX_PROMPT_CHARS:,} characters", _mask(pc.greater(pc.utf8_length(text), MAX_PROMPT_CHARS)),
                      start, ids, hint="; CLIP reads only the first 77 tokens (about 300 characters) anyway")

        ints = {}  # column -> (values, usable mask)
        for col, lo, hi, hi_text in INTEGER_RANGES:
            arr = column(batch, col)
            if arr is None or pa.types.is_null(arr.type):
                continue
            vals, valid = _numbers(arr)
            if vals.dtype.kind == "f":
                integral = np.isfinite(vals) & (np.floor(vals) == vals)
                v.add(col, "with non-integer values", valid & ~integral, start, ids, arr)
                valid &= integral
                if col == "seed":
                    inexact = valid & (np.abs(vals) >= 2**53)
                    v.add(col, "stored as floating point beyond 2^53, where seeds are not exact", inexact, start, ids, arr,
                          hint="; store seeds as int64")
                    valid &= ~inexact
            bad = valid & ((vals < lo) | (vals > hi))
            problem = f"out of range {lo}..{hi_text}"
            if col in ("width", "height"):
                bad |= valid & (vals % 8 != 0)
                problem = f"not a multiple of 8 in {lo}..{hi_text}"
            v.add(col, problem, bad, start, ids, arr)
            ints[col] = (vals, valid & ~bad)

        guidance = column(batch, "guidance_scale")
        if guidance is not None and not pa.types.is_null(guidance.type):
            vals, valid = _numbers(guidance)
            bad = valid & ~(np.isfinite(vals) & (vals >= 0))
            v.add("guidance_scale", "negative or not finite", bad, start, ids, guidance, hint="; it must be a finite number >= 0")

        sched = column(batch, "scheduler")
        if sched is not None and not pa.types.is_null(sched.type):
            bad = ~_mask(sched.is_null()) & ~_mask(pc.is_in(sched, value_set=pa.array(names)))
            v.add("scheduler", "with an unknown scheduler", bad, start, ids, sched, hint=f"; known: {', '.join(names)}")

        strength = column(batch, "strength")
        strength_used = np.full(n, defaults.strength)
        if strength is not None and not pa.types.is_null(strength.type):
            vals, valid = _numbers(strength)
            bad = valid & ~((vals > 0) & (vals <= 1))
            v.add("strength", "out of range 0 < strength <= 1", bad, start, ids, strength,
                  hint="; it is how much of the init image is repainted")
            strength_used = np.where(valid & ~bad, vals, defaults.strength)
        init, mask = column(batch, "init_image"), column(batch, "mask_image")
        has_init, has_mask = input_images.present(init, n), input_images.present(mask, n)
        # The denoising starts int(steps * strength) steps before the end, as diffusers' does.
        idle = has_init & (np.floor(_used(ints, "steps", defaults.steps, n) * strength_used) < 1)
        v.add("strength", "leaving no step to denoise (steps x strength < 1)", idle, start, ids, strength,
              hint="; raise the row's strength or its steps")
        v.add("mask_image", "with a mask but no init_image", has_mask & ~has_init, start, ids,
              hint="; inpainting repaints the masked part of an init image")
        for col, arr in (("init_image", init), ("mask_image", mask)) if check_files else ():
            written = input_images.paths(arr)
            if written is not None and written.null_count < n:
                resolved = [None if p is None else input_images.resolve(p, base) for p in written.to_pylist()]
                v.add(col, "naming a file that does not exist", existence.missing(resolved), start, ids, written,
                      hint=f"; relative paths are relative to the manifest's folder, {storage.redact_url(base)}")
        _check_loras(v, column(batch, "loras"), lora_names, start, ids)

        if ids is not None:
            v.add("id", "with null values", _mask(ids.is_null()) if not pa.types.is_null(ids.type) else np.ones(n, bool),
                  start, ids, hint="; ids must be unique (leave out the column to use row numbers)")
            if string_ids:
                bad = pc.or_(pc.match_substring_regex(ids, r"^\.|[/\\*?\[\]\x00-\x1f\x7f]|^$"),
                             pc.greater(pc.binary_length(ids), MAX_ID_BYTES))
                v.add("id", "not usable as file names", _mask(bad), start, ids, ids,
                      hint=f"; ids must not be empty, start with '.', hold '/', '\\', '*', '?', '[', ']' or "
                           f"control characters, or exceed {MAX_ID_BYTES} bytes")

        if v.found:
            continue  # no summary for an invalid manifest, but keep looking for more problems
        count = _used(ints, "num_images", 1, n)
        if ids is not None:
            id_keys.append(_id_keys(ids, count, string_ids))
        rows += n
        images += int(count.sum())
        steps, width, height = (_used(ints, c, getattr(defaults, c), n) for c in ("steps", "width", "height"))
        steps_total += int((steps * count).sum())
        keys, inverse = np.unique(width * 4096 + height, return_inverse=True)
        for key, total in zip(keys.tolist(), np.bincount(inverse, weights=count).tolist()):
            sizes[(key // 4096, key % 4096)] += int(total)
        for mode, used in (("inpaint", has_init & has_mask), ("img2img", has_init & ~has_mask), ("txt2img", ~has_init)):
            if used.any():
                modes[mode] += int(count[used].sum())
        names_used = pa.array([defaults.scheduler] * n) if sched is None else pc.fill_null(sched.cast(pa.string()), defaults.scheduler)
        for row in pa.table({"s": names_used, "n": count}).group_by("s").aggregate([("n", "sum")]).to_pylist():
            schedulers[row["s"]] += row["n_sum"]

    v.raise_if_any()
    duplicates = _find_duplicates(manifest, id_keys, string_ids)
    if duplicates:
        raise ManifestError(f"{manifest.name}: column 'id': {duplicates}")
    return Summary(
        manifest=manifest.name, rows=rows, images=images, columns=list(manifest.schema.names),
        passthrough=list(manifest.passthrough.names), sizes=dict(sizes), schedulers=dict(schedulers), modes=dict(modes),
        steps_total=steps_total, row_groups=len(manifest.row_group_rows), fingerprint=manifest.fingerprint(),
    )


def _check_loras(v: _Violations, loras: pa.Array | None, declared: Collection[str] | None, start: int, ids) -> None:
    """Each row's `loras` cell must parse (jobs.adapters.lora_set) and name only declared LoRAs (any, for None)."""
    if loras is None or pa.types.is_null(loras.type):
        return
    cells = loras.to_pylist()
    malformed, unknown = np.zeros(len(cells), bool), np.zeros(len(cells), bool)
    reason = ""
    for i, cell in enumerate(cells):
        try:
            names = {name for name, _ in adapters.lora_set(cell)}
        except adapters.AdapterError as e:
            malformed[i], reason = True, reason or str(e)
            continue
        unknown[i] = declared is not None and bool(names - set(declared))
    shown = pa.array([",".join(str(p.get("name")) for p in c) if isinstance(c, list) else c for c in cells], pa.string())
    v.add("loras", "malformed", malformed, start, ids, shown,
          hint=f"; {reason}; write 'name:scale,...' or a list of {{name, scale}} structs")
    v.add("loras", "naming a LoRA that is not declared", unknown, start, ids, shown,
          hint=f"; declared: {', '.join(sorted(declared or ())) or 'none'} (add one with --lora NAME=PATH_OR_URI)")


def _used(ints: dict, col: str, default: int, n: int) -> np.ndarray:
    """The value each of the batch's rows runs with: its own, or the default where null/absent."""
    if col not in ints:
        return np.full(n, default, np.int64)
    vals, given = ints[col]
    return np.where(given, vals, default).astype(np.int64)


def _int_key(value: int) -> int:
    return value & (2**64 - 1)  # two's complement, as numpy's int64 -> uint64 view


def _id_keys(ids: pa.Array, num_images: np.ndarray, string_ids: bool) -> np.ndarray:
    """One 64-bit key per image id of the batch.

    Integer ids are their own keys: `{id}-{k}` can never equal another integer id or another
    expansion, so row-id uniqueness is image-id uniqueness. String ids are hashed per image id
    (Python's str hash, consistent within this process): `a` with 2 images makes `a-1`, which may
    also be another row's id.
    """
    if not string_ids:
        if pa.types.is_uint64(ids.type):
            return ids.to_numpy(zero_copy_only=False).copy()
        return ids.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64).copy()
    values = ids.to_pylist()
    if (num_images == 1).all():
        return np.fromiter((hash(fold_id(i)) for i in values), dtype=np.int64, count=len(values)).view(np.uint64)
    keys = (hash(fold_id(i)) for rid, k in zip(values, num_images.tolist()) for i in image_ids(rid, k))
    return np.fromiter(keys, dtype=np.int64).view(np.uint64)


def fold_id(image_id: str) -> str:
    """What a case-insensitive, normalising store sees of a name: NFC of the case-folded NFC."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", image_id).casefold())


def _find_duplicates(manifest: Manifest, id_keys: list[np.ndarray], string_ids: bool) -> str | None:
    """A message naming duplicate image ids and their rows, or None.

    Only rows whose key repeats are looked at again, and their real ids are compared, so a hash
    collision is never reported.
    """
    if not id_keys:
        return None
    keys = np.concatenate(id_keys)
    id_keys.clear()  # copied into keys: free the pieces before sorting, and sort in place
    keys.sort()
    suspects = set(np.unique(keys[1:][keys[1:] == keys[:-1]]).tolist())
    del keys
    if not suspects:
        return None
    where: dict[str | int, list[tuple[int, bool, str | int]]] = {}  # folded image id -> [(row, made by num_images, id)]
    cols = ["id", "num_images"] if "num_images" in manifest.params else ["id"]
    for start, batch in manifest.batches(columns=cols):
        counts = column(batch, "num_images")
        counts = [1] * batch.num_rows if counts is None else [1 if c is None else int(c) for c in counts.to_pylist()]
        for i, (rid, n) in enumerate(zip(column(batch, "id").to_pylist(), counts)):
            made = image_ids(rid, n) if string_ids else [rid]
            for image_id in made:
                key = fold_id(image_id) if string_ids else image_id
                if _int_key(hash(key) if string_ids else key) in suspects:
                    where.setdefault(key, []).append((start + i, image_id != rid, image_id))
    dups = {k: found for k, found in where.items() if len(found) > 1}
    if not dups:
        return None
    differ = [found for found in dups.values() if len({i for _, _, i in found}) > 1]
    if differ:
        shown = "; ".join(", ".join(f"{_show(i)} at row {r}" for r, _, i in found[:SHOW]) for found in differ[:SHOW])
        return (f"{len(differ):,} group{'s' if len(differ) > 1 else ''} of ids equal up to case or Unicode "
                f"normalisation ({shown}); they would name one file on a case-insensitive or normalising store")
    expanded = any(by_count for found in dups.values() for _, by_count, _ in found)
    plural = "s" if len(dups) > 1 else ""
    shown = "; ".join(f"{_show(found[0][2])} at rows {', '.join(str(r) for r, _, _ in found[:SHOW])}" for found in list(dups.values())[:SHOW])
    shown += "; …" if len(dups) > SHOW else ""
    if expanded:
        return (f"{len(dups):,} image id{plural} made more than once ({shown}); num_images > 1 turns id into "
                "id-0, id-1, ..., and image ids must be unique")
    return f"{len(dups):,} duplicate id{plural} ({shown})"
