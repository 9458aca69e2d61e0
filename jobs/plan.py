"""Planning: shards of the job's images, the images each row asks for, and the batches they run in.

A shard is a range of the job's images in manifest order — K images (`--shard-size`), the last
one shorter — named `shard-000042`. Its bounds are (row, k) pairs: it runs from image `start_k`
of row `start` up to, not including, image `stop_k` of row `stop`, so a row with many images
spans several shards and a lost shard never costs more than K images. The bounds depend only on
the manifest's `num_images` column and K, so a re-run has the same shards; the driver finds them
by streaming that one column (`manifest_shards`), lazily, without reading a prompt, and the actor
that gets a shard reads its rows itself (`read_shard`). When every row asks for one image
(or there is no `num_images` column), shards are plain row ranges: `shards(rows, K)`.

A work item is one image: a manifest row's parameters with the job defaults filled in, the
derived seed, and the image id (see jobs.manifest for the id and seed rules); an init image or
mask is a reference (a path/URI, or a view of the bytes in the shard's table) that the actor reads
(jobs.images). Items of a shard are batched by (mode, width, height, steps, scheduler, guided or
not, strength, LoRA set), up to the batch size of their image size, in manifest order — which
images share a batch never changes an image, only the speed. Guidance is applied per row, so rows
of other guidance scales share a batch; unguided rows (scale ≤ 1) batch apart, as they need no
unconditional pass. A pipeline call has one mode, one strength and one set of active LoRAs.
"""
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from jobs import images
from jobs.adapters import LoRASet, lora_set
from jobs.manifest import MAX_SEED, Defaults, Manifest, column, derive_seed, image_id_of, row_ids

SHARD_PREFIX = "shard-"


def shard_id(index: int) -> str:
    return f"{SHARD_PREFIX}{index:06d}"


def is_shard_id(name: str) -> bool:
    return name.startswith(SHARD_PREFIX) and name[len(SHARD_PREFIX):].isascii() and name[len(SHARD_PREFIX):].isdigit()


def shard_index(shard: str) -> int:
    """`shard-000042` → 42 (ValueError for anything else)."""
    if not is_shard_id(shard):
        raise ValueError(f"not a shard id: {shard!r}")
    return int(shard[len(SHARD_PREFIX):])


@dataclass(frozen=True)
class Shard:
    """Images (start, start_k) up to, not including, (stop, stop_k), as (manifest row, image of the row)."""

    index: int
    start: int  # first manifest row
    stop: int  # the row it stops at: one past the last row when stop_k == 0
    start_k: int = 0
    stop_k: int = 0
    # One row of a split shard, made alone (see jobs.driver): the driver commits the shard from its pieces.
    piece: bool = False

    @property
    def id(self) -> str:
        return shard_id(self.index)

    @property
    def row_stop(self) -> int:
        """One past the last row the shard has images of."""
        return self.stop + (self.stop_k > 0)

    @property
    def rows(self) -> int:
        """Rows the shard has images of (whole or in part)."""
        return self.row_stop - self.start

    def pieces(self) -> list["Shard"]:
        """The shard cut into one piece per row, each with the row's images in this shard."""
        return [replace(self, start=r, start_k=self.start_k if r == self.start else 0,
                        stop=r if r == self.stop else r + 1, stop_k=self.stop_k if r == self.stop else 0, piece=True)
                for r in range(self.start, self.row_stop)]


def count_shards(rows: int, shard_size: int) -> int:
    return -(-rows // shard_size)


def shard_at(index: int, rows: int, shard_size: int) -> Shard:
    """Shard `index` of a manifest with `rows` rows."""
    if not 0 <= index < count_shards(rows, shard_size):
        raise IndexError(f"shard {index} out of range for {rows} rows in shards of {shard_size}")
    return Shard(index, index * shard_size, min((index + 1) * shard_size, rows))


def shards(rows: int, shard_size: int, *, skip: Container[str] = ()) -> Iterator[Shard]:
    """All shards in order, lazily, leaving out the ids in `skip` (e.g. those already done)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    for index in range(count_shards(rows, shard_size)):
        if shard_id(index) not in skip:
            yield shard_at(index, rows, shard_size)


CUT_CHUNK = 4096  # shard bounds computed per numpy call: memory stays flat whatever the row sizes


def image_shards(counts: Iterable[np.ndarray], shard_size: int, *, skip: Container[str] = ()) -> Iterator[Shard]:
    """All shards of `shard_size` images, lazily, for rows asking for `counts` images (an iterable of
    arrays, in manifest order: e.g. the `num_images` column batch by batch), leaving out `skip`."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    index, start = 0, (0, 0)
    for stop in _cuts(counts, shard_size):
        if shard_id(index) not in skip:
            yield Shard(index, start[0], stop[0], start[1], stop[1])
        index, start = index + 1, stop


def _cuts(counts: Iterable[np.ndarray], shard_size: int) -> Iterator[tuple[int, int]]:
    """(row, k) where each shard stops: at images shard_size, 2 * shard_size, ... and at the end."""
    first_row, done, cut = 0, 0, shard_size  # rows and images before this batch; the next cut's image number
    for batch in counts:
        batch = np.asarray(batch, np.int64)
        if not len(batch):
            continue
        # begins[j]: the image number of row j's first image; begins[-1]: one past the batch's last
        begins = np.concatenate(([done], done + np.cumsum(batch)))
        end = int(begins[-1])
        while cut <= end:
            n = min((end - cut) // shard_size + 1, CUT_CHUNK)
            at = cut + shard_size * np.arange(n, dtype=np.int64)
            rows = np.searchsorted(begins, at, side="right") - 1  # the row holding image `at` (or the batch's end)
            yield from zip((first_row + rows).tolist(), (at - begins[rows]).tolist())
            cut += n * shard_size
        first_row, done = first_row + len(batch), end
    if done and done > cut - shard_size:  # a last, shorter shard
        yield first_row, 0


def manifest_counts(manifest: Manifest) -> Iterator[np.ndarray] | None:
    """The images each row asks for, batch by batch (only that column is read); None when every row asks for one."""
    if "num_images" not in manifest.params or pa.types.is_null(manifest.schema.field("num_images").type):
        return None
    return (column(batch, "num_images").cast(pa.float64()).fill_null(1).to_numpy(zero_copy_only=False).astype(np.int64)
            for _, batch in manifest.batches(columns=["num_images"]))


def manifest_shards(manifest: Manifest, shard_size: int, *, skip: Container[str] = ()) -> Iterator[Shard]:
    """The job's shards for `manifest` (see `image_shards`); plain row ranges without a `num_images` column."""
    counts = manifest_counts(manifest)
    if counts is None:
        return shards(manifest.num_rows, shard_size, skip=skip)
    return image_shards(counts, shard_size, skip=skip)


def mode_of(init_image: bool, mask_image: bool) -> str:
    """What a row with (or without) an init image and a mask asks for."""
    if not init_image:
        return "txt2img"
    return "inpaint" if mask_image else "img2img"


@dataclass(frozen=True)
class WorkItem:
    """One image to make."""

    id: str  # image id: the row id, or `{row id}-{k}` when the row asks for several images
    row: int  # manifest row number
    k: int  # which of the row's images
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    init_image: images.ImageRef | None = None  # img2img and inpaint
    mask_image: images.ImageRef | None = None  # inpaint
    strength: float | None = None  # None for txt2img
    loras: LoRASet = ()  # (name, scale) sorted by name

    @property
    def mode(self) -> str:
        return mode_of(self.init_image is not None, self.mask_image is not None)

    @property
    def batch_key(self) -> tuple:
        """Items with equal keys can share one pipeline call."""
        return (self.mode, self.width, self.height, self.steps, self.scheduler, self.guidance_scale > 1, self.strength,
                self.loras)


@dataclass
class ShardRows:
    """What an actor needs for one shard: its images and its rows' pass-through columns."""

    shard: Shard
    items: list[WorkItem]
    passthrough: pa.Table  # the shard's rows, in order; row r is passthrough[r - shard.start]


def read_shard(manifest: Manifest, shard: Shard, defaults: Defaults) -> ShardRows:
    """The shard's images (only those of its k range in its first and last row) and its rows' pass-through columns."""
    table = manifest.read(shard.start, shard.row_stop)
    items = work_items(table, shard.start, defaults, base=images.base_of(manifest.url), first_k=shard.start_k,
                       last_stop_k=shard.stop_k or None)
    return ShardRows(shard, items, table.select(manifest.passthrough.names))


def work_items(table: pa.Table, first_row: int, defaults: Defaults, *, base: str = "", first_k: int = 0,
               last_stop_k: int | None = None) -> list[WorkItem]:
    """The images asked for by the manifest rows in `table` (row numbers from `first_row`): of the
    first row only images `first_k` on, of the last row only those before `last_stop_k` (None: all).
    Relative image paths are relative to `base`, the manifest's folder."""
    n = table.num_rows

    def values(name: str, default) -> list:
        arr = column(table, name)
        if arr is None:
            return [default] * n
        return [default if x is None else x for x in arr.to_pylist()]

    ids = row_ids(table, first_row)
    seeds = column(table, "seed")
    seeds = [None] * n if seeds is None else seeds.to_pylist()
    inits, masks = images.refs(column(table, "init_image"), base, n), images.refs(column(table, "mask_image"), base, n)
    loras = column(table, "loras")
    loras = [()] * n if loras is None else [lora_set(cell) for cell in loras.to_pylist()]
    items = []
    for i, (rid, prompt, negative, seed, steps, guidance, width, height, scheduler, count, init, mask, strength,
            adapters) in enumerate(zip(
        ids, values("prompt", None), values("negative_prompt", defaults.negative_prompt), seeds,
        values("steps", defaults.steps), values("guidance_scale", defaults.guidance_scale),
        values("width", defaults.width), values("height", defaults.height),
        values("scheduler", defaults.scheduler), values("num_images", 1), inits, masks,
        values("strength", defaults.strength), loras,
    )):
        base = derive_seed(defaults.seed, rid) if seed is None else int(seed)
        count = int(count)
        lo = first_k if i == 0 else 0
        hi = last_stop_k if i == n - 1 and last_stop_k is not None else count
        for k in range(lo, hi):
            image_id = image_id_of(rid, count, k)
            items.append(WorkItem(
                id=image_id, row=first_row + i, k=k, prompt=prompt, negative_prompt=negative,
                seed=(base + k) % MAX_SEED, steps=int(steps), guidance_scale=float(guidance),
                width=int(width), height=int(height), scheduler=scheduler, init_image=init, mask_image=mask,
                strength=None if init is None else float(strength), loras=adapters,
            ))
    return items


def batches(items: list[WorkItem], batch_size: int | Callable[[WorkItem], int]) -> list[list[WorkItem]]:
    """Items grouped by `batch_key` (groups in order of first appearance, items in manifest
    order), each group cut into batches of at most `batch_size`: a number, or a function of a
    group's first item (the rows for its image size, say)."""
    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.batch_key, []).append(item)
    cut = []
    for group in groups.values():
        size = batch_size(group[0]) if callable(batch_size) else batch_size
        if size < 1:
            raise ValueError(f"batch size must be at least 1, got {size}")
        cut += [group[i:i + size] for i in range(0, len(group), size)]
    return cut
