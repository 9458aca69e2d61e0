"""`sdbatch verify OUT`: is a finished dataset intact, and if not, which shards must be made again.

It reads the job record (job.json, or the copy every metadata file holds) and then the shards in
order, a few at a time, so memory stays flat in the number of shards. For each committed shard (one
with `metadata/<shard>.parquet`):
- its metadata and failures files read as Parquet;
- no image id and no image object is recorded twice, within the shard or across a row that the
  shard boundary cuts; every row lies in the shard's bounds, consecutive shards' bounds meet, and
  an image-cut shard holds exactly its share of images (done + failed): so every image of the
  manifest is done or in failures/ exactly once, without reading the manifest;
- every image exists and its bytes hash to the recorded sha256 (with --format parquet, the embedded
  copy too). `quick` checks only that it exists and is not empty: the metadata records no sizes;
- its image folder holds nothing else than its images and in-flight temporary files; for webdataset,
  its tar reads, holds each image with its .json and .txt and nothing else, each name once, and no
  key is recorded twice.
Then: shards not committed, objects outside any shard, and `_SUCCESS` present exactly when every
shard is committed.

`repair` withdraws what the next run would not fix by itself: each damaged shard's metadata and
failures files, and orphan objects, move into `_sdbatch/damaged/<time>/` (never deleted); a
`_SUCCESS` that no longer holds is removed and a lost job.json written back. `sdbatch run --resume`
then makes exactly the withdrawn shards again, with byte-identical images (generation and PNG
encoding are deterministic). It holds the output's lease while it repairs, so no driver runs then.

The layout of the images is one seam, `FilesLayout` or `WebDatasetLayout`: the objects a shard's
folder (or tar) holds, and one object's bytes.
"""
import hashlib
import json
import posixpath
import re
import tarfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow.parquet as pq

from jobs import storage
from jobs.lease import Lease, read_lease
from jobs.plan import is_shard_id, shard_at, shard_id, shard_index
from jobs.sink import (DATASET_FOLDERS, JOB_FILE, SHARD_KEY, SUCCESS_FILE, TEMPORARY, DamagedFile, Output,
                       OutputError, failures_path, metadata_path, output_format_of, sharding_of, tar_path,
                       total_shards)

TEMPORARY_NAME = re.compile(TEMPORARY)
SHARDS_AT_ONCE = 4
# What each kind of problem needs, and what `repair` does about it.
WITHDRAW = "withdraw"  # a committed shard is damaged: move its commit aside, the next run makes it again
ORPHAN = "orphan"  # an object no committed shard records: move it aside
MISSING = "missing"  # a shard is not committed: the next run makes it
SUCCESS = "success"  # _SUCCESS disagrees with the shards: remove a stale one; the next run writes a due one
JOB = "job"  # job.json is missing: write it back


@dataclass
class Problem:
    shard: str | None  # None: the dataset as a whole
    id: str | None  # the image id, where one image is at fault
    what: str
    kind: str
    path: str | None = None  # the object at fault, for an orphan

    def format(self) -> str:
        where = " ".join(x for x in (self.shard, self.id and f"id {self.id}") if x)
        return f"{where}: {self.what}" if where else self.what


@dataclass
class Report:
    url: str
    quick: bool
    shards: int  # the job's
    shards_committed: int = 0
    images: int = 0  # images checked
    failures: int = 0  # rows in failures/ of committed shards
    temporary: int = 0  # hidden temporary files of local writes (in flight, or left by a kill)
    running: str | None = None  # the driver holding the lease, if one does
    job_from: str | None = None
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # what `repair` did, one line each

    @property
    def intact(self) -> bool:
        return not self.problems

    def add(self, shard: str | None, image_id: str | None, what: str, kind: str = WITHDRAW, path: str | None = None) -> None:
        self.problems.append(Problem(shard, image_id, what, kind, path))

    def damaged_shards(self) -> list[str]:
        return sorted({p.shard for p in self.problems if p.kind == WITHDRAW})

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "problems"}, "intact": self.intact,
                "damaged_shards": self.damaged_shards(), "problems": [asdict(p) for p in self.problems]}

    def format(self, *, limit: int = 20) -> str:
        check = "sizes only" if self.quick else "sha256"
        lines = [f"{self.url}: {self.shards_committed:,}/{self.shards:,} shards committed; {self.images:,} images "
                 f"checked ({check}), {self.failures:,} failures, in {self.seconds:.2f} s"]
        if self.running:
            lines.append(f"  running   {self.running}: shards in progress show as not committed")
        if self.temporary:
            lines.append(f"  {self.temporary:,} temporary file(s) of writes in flight or cut short (the next run removes them)")
        lines += [f"  {p.format()}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... {len(self.problems) - limit:,} more problems (--limit, --json)")
        lines += [f"  repaired: {line}" for line in self.repaired]
        if self.intact:
            lines.append("intact")
        else:
            to_make = {p.shard for p in self.problems if p.kind in (WITHDRAW, MISSING)}
            needs_repair = not self.repaired and any(p.kind != MISSING for p in self.problems)
            lines.append(f"not intact: {len(self.problems):,} problem(s), {len(to_make):,} shard(s) to make; " + (
                "`sdbatch verify --repair`, then " if needs_repair else "") + "`sdbatch run --resume` (same options)")
        return "\n".join(lines)


class FilesLayout:
    """Today's layout: each image an object `images/<shard>/<name>`, the metadata's `image_path`."""

    folder = "images"
    stray = ORPHAN  # what an object in a shard's folder that no row records needs: moving aside

    def __init__(self, out: Output):
        self.out = out

    def shard_folder(self, shard: str) -> str:
        return f"{self.folder}/{shard}"

    def shard_of(self, name: str) -> str:
        """The shard an entry of `folder` belongs to, by its name."""
        return name

    def members(self, image_path: str) -> list[str]:
        """The objects that a row with this image path owns."""
        return [image_path]

    def objects(self, shard: str) -> dict[str, int]:
        """rel path -> size of every object in the shard's folder (one listing; subfolders by name)."""
        return self.out.listing(self.shard_folder(shard))

    def read(self, rel: str) -> bytes:
        return storage.read_bytes(self.out.fs, self.out.path(rel), retry=self.out.retry)


class WebDatasetLayout:
    """--format webdataset: a shard's images are members of `shards/<shard>.tar`, each row's
    `image_path` is `shards/<shard>.tar/<key>.<ext>`, and its `<key>.json` and `<key>.txt` sit beside it."""

    folder = "shards"
    stray = WITHDRAW  # a member no row records: the tar is not what the shard wrote; make it again

    def __init__(self, out: Output):
        self.out = out
        self._spans: dict[str, tuple[int, int]] = {}  # rel path -> (offset, size) of a member's bytes in its tar
        self._lock = threading.Lock()

    def shard_folder(self, shard: str) -> str:
        return tar_path(shard)

    def shard_of(self, name: str) -> str:
        return name.removesuffix(".tar") if name.endswith(".tar") else ""

    def members(self, image_path: str) -> list[str]:
        stem = posixpath.splitext(image_path)[0]
        return [image_path, f"{stem}.json", f"{stem}.txt"]

    def objects(self, shard: str) -> dict[str, int]:
        """rel path -> size of every member of the shard's tar, from its headers (tarfile seeks past
        the data); DamagedFile if it cannot be read as a tar or names a member twice."""
        rel = self.shard_folder(shard)
        if not self.out.exists(rel):
            return {}
        spans = {}
        try:
            with self.out.fs.open(self.out.path(rel), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    name = f"{rel}/{info.name}"
                    if name in spans:
                        raise DamagedFile(rel, f"holds {info.name} twice")
                    spans[name] = (info.offset_data, info.size)
        except tarfile.TarError as e:
            raise DamagedFile(rel, f"not a readable tar ({e})") from None
        with self._lock:
            self._spans |= spans
        return {name: size for name, (_, size) in spans.items()}

    def read(self, rel: str) -> bytes:
        """A member's bytes: one ranged read of its tar."""
        offset, size = self._spans[rel]
        tar = self.out.path(posixpath.dirname(rel))
        return self.out.retry.call(f"reading {rel}", self.out.fs.cat_file, tar, start=offset, end=offset + size)


@dataclass
class _Findings:
    """What the check of one committed shard found; shards are checked several at a time and their
    findings merged into the report in shard order."""

    shard: str
    problems: list[Problem] = field(default_factory=list)
    images: int = 0
    failures: int = 0
    temporary: int = 0
    bounds: tuple[int, int, int, int] | None = None  # None: the metadata or failures file is unreadable
    first_row_ids: set[str] = field(default_factory=set)  # the ids of its first row, and of its last row
    last_row_ids: set[str] = field(default_factory=set)  # where the shard ends inside it

    def add(self, image_id: str | None, what: str, kind: str = WITHDRAW, path: str | None = None) -> None:
        self.problems.append(Problem(self.shard, image_id, what, kind, path))


def verify(out: Output, *, quick: bool = False, repair: bool = False) -> Report:
    """Check the dataset in `out`; with `repair`, withdraw what is damaged (see the module doc).
    OutputError if `out` is not a dataset, or (for `repair`) a driver holds its lease."""
    started = time.monotonic()
    job = out.read_job()
    if job is None:
        raise OutputError(f"{out.name}: not an sdbatch dataset (no {JOB_FILE} and no metadata files)")
    lease = None
    if repair:
        lease = Lease(out)
        lease.acquire()  # LeaseHeld names the running driver
    try:
        report = _check(out, job, quick=quick)
        if lease is None:
            holder = read_lease(out)
            report.running = holder.describe() if holder is not None and holder.is_live() else None
        else:
            report.repaired = _repair(out, job, report)
    finally:
        if lease is not None:
            lease.release()
    report.seconds = time.monotonic() - started
    return report


def _check(out: Output, job: dict, *, quick: bool) -> Report:
    layout = WebDatasetLayout(out) if output_format_of(job) == "webdataset" else FilesLayout(out)
    total = total_shards(job)
    report = Report(url=out.name, quick=quick, shards=total, job_from=out.job_from)
    if out.job_from is not None:
        report.add(None, None, f"{JOB_FILE} is missing (rebuilt from {out.job_from})", JOB)
    committed = out.done_shards()
    with_failures = set(out._list("failures", ".parquet"))
    # Object stores answer slowly but in parallel: a few shards at a time, each image of them too.
    with ThreadPoolExecutor(SHARDS_AT_ONCE) as shards, ThreadPoolExecutor(16) as images:
        def check(shard: str) -> _Findings:
            return _check_shard(out, layout, job, shard, shard in with_failures, images, quick)

        previous = None
        for index, found in enumerate(_in_order(shards, check, (shard_id(i) for i in range(total)), committed)):
            if found is None:
                report.add(shard_id(index), None, "not committed (no metadata file)", MISSING)
                continue
            if previous is not None and previous.bounds and found.bounds and shard_index(previous.shard) == index - 1:
                _check_boundary(previous, found)
            report.problems += found.problems
            report.images, report.failures = report.images + found.images, report.failures + found.failures
            report.temporary += found.temporary
            report.shards_committed += 1
            previous = found
    _check_outside_shards(out, layout, total, report)
    missing = sum(p.kind == MISSING for p in report.problems)
    success = out.exists(SUCCESS_FILE)
    if success and missing:
        report.add(None, None, f"{SUCCESS_FILE} is there, but {missing:,} shard(s) are not committed", SUCCESS)
    elif not success and not missing:
        report.add(None, None, f"{SUCCESS_FILE} is missing though every shard is committed "
                               "(`sdbatch run --resume` writes it)", SUCCESS)
    return report


def _in_order(pool: ThreadPoolExecutor, check, shards: Iterator[str], committed: set[str]) -> Iterator[_Findings | None]:
    """`check(shard)` of each committed shard, None for the others, in order; at most
    2 * SHARDS_AT_ONCE shards' findings are held at a time."""
    pending = deque()
    for shard in shards:
        pending.append(pool.submit(check, shard) if shard in committed else None)
        if len(pending) > 2 * SHARDS_AT_ONCE:
            head = pending.popleft()
            yield None if head is None else head.result()
    for head in pending:
        yield None if head is None else head.result()


def _check_shard(out: Output, layout: FilesLayout | WebDatasetLayout, job: dict, shard: str, has_failures: bool,
                 pool: ThreadPoolExecutor, quick: bool) -> _Findings:
    columns = ["id", "manifest_row", "image_path", "image_sha256"]

    def read_metadata(f):
        file = pq.ParquetFile(f)
        names = file.schema_arrow.names
        return file.read(columns=columns + ["image"] * (not quick and "image" in names) + ["key"] * ("key" in names))

    found = _Findings(shard)
    try:
        meta = out._parse(metadata_path(shard), read_metadata)
        failed = out._parse(failures_path(shard), lambda f: pq.read_table(f, columns=["id", "manifest_row"])) \
            if has_failures else None
    except DamagedFile as e:
        found.add(None, f"{e.rel}: {e.reason}")
        return found
    rows = meta.select(columns + ["key"] * ("key" in meta.column_names)).to_pylist()
    failures = failed.to_pylist() if failed is not None else []
    found.images, found.failures = len(rows), len(failures)
    kv = meta.schema.metadata or {}
    if SHARD_KEY in kv:
        found.bounds = tuple(json.loads(kv[SHARD_KEY]))
    else:  # written before shards had their bounds: rows
        s = shard_at(shard_index(shard), job["rows"], job["identity"]["shard_size"])
        found.bounds = (s.start, 0, s.stop, 0)
    _check_rows(job, rows, failures, found)
    embedded = meta.column("image").to_pylist() if "image" in meta.column_names else None
    with_image = [i for i, r in enumerate(rows) if r["image_path"] is not None]  # not: --drop-rejected's rows
    _check_images(layout, [rows[i] for i in with_image], embedded and [embedded[i] for i in with_image],
                  found, pool, quick)
    return found


def _check_rows(job: dict, rows: list[dict], failures: list[dict], found: _Findings) -> None:
    """Every image of the shard's bounds recorded once, as done or failed."""
    index, (start, start_k, stop, stop_k) = shard_index(found.shard), found.bounds
    row_stop = stop + (stop_k > 0)
    seen, paths, keys = {}, set(), set()  # id -> manifest row; image paths; webdataset keys
    for r in rows + failures:
        if r["id"] in seen:
            found.add(r["id"], "id recorded twice in the shard")
        seen[r["id"]] = r["manifest_row"]
        if not start <= r["manifest_row"] < row_stop:
            found.add(r["id"], f"manifest row {r['manifest_row']} is outside the shard's rows {start}..{row_stop - 1}")
    for r in (r for r in rows if r["image_path"] is not None):
        if r["image_path"] in paths:
            found.add(r["id"], f"image {r['image_path']} recorded twice in the shard")
        paths.add(r["image_path"])
        if "key" in r:
            if r["key"] in keys:
                found.add(r["id"], f"key {r['key']} recorded twice in the shard")
            keys.add(r["key"])
    if sharding_of(job) == "images":
        size = job["identity"]["shard_size"]
        expected = min(size, job["images"] - index * size)
        if len(rows) + len(failures) != expected:
            found.add(None, f"holds {len(rows):,} images and {len(failures):,} failures; its share of the job is "
                            f"{expected:,}")
    elif set(seen.values()) != set(range(start, stop)):
        found.add(None, f"does not hold every row of {start}..{stop - 1}")
    found.first_row_ids = {i for i, row in seen.items() if row == start}
    found.last_row_ids = {i for i, row in seen.items() if row == stop} if stop_k else set()


def _check_boundary(previous: _Findings, found: _Findings) -> None:
    """Consecutive shards meet, and the row the boundary cuts has no image in both."""
    start, start_k = found.bounds[:2]
    if tuple(previous.bounds[2:]) != (start, start_k):
        found.add(None, f"starts at (row, image) {(start, start_k)}, but {previous.shard} stops at "
                        f"{tuple(previous.bounds[2:])}")
    for image_id in sorted(previous.last_row_ids & found.first_row_ids):
        found.add(image_id, f"id also recorded in {previous.shard}")


def _check_images(layout: FilesLayout | WebDatasetLayout, rows: list[dict], embedded: list[dict] | None,
                  found: _Findings, pool: ThreadPoolExecutor, quick: bool) -> None:
    """Every row's image stored whole (`quick`: not empty), the embedded copies too, nothing else."""
    try:
        objects = layout.objects(found.shard)
    except DamagedFile as e:
        found.add(None, f"{e.rel}: {e.reason}")
        return
    prefix = layout.shard_folder(found.shard) + "/"
    recorded = {rel for r in rows for rel in layout.members(r["image_path"])}
    for rel in sorted(objects):
        if TEMPORARY_NAME.fullmatch(posixpath.basename(rel)):
            found.temporary += 1
        elif rel not in recorded:
            found.add(None, f"orphan object {rel} (no row records it)", layout.stray, rel)
    for r in rows:
        if not r["image_path"].startswith(prefix):
            found.add(r["id"], f"image path {r['image_path']} is outside {prefix}")
        elif r["image_path"] not in objects:
            found.add(r["id"], f"image {r['image_path']} is missing")
        elif objects[r["image_path"]] == 0:
            found.add(r["id"], f"image {r['image_path']} is empty")
        for rel in layout.members(r["image_path"])[1:]:
            if rel not in objects:
                found.add(r["id"], f"{rel} is missing")
    if quick:
        return
    present = [r for r in rows if objects.get(r["image_path"])]
    digests = pool.map(lambda r: hashlib.sha256(layout.read(r["image_path"])).hexdigest(), present)
    for r, digest in zip(present, digests):
        if digest != r["image_sha256"]:
            found.add(r["id"], f"image {r['image_path']} does not match its sha256 (altered or truncated)")
    for r, image in zip(rows, embedded or []):
        if image is None or image["path"] != r["image_path"] or \
                hashlib.sha256(image["bytes"] or b"").hexdigest() != r["image_sha256"]:
            found.add(r["id"], "embedded image does not match its path and sha256")


def _check_outside_shards(out: Output, layout: FilesLayout | WebDatasetLayout, total: int, report: Report) -> None:
    """Objects in the dataset's folders that belong to no shard of the job: orphans. Image folders of
    shards that are not committed (and their tars) are work in progress, which the next run overwrites."""
    for folder in DATASET_FOLDERS:
        for rel, _ in out.listing(folder, recursive=False).items():
            name = posixpath.basename(rel)
            if TEMPORARY_NAME.fullmatch(name):
                report.temporary += 1
                continue
            if folder == layout.folder:
                shard = layout.shard_of(name)
                ours = is_shard_id(shard) and shard_index(shard) < total
            else:
                stem = name.removesuffix(".parquet")
                ours = name.endswith(".parquet") and is_shard_id(stem) and shard_index(stem) < total
            if not ours:
                report.add(None, None, f"orphan object {rel} (no shard of the job)", ORPHAN, rel)


def _repair(out: Output, job: dict, report: Report) -> list[str]:
    done = []
    aside = out.damaged_folder()
    shards = report.damaged_shards()
    for shard in shards:
        out.set_aside([metadata_path(shard), failures_path(shard)], aside)
    if shards:
        done.append(f"withdrew {len(shards):,} shard(s) ({', '.join(shards[:5])}{' ...' if len(shards) > 5 else ''}): "
                    f"their metadata and failures files are in {aside}/")
    orphans = [p.path for p in report.problems if p.kind == ORPHAN]
    if orphans:
        out.set_aside(orphans, aside)
        done.append(f"moved {len(orphans):,} orphan object(s) to {aside}/")
    if (shards or any(p.kind == MISSING for p in report.problems)) and out.exists(SUCCESS_FILE):
        out.remove(SUCCESS_FILE)
        done.append(f"removed {SUCCESS_FILE}: not every shard is committed")
    if any(p.kind == JOB for p in report.problems):
        out.write(JOB_FILE, json.dumps(job, indent=2).encode())
        done.append(f"wrote {JOB_FILE} back")
    return done

