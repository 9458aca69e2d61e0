"""Where `--model` (and the scorers of `--score`) come from: a local path, `builtin:tiny`, a Hugging
Face repo id, or an fsspec URI.

A source is checked once by the driver (a listing or an API call: seconds, nothing downloaded) and
resolved by every actor to a local path on its own node, which `sdcore.load_pipeline` then loads.

- `owner/name[/path][@revision]`: a model on the Hugging Face Hub (a diffusers folder at the repo's
  top or at `path`, or a single `.safetensors`/`.ckpt` file at `path`). Downloads go through
  `huggingface_hub` into its cache (HF_HOME, or `<model-cache>/hub` when one is given), which
  holds a lock per file; HF_TOKEN and HF_HUB_OFFLINE are honoured.
- `s3://bucket/sd15/`, `gs://…/model.safetensors`, any fsspec URI: a diffusers folder or a single
  file, read with the job's storage options into `<model-cache>/fsspec/`, one folder per URI.

What a source must hold is its `Layout`: a diffusers model (`MODEL`), a transformers CLIP folder
(`CLIP`), a folder holding a diffusers `safety_checker/` and its `feature_extractor/`, such as a
SD 1.x model's (`SAFETY_CHECKER`), or one weight file (`AESTHETIC`, `LORA`, `EMBEDDING`).

Only what generation (or scoring) reads is fetched (`sdcore.weights.folder_files`): configs, tokenizer and one
weight file per component, the fp16 variant for half precision. One download per node: a file
lock per source makes the node's other actors wait for it and then find it in the cache. A file is
downloaded under a temporary name, its size checked (and the Hub's sha256 where given), then
renamed into place; a record beside it, written last, says which remote version it is. A download
killed halfway leaves a temporary file that the next holder of the lock deletes, never a file in
the cache.
"""
import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import torch
from filelock import FileLock

from jobs import storage
from sdcore import builtin, scorer_weights, weights
from sdcore.errors import SdcoreError

CACHE_ENV = "SDBATCH_MODEL_CACHE"
# owner/name, then an optional path inside the repo and an optional @revision (branch, tag or commit)
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<path>(?:/[^@/]+)*)(?:@(?P<revision>[\w./-]+))?")
CHUNK = 8 << 20  # bytes per read while downloading
# Single-file checkpoints that are never the one to pick among several: training weights.
NOT_FOR_INFERENCE = ("*nonema*", "*non_ema*", "*non-ema*")


class SourceError(SdcoreError):
    """--model names nothing that can be loaded (missing, unreachable, incomplete): bad input."""


@dataclass(frozen=True)
class Layout:
    """What a source must hold, and the option that names it (for messages)."""

    option: str
    folder_files: Callable | None  # (relative paths a folder holds, dtype) -> the files to fetch; None: a file only
    suffixes: tuple[str, ...]  # the single weight files it may be; () for a folder only
    what: str  # for messages: what it should be


MODEL = Layout("--model", weights.folder_files, weights.SINGLE_FILE_SUFFIXES,
               f"a diffusers folder or a {' / '.join(weights.SINGLE_FILE_SUFFIXES)} file")
CLIP = Layout("--clip-model", scorer_weights.clip_files, (), "a transformers CLIP folder")
SAFETY_CHECKER = Layout("--safety-checker", scorer_weights.safety_checker_files, (),
                        "a folder holding safety_checker/ and feature_extractor/")
AESTHETIC = Layout("--aesthetic-model", None, scorer_weights.AESTHETIC_SUFFIXES,
                   f"a {' / '.join(scorer_weights.AESTHETIC_SUFFIXES)} file")
# Adapter files (jobs.adapters): kohya/A1111 and diffusers/PEFT LoRAs (sdcore.lora reads safetensors only),
# A1111 and diffusers embeddings.
LORA_SUFFIXES = (".safetensors",)
EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt")
LORA = Layout("--lora", None, LORA_SUFFIXES, "a LoRA .safetensors file")
EMBEDDING = Layout("--embedding", None, EMBEDDING_SUFFIXES, f"an embedding {' / '.join(EMBEDDING_SUFFIXES)} file")


@dataclass(frozen=True)
class Source:
    kind: str  # "builtin", "local", "hub" or "uri"
    text: str  # as the user wrote it
    repo: str = ""  # hub: owner/name
    path: str = ""  # hub: path inside the repo ("" for its top)
    revision: str | None = None  # hub: branch, tag or commit
    layout: Layout = MODEL


@dataclass
class Resolved:
    """A source made local on this node: what to load, and exactly which files those are."""

    path: str  # what sdcore.load_pipeline takes
    revision: str | None = None  # the Hub's commit, or a digest of the remote files' versions; None when local
    files: list[dict] = field(default_factory=list)  # {"path", "size", "version"} of every file fetched
    downloaded_files: int = 0  # by this call: 0 when the node's cache had everything
    downloaded_bytes: int = 0
    seconds: float = 0.0

    def report(self) -> dict:
        return {"revision": self.revision, "files": self.files, "downloaded_files": self.downloaded_files,
                "downloaded_bytes": self.downloaded_bytes, "seconds": round(self.seconds, 3)}


def parse(model: str, layout: Layout = MODEL) -> Source:
    """What kind of source `model` is. An existing local path wins over a look-alike Hub id."""
    if model.startswith("builtin:") and layout is MODEL:
        return Source("builtin", model)
    protocol = fsspec.utils.get_protocol(model)
    if protocol not in ("file", "local"):
        return Source("uri", model, layout=layout)
    if protocol == "file" and model.startswith("file://"):
        return Source("local", model.removeprefix("file://"), layout=layout)
    if not os.path.exists(model) and (m := HUB_ID.fullmatch(model)) and not model.startswith("."):
        return Source("hub", model, repo=m["repo"], path=m["path"].strip("/"), revision=m["revision"], layout=layout)
    return Source("local", model, layout=layout)


def default_cache(environ=os.environ) -> Path:
    """`$SDBATCH_MODEL_CACHE`, else `$HF_HOME/sdbatch`, else `~/.cache/sdbatch` (of the node it runs on)."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]) / "sdbatch"
    return Path.home() / ".cache" / "sdbatch"


def check(model: str, storage_options: dict | None = None, dtype: torch.dtype = torch.float32,
          cache: str | os.PathLike | None = None, layout: Layout = MODEL) -> None:
    """Raise SourceError unless `model` exists and holds what `layout` asks for; downloads nothing."""
    source = parse(model, layout)
    if source.kind == "builtin":
        if model != builtin.NAME:
            raise SourceError(f"--model {model}: unknown built-in model; the only one is {builtin.NAME}")
    elif source.kind == "local":
        _check_local(source.text, layout)
    elif source.kind == "hub":
        _hub_listing(source, cache_dir=_hub_cache(cache), dtype=dtype, metadata=False)
    else:
        fs, root = storage.resolve(model, storage_options)
        _remote_selection(fs, root, model, dtype, layout)


def resolve(model: str, *, storage_options: dict | None = None, dtype: torch.dtype = torch.float32,
            cache: str | os.PathLike | None = None, layout: Layout = MODEL) -> Resolved:
    """`model` as a local path on this node, downloading what is missing from `cache`."""
    source = parse(model, layout)
    if source.kind in ("builtin", "local"):
        if source.kind == "local":
            _check_local(source.text, layout)
        return Resolved(path=source.text)
    start = time.monotonic()
    if source.kind == "hub":
        resolved = _resolve_hub(source, cache_dir=_hub_cache(cache), dtype=dtype)
    else:
        resolved = _resolve_uri(model, storage_options or {}, Path(cache or default_cache()) / "fsspec", dtype, layout)
    resolved.seconds = time.monotonic() - start
    return resolved


def _hub_cache(cache) -> Path | None:
    """The Hugging Face cache to use: `<cache>/hub` for a cache the user chose, else the Hub's own."""
    if cache is None and not os.environ.get(CACHE_ENV):
        return None
    return Path(cache or default_cache()) / "hub"


def _check_local(path: str, layout: Layout = MODEL) -> None:
    p = Path(path)
    if not p.exists():
        hint = "" if HUB_ID.fullmatch(path) is None else " (for a Hugging Face repo of that name, check its spelling)"
        raise SourceError(f"{layout.option} {path}: no such file or directory{hint}")
    if p.is_dir() and layout is MODEL:
        missing = weights.missing_components(p)
        if missing:
            raise SourceError(f"--model {path}: not a diffusers model folder (no {', '.join(missing)})")
    elif p.is_dir() and layout.folder_files is None:
        raise SourceError(f"{layout.option} {path}: a folder; expected {layout.what}")
    elif p.is_dir():
        select([f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file()], torch.float32, path, layout)
    elif p.suffix not in layout.suffixes:
        raise SourceError(f"{layout.option} {path}: expected {layout.what}")


def select(available: list[str], dtype: torch.dtype, where: str, layout: Layout = MODEL) -> tuple[str, list[str]]:
    """From the relative paths a folder (or repo) holds: ("folder", the files to fetch) for a
    folder of `layout` (a diffusers folder for MODEL), ("file", [the one checkpoint]) for a folder
    of single files."""
    if layout.folder_files is not None and (not layout.suffixes or weights.is_folder_listing(available)):
        try:
            return "folder", layout.folder_files(available, dtype)
        except SdcoreError as e:
            raise SourceError(f"{layout.option} {where}: {e}") from None
    return "file", [_pick_single_file(available, dtype, where, layout)]


def _pick_single_file(available: list[str], dtype: torch.dtype, where: str, layout: Layout = MODEL) -> str:
    top = [f for f in available if "/" not in f]
    for suffix in layout.suffixes:  # safetensors first: no pickle code, memory-mapped
        found = [f for f in top if f.endswith(suffix) and not any(fnmatch.fnmatch(f.lower(), p) for p in NOT_FOR_INFERENCE)]
        if len(found) > 1:  # the EMA-only export is the one for inference; fp16 for half precision
            found = [f for f in found if "ema" in f.lower()] or found
            half = dtype in (torch.float16, torch.bfloat16)
            found = [f for f in found if ("fp16" in f.lower()) == half] or found
        if len(found) == 1:
            return found[0]
        if found:
            raise SourceError(f"{layout.option} {where}: holds several checkpoints ({', '.join(sorted(found))}); "
                              f"name one, e.g. {layout.option} <repo or folder>/<file>")
    if layout is not MODEL:
        raise SourceError(f"{layout.option} {where}: expected {layout.what}")
    raise SourceError(f"--model {where}: neither a diffusers folder (no model_index.json, unet/config.json, ...) "
                      f"nor a {' / '.join(weights.SINGLE_FILE_SUFFIXES)} checkpoint")


# --- the Hugging Face Hub --------------------------------------------------------------------------

def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
    except ImportError:
        raise SourceError("--model names a Hugging Face repo, which needs huggingface_hub: pip install 'sdbatch[hub]'") from None
    return huggingface_hub


def _hub_listing(source: Source, *, cache_dir, dtype, metadata: bool) -> tuple[str, str, list[str], dict, str | None]:
    """(commit, kind, files to fetch, {file: (size, sha256)}, the cached snapshot folder when offline)."""
    hf = _hub()
    where, option = source.text, source.layout.option
    try:
        if hf.constants.HF_HUB_OFFLINE:
            snapshot = hf.snapshot_download(source.repo, revision=source.revision, cache_dir=cache_dir,
                                            local_files_only=True)
            root = Path(snapshot)
            listing = {p.relative_to(root).as_posix(): (p.stat().st_size, None) for p in root.rglob("*") if p.is_file()}
            commit = root.name
        else:
            info = hf.HfApi().model_info(source.repo, revision=source.revision, files_metadata=metadata)
            listing = {s.rfilename: (s.size, s.lfs.sha256 if metadata and s.lfs else None) for s in info.siblings}
            commit, snapshot = info.sha, None
    except hf.errors.LocalEntryNotFoundError:
        raise SourceError(f"{option} {where}: not in the Hugging Face cache ({cache_dir or hf.constants.HF_HUB_CACHE}), "
                          "and HF_HUB_OFFLINE is set") from None
    except hf.errors.GatedRepoError:
        raise SourceError(f"{option} {where}: a gated repo; accept its terms on the Hub and set HF_TOKEN") from None
    except hf.errors.RepositoryNotFoundError:
        raise SourceError(f"{option} {where}: no such Hugging Face repo (or it is private: set HF_TOKEN), "
                          "and no such local path") from None
    except hf.errors.RevisionNotFoundError:
        raise SourceError(f"{option} {where}: the repo has no revision {source.revision!r}") from None
    except (OSError, hf.errors.HfHubHTTPError) as e:
        raise SourceError(f"{option} {where}: cannot reach the Hugging Face Hub: {e}") from None
    prefix = f"{source.path}/" if source.path else ""
    if source.path and source.path in listing:  # a file named by its path
        kind, files = "file", [source.path]
    else:
        inside = [f.removeprefix(prefix) for f in listing if f.startswith(prefix)]
        if not inside:
            raise SourceError(f"{option} {where}: the repo has no {source.path}")
        kind, files = select(inside, dtype, where, source.layout)
        files = [prefix + f for f in files]
    return commit, kind, files, {f: listing[f] for f in files}, snapshot


def _resolve_hub(source: Source, *, cache_dir, dtype) -> Resolved:
    hf = _hub()
    commit, kind, files, expected, snapshot = _hub_listing(source, cache_dir=cache_dir, dtype=dtype, metadata=True)
    resolved = Resolved(path="", revision=commit)
    for name in files:
        size, sha256 = expected[name]
        cached = hf.try_to_load_from_cache(source.repo, name, cache_dir=cache_dir, revision=commit)
        local = Path(hf.hf_hub_download(source.repo, name, revision=commit, cache_dir=cache_dir,
                                        local_files_only=snapshot is not None))
        if not isinstance(cached, str):  # fetched just now: check it before anything reads it
            _verify(local, size, sha256, f"{source.repo}/{name}@{commit}")
            resolved.downloaded_files += 1
            resolved.downloaded_bytes += local.stat().st_size
        resolved.files.append({"path": name, "size": local.stat().st_size, "version": sha256 or commit})
        root = Path(str(local).removesuffix(name).rstrip("/"))  # the snapshot folder
    folder = root / source.path if source.path else root
    resolved.path = str(root / files[0] if kind == "file" else folder)
    return resolved


def _verify(path: Path, size: int | None, sha256: str | None, what: str) -> None:
    actual = path.stat().st_size
    problem = None
    if size is not None and actual != size:
        problem = f"{actual} bytes, expected {size}"
    elif sha256 is not None and file_sha256(path) != sha256:
        problem = f"its sha256 is not the Hub's {sha256}"
    if problem:
        path.resolve().unlink(missing_ok=True)  # the blob behind the cache's link: the next try fetches it again
        raise SourceError(f"{what}: the download is damaged ({problem}); it was removed, try again")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- fsspec URIs (s3://, gs://, ...) -------------------------------------------------------------------

def _version(info: dict) -> str:
    """What changes when the remote object does: its ETag or hash where the store gives one."""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "LastModified", "mtime", "created"):
        if info.get(key) is not None:
            return f"{key}:{str(info[key]).strip(chr(34))}"
    return f"size:{info['size']}"


def _remote_selection(fs, root: str, where: str, dtype, layout: Layout = MODEL) -> tuple[str, dict[str, dict]]:
    """("folder" or "file", {relative path: fsspec info}) of what to fetch from `root`."""
    def listing():
        info = fs.info(root)
        if info["type"] != "directory":
            return info, {}
        return info, fs.find(root, detail=True)

    try:
        info, found = storage.DEFAULT_RETRY.call(f"listing {storage.redact_url(where)}", listing)
    except FileNotFoundError:
        raise SourceError(f"{layout.option} {storage.redact_url(where)}: no such file or folder") from None
    if info["type"] != "directory":
        if not layout.suffixes or not root.endswith(layout.suffixes):
            raise SourceError(f"{layout.option} {storage.redact_url(where)}: expected {layout.what}")
        return "file", {root.rsplit("/", 1)[-1]: info}
    base = root.rstrip("/") + "/"
    listed = {path.removeprefix(base): i for path, i in found.items() if path.startswith(base) and i["type"] == "file"}
    kind, files = select(list(listed), dtype, storage.redact_url(where), layout)
    return kind, {f: listed[f] for f in files}


def _resolve_uri(model: str, storage_options: dict, cache: Path, dtype, layout: Layout = MODEL) -> Resolved:
    fs, root = storage.resolve(model, storage_options)
    kind, wanted = _remote_selection(fs, root, model, dtype, layout)
    canonical = fs.unstrip_protocol(root)
    name = re.sub(r"[^\w.-]+", "-", canonical.split("://", 1)[-1].strip("/"))[-60:]
    local_root = cache / f"{name}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"
    records, partial = local_root / ".sdbatch", local_root / ".partial"
    resolved = Resolved(path="")
    local_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local_root / ".lock")):  # the node's other actors wait here, then find the files
        shutil.rmtree(partial, ignore_errors=True)  # left by a download killed halfway; nobody else writes here now
        for rel, info in sorted(wanted.items()):
            local, record = local_root / rel, records / f"{rel}.json"
            version = _version(info)
            if not _is_cached(local, record, info["size"], version):
                remote = root if kind == "file" else f"{root.rstrip('/')}/{rel}"
                record.unlink(missing_ok=True)
                sha256 = storage.DEFAULT_RETRY.call(f"downloading {storage.redact_url(model)} {rel}", _download,
                                                    fs, remote, local, info["size"], partial)
                record.parent.mkdir(parents=True, exist_ok=True)
                storage.write_atomic(fsspec.filesystem("file"), str(record),
                                     json.dumps({"size": info["size"], "version": version, "sha256": sha256}).encode())
                resolved.downloaded_files += 1
                resolved.downloaded_bytes += info["size"]
            resolved.files.append({"path": rel, "size": info["size"], "version": version})
    digest = hashlib.sha256(json.dumps(resolved.files, sort_keys=True).encode()).hexdigest()[:16]
    resolved.revision = f"files:{digest}"
    resolved.path = str(local_root / next(iter(wanted)) if kind == "file" else local_root)
    return resolved


def _is_cached(local: Path, record: Path, size: int, version: str) -> bool:
    try:
        saved = json.loads(record.read_text())
        return saved["version"] == version and saved["size"] == size == local.stat().st_size
    except (OSError, ValueError, KeyError):
        return False


def _download(fs, remote: str, local: Path, size: int, partial: Path) -> str:
    """Copy one remote file to `local` through a temporary file; its sha256."""
    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / f"{uuid.uuid4().hex}.part"
    h = hashlib.sha256()
    try:
        with fs.open(remote, "rb", block_size=CHUNK) as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if tmp.stat().st_size != size:
            raise OSError(f"{remote}: got {tmp.stat().st_size} bytes, the listing says {size}")  # retried
        local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()
