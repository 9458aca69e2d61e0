"""The manifest's input images (`init_image`, `mask_image`): where each is, whether it exists, its bytes.

A cell is one of:
- a string: a local path or fsspec URI; a relative path is relative to the manifest's folder;
- bytes (a binary column);
- a Hugging Face `Image` struct {bytes, path}: its bytes when present, else its path.
Bytes stay references into the shard's Arrow table (`pa.Buffer`, no copy) until the actor reads them;
`load` reads an image and has sdcore.images decode it and fit it to a row's size.
"""
import hashlib
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import storage
from sdcore.images import fit_image, fit_mask, read_image

COLUMNS = ("init_image", "mask_image")

ImageRef = str | pa.Buffer  # a resolved path/URI, or the image file's bytes


def is_image_type(t: pa.DataType) -> bool:
    """Whether a column of type `t` can hold images (null: an all-empty column)."""
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return bool(names) and names <= {"bytes", "path"}
    return (pa.types.is_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t))


def base_of(manifest_url: str) -> str:
    """The folder that relative image paths are relative to: the manifest's own."""
    return posixpath.dirname(manifest_url.rstrip("/")) if "://" in manifest_url else \
        posixpath.dirname(posixpath.abspath(manifest_url))


def resolve(path: str, base: str) -> str:
    """`path` as the manifest means it: a URI or absolute path as is, a relative one under `base`."""
    if "://" in path or posixpath.isabs(path):
        return path
    return posixpath.join(base, path)


def refs(arr: pa.Array | None, base: str, n: int) -> list[ImageRef | None]:
    """One reference per row of an image column (None: no image); `arr` None: the column is absent."""
    if arr is None or pa.types.is_null(arr.type):
        return [None] * n
    if pa.types.is_struct(arr.type):
        names = [arr.type.field(i).name for i in range(arr.type.num_fields)]
        data = refs(arr.field("bytes"), base, n) if "bytes" in names else [None] * n
        paths = refs(arr.field("path"), base, n) if "path" in names else [None] * n
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
        return [(d if d is not None else p) if ok else None for d, p, ok in zip(data, paths, valid.tolist())]
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return _views(arr)
    return [None if v is None else resolve(v, base) for v in arr.to_pylist()]


def _views(arr: pa.Array) -> list[pa.Buffer | None]:
    """Each cell of a binary column as a view of the column's bytes, not a copy (scalars would copy)."""
    _, offsets, data = arr.buffers()
    width = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    ends = np.frombuffer(offsets, width)[arr.offset:arr.offset + len(arr) + 1].tolist()
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool).tolist()
    return [data.slice(lo, hi - lo) if ok else None for lo, hi, ok in zip(ends, ends[1:], valid)]


def paths(arr: pa.Array | None) -> pa.Array | None:
    """The paths of an image column as written (strings, null where a cell holds bytes or nothing);
    None when it holds no paths at all."""
    if arr is None or pa.types.is_null(arr.type):
        return None
    if pa.types.is_struct(arr.type):
        has_path = any(arr.type.field(i).name == "path" for i in range(arr.type.num_fields))
        if not has_path:
            return None
        has_bytes = any(arr.type.field(i).name == "bytes" for i in range(arr.type.num_fields))
        path = arr.field("path")
        return pc.if_else(arr.field("bytes").is_valid(), pa.scalar(None, path.type), path) if has_bytes else path
    return arr if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) else None


def present(arr: pa.Array | None, n: int) -> np.ndarray:
    """Per row of `n`: whether the cell holds an image (an Image struct with neither bytes nor path holds none)."""
    if arr is None or pa.types.is_null(arr.type):
        return np.zeros(n, bool)
    if pa.types.is_struct(arr.type):
        names = [arr.type.field(i).name for i in range(arr.type.num_fields)]
        inner = np.zeros(n, bool)
        for name in names:
            inner |= present(arr.field(name), n)
        return inner & np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
    return np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)


@dataclass
class Existence:
    """Whether referenced images exist, with one listing per distinct folder.

    Each folder's listing is kept as a sorted array of 8-byte name hashes, so a manifest naming
    millions of images costs 8 bytes per file of the folders it uses, not a string each. A hash
    collision can only hide a missing file, which then fails alone on the actor.
    """

    storage_options: dict = field(default_factory=dict)
    _listings: dict[str, np.ndarray] = field(default_factory=dict)  # folder URI -> sorted name hashes

    def missing(self, paths: list[str | None]) -> np.ndarray:
        """Per path: True where it names no file (None and bytes are never missing)."""
        out = np.zeros(len(paths), bool)
        for i, path in enumerate(paths):
            if isinstance(path, str):
                folder, name = path.rsplit("/", 1) if "/" in path else ("", path)
                listing = self._listing(folder)
                j = np.searchsorted(listing, _name_key(name))
                out[i] = j == len(listing) or listing[j] != _name_key(name)
        return out

    def _listing(self, folder: str) -> np.ndarray:
        if folder not in self._listings:
            fs, path = storage.resolve(folder or ".", self.storage_options)
            try:
                found = storage.DEFAULT_RETRY.call(f"listing {storage.redact_url(folder)}", fs.ls, path, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                found = []
            fs.invalidate_cache(path)  # object stores' listing caches would keep every entry's details
            keys = [_name_key(f["name"].rstrip("/").rsplit("/", 1)[-1]) for f in found if f["type"] == "file"]
            self._listings[folder] = np.sort(np.array(keys, np.int64))
        return self._listings[folder]


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def read(ref: ImageRef, storage_options: dict | None = None) -> tuple[bytes, str]:
    """The bytes of a work item's image and their sha256: a path/URI read through fsspec with the
    job's storage options, bytes as they are. FileNotFoundError/OSError for a file that cannot be read."""
    if isinstance(ref, pa.Buffer):
        data = ref.to_pybytes()
    else:
        fs, path = storage.resolve(ref, storage_options)
        data = storage.read_bytes(fs, path)
    return data, hashlib.sha256(data).hexdigest()



def load(ref: ImageRef, column: str, width: int, height: int, resize: str,
         storage_options: dict | None = None) -> tuple[np.ndarray, str]:
    """An `init_image` (uint8 [height, width, 3]) or `mask_image` (uint8 [height, width]) read, decoded and
    fitted to the size as `resize` says, and the sha256 of its file. sdcore.errors.ImageError for bytes
    that are no image; OSError/StorageError for a file that cannot be read."""
    data, sha256 = read(ref, storage_options)
    fit = fit_image if column == "init_image" else fit_mask
    return fit(read_image(data), width, height, resize), sha256
