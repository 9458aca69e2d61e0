"""Planning: shards of manifest rows, the images each row asks for, and the batches they run in.

A shard is a range of manifest rows `[start, stop)` — K rows, the last one shorter — named
`shard-000042`. It depends only on the row count and K, so a re-run with the same manifest and
K has the same shards, and the driver can list millions of them lazily without reading a
prompt: the actor that gets a shard reads its rows itself (`read_shard`).

A work item is one image: a manifest row's parameters with the job defaults filled in, the
derived seed, and the image id (see jobs.manifest for the id and seed rules). Items of a shard
are batched by (width, height, steps, scheduler, guidance_scale), up to the batch size, in
manifest order — which images share a batch never changes an image, only the speed.
"""
from collections.abc import Container, Iterator
from dataclasses import dataclass

import pyarrow as pa

from jobs.manifest import MAX_SEED, Defaults, Manifest, column, derive_seed, image_ids, row_ids

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
    index: int
    start: int  # first manifest row
    stop: int  # one past the last row

    @property
    def id(self) -> str:
        return shard_id(self.index)

    @property
    def rows(self) -> int:
        return self.stop - self.start


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

    @property
    def batch_key(self) -> tuple:
        """Items with equal keys can share one pipeline call."""
        return (self.width, self.height, self.steps, self.scheduler, self.guidance_scale)


@dataclass
class ShardRows:
    """What an actor needs for one shard: its images and its rows' pass-through columns."""

    shard: Shard
    items: list[WorkItem]
    passthrough: pa.Table  # the shard's rows, in order; row r is passthrough[r - shard.start]


def read_shard(manifest: Manifest, shard: Shard, defaults: Defaults) -> ShardRows:
    table = manifest.read(shard.start, shard.stop)
    return ShardRows(shard, work_items(table, shard.start, defaults), table.select(manifest.passthrough.names))


def work_items(table: pa.Table, first_row: int, defaults: Defaults) -> list[WorkItem]:
    """The images asked for by the manifest rows in `table` (row numbers from `first_row`)."""
    n = table.num_rows

    def values(name: str, default) -> list:
        arr = column(table, name)
        if arr is None:
            return [default] * n
        return [default if x is None else x for x in arr.to_pylist()]

    ids = row_ids(table, first_row)
    seeds = column(table, "seed")
    seeds = [None] * n if seeds is None else seeds.to_pylist()
    items = []
    for i, (rid, prompt, negative, seed, steps, guidance, width, height, scheduler, count) in enumerate(zip(
        ids, values("prompt", None), values("negative_prompt", defaults.negative_prompt), seeds,
        values("steps", defaults.steps), values("guidance_scale", defaults.guidance_scale),
        values("width", defaults.width), values("height", defaults.height),
        values("scheduler", defaults.scheduler), values("num_images", 1),
    )):
        base = derive_seed(defaults.seed, rid) if seed is None else int(seed)
        for k, image_id in enumerate(image_ids(rid, int(count))):
            items.append(WorkItem(
                id=image_id, row=first_row + i, k=k, prompt=prompt, negative_prompt=negative,
                seed=(base + k) % MAX_SEED, steps=int(steps), guidance_scale=float(guidance),
                width=int(width), height=int(height), scheduler=scheduler,
            ))
    return items


def batches(items: list[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Items grouped by `batch_key` (groups in order of first appearance, items in manifest
    order), each group cut into batches of at most `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.batch_key, []).append(item)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
