"""The output dataset: layout, image formats and their parameters, shard commit, resume scan, job
identity, backpressure."""
import hashlib
import io
import json
import os
import re
import tarfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import ExifTags, Image

from jobs import images, sink, storage
from jobs.manifest import Defaults, open_manifest
from jobs.plan import manifest_shards, read_shard, shards
from jobs.sink import ImageEncoding, ImageWriter, JobSpec, Output, OutputError, ShardWriter
from tests.jobdata import tar_members

MODEL, FINGERPRINT = "builtin:tiny", "f" * 16
SCHED_CONFIG = {"beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
ENCODINGS = [ImageEncoding("png"), ImageEncoding("jpeg", 95), ImageEncoding("webp", 95)]


@pytest.fixture
def manifest(tmp_path):
    path = str(tmp_path / "manifest.parquet")
    pq.write_table(pa.table({
        "id": [f"img{i}" for i in range(7)],
        "prompt": [f"a photo of a cat, ünïcode {i}" for i in range(7)],
        "num_images": [1, 2, 1, 1, 1, 1, 1],
        "label": pa.array([i % 3 for i in range(7)], pa.int16()),
        "tags": pa.array([["a", "b"], [], None, ["c"], ["d"], ["e"], ["f"]], pa.list_(pa.string())),
    }), path)
    return path


def pixels(seed, size=16) -> np.ndarray:
    """Pixels that depend on the seed only, like a deterministic generator's."""
    rng = np.random.default_rng(seed % 2**32)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def job(manifest_path, shard_size=3, **changes) -> JobSpec:
    with open_manifest(manifest_path) as m:
        fields = dict(manifest=manifest_path, manifest_fingerprint=m.fingerprint(), model=MODEL,
                      model_fingerprint=FINGERPRINT, rows=m.num_rows, images=8, shard_size=shard_size,
                      defaults=Defaults(steps=4, width=64, height=64), dtype="fp32",
                      settings={"batch_size": 2, "storage_options": {"key": "AKIA", "secret": "hunter2"}})
    return JobSpec(**{**fields, **changes})


def run_shards(out, manifest_path, spec, *, only=None, fail=(), writer_kwargs=None) -> list:
    """What an actor does: read the shard, make images, hand them to the writer, commit."""
    results = []
    with open_manifest(manifest_path) as m, ImageWriter(out, **(writer_kwargs or {})) as writer:
        for shard in shards(m.num_rows, spec.shard_size):
            if only is not None and shard.id not in only:
                continue
            rows = read_shard(m, shard, spec.defaults)
            w = ShardWriter(out, writer, rows, job=out.read_job(), model=MODEL, model_fingerprint=FINGERPRINT)
            for item in rows.items:
                if item.id in fail:
                    w.fail(item, "NonFiniteOutputError: NaN", attempts=2)
                else:
                    w.add(item, pixels(item.seed), scheduler_config=SCHED_CONFIG, seconds=0.5)
            results.append(w.commit())
    return results


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.format)
def test_layout_metadata_and_image_parameters(tmp_path, manifest, encoding):
    out = Output(str(tmp_path / "out"))
    spec = job(manifest, image=encoding)
    assert out.prepare(spec) == set()
    results = run_shards(out, manifest, spec)
    assert [(r.shard, r.images, r.failures) for r in results] == [
        ("shard-000000", 4, 0), ("shard-000001", 3, 0), ("shard-000002", 1, 0)]
    root = tmp_path / "out"
    ext = {"png": "png", "jpeg": "jpg", "webp": "webp"}[encoding.format]
    assert sorted(os.listdir(root / "images" / "shard-000000")) == [f"{i}.{ext}" for i in ("img0", "img1-0", "img1-1", "img2")]
    assert sorted(os.listdir(root / "metadata")) == [f"shard-00000{i}.parquet" for i in range(3)]
    assert not (root / "failures").exists()

    meta = pq.read_table(root / "metadata" / "shard-000000.parquet")
    assert meta.schema == sink.metadata_schema(pa.schema([pa.field("label", pa.int16()), pa.field("tags", pa.list_(pa.string()))]))
    assert meta.column_names[:3] == ["id", "manifest_row", "prompt"] and meta.column_names[-1] == "sdbatch_version"
    rows = meta.to_pylist()
    assert [(r["id"], r["manifest_row"], r["label"], r["tags"]) for r in rows] == [
        ("img0", 0, 0, ["a", "b"]), ("img1-0", 1, 1, []), ("img1-1", 1, 1, []), ("img2", 2, 2, None)]
    for r in rows:
        data = (root / r["image_path"]).read_bytes()
        assert r["image_sha256"] == hashlib.sha256(data).hexdigest()
        params = sink.read_params(data)
        for key in ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler",
                    "model", "model_fingerprint", "sdbatch_version"):
            assert params[key] == r[key], key
        assert params["scheduler_config"] == json.loads(r["scheduler_config"]) == SCHED_CONFIG
        assert params["prompt"].endswith("ünïcode " + str(r["manifest_row"]))
        with Image.open(root / r["image_path"]) as im:
            assert im.format == encoding.format.upper() and im.size == (16, 16)
            if encoding.format == "png":
                assert np.array_equal(np.asarray(im), pixels(r["seed"]))
    # all shards read as one dataset with one schema
    table = ds.dataset(str(root / "metadata"), format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(["img0", "img1-0", "img1-1"] + [f"img{i}" for i in range(2, 7)])


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.format)
def test_images_are_byte_deterministic_and_carry_their_parameters(encoding):
    img = pixels(3, size=32)
    params = {"prompt": "a cat, ünïcode 🦊 猫", "seed": 1}
    a = encoding.encode(img, params)
    assert a == encoding.encode(img.copy(), dict(reversed(list(params.items()))))
    assert a == encoding.encode(Image.fromarray(img), params)
    assert a != encoding.encode(img, {**params, "seed": 2})
    assert sink.read_params(a) == params
    with Image.open(io.BytesIO(a)) as im:
        assert im.format == encoding.format.upper() and im.size == (32, 32) and im.mode == "RGB"
        if encoding.format == "png":
            assert b"tIME" not in a and json.loads(im.text["sdbatch"]) == params
        else:  # where EXIF readers (Pillow, exiftool, Automatic1111's PNG Info) find parameters
            comment = im.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
            assert comment == b"UNICODE\0" + json.dumps(params, ensure_ascii=False, sort_keys=True,
                                                         separators=(",", ":")).encode("utf-16-be")
            assert a != ImageEncoding(encoding.format, 80).encode(img, params)


@pytest.mark.parametrize("format, quality, message", [
    ("png", 90, "--quality applies to jpeg and webp; png is lossless"),
    ("jpeg", 0, "--quality must be 1..100, got 0"),
    ("webp", 101, "--quality must be 1..100, got 101"),
    ("gif", None, "--image-format must be one of png, jpeg, webp, got 'gif'"),
])
def test_bad_image_encodings_are_refused(format, quality, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ImageEncoding.of(format, quality)
    assert ImageEncoding.of("webp", None) == ImageEncoding("webp", sink.DEFAULT_QUALITY)


def test_images_and_metadata_are_identical_across_writer_settings(tmp_path, manifest):
    outputs = []
    for name, kwargs in (("a", {"threads": 1, "max_pending": 1}), ("b", {"threads": 4, "max_pending": 16})):
        out = Output(str(tmp_path / name))
        spec = job(manifest)
        out.prepare(spec)
        run_shards(out, manifest, spec, writer_kwargs=kwargs)
        outputs.append(tmp_path / name)
    a, b = outputs
    for shard in sorted(os.listdir(a / "images")):
        for f in sorted(os.listdir(a / "images" / shard)):
            assert (a / "images" / shard / f).read_bytes() == (b / "images" / shard / f).read_bytes()
    for f in sorted(os.listdir(a / "metadata")):
        assert pq.read_table(a / "metadata" / f).equals(pq.read_table(b / "metadata" / f))


def test_failures_are_recorded_and_the_shard_still_commits(tmp_path, manifest):
    out = Output(str(tmp_path / "out"))
    spec = job(manifest)
    out.prepare(spec)
    run_shards(out, manifest, spec, only={"shard-000000"})  # an earlier attempt wrote img1-1.png
    out.remove(sink.metadata_path("shard-000000"))  # ...but did not commit
    run_shards(out, manifest, spec, only={"shard-000000"}, fail={"img1-1"})
    failures = pq.read_table(tmp_path / "out" / "failures" / "shard-000000.parquet").to_pylist()
    assert [(f["id"], f["manifest_row"], f["error"], f["attempts"], f["label"]) for f in failures] == [
        ("img1-1", 1, "NonFiniteOutputError: NaN", 2, 1)]
    assert failures[0]["seed"] == pq.read_table(tmp_path / "out" / "metadata" / "shard-000000.parquet").column("seed")[1].as_py() + 1
    meta = pq.read_table(tmp_path / "out" / "metadata" / "shard-000000.parquet")
    assert meta.column("id").to_pylist() == ["img0", "img1-0", "img2"]
    assert not (tmp_path / "out" / "images" / "shard-000000" / "img1-1.png").exists()
    # a later attempt without failures removes the stale failures file in the same commit
    out.remove(sink.metadata_path("shard-000000"))
    run_shards(out, manifest, spec, only={"shard-000000"})
    assert not (tmp_path / "out" / "failures" / "shard-000000.parquet").exists()


def test_a_shard_with_only_failures_is_done_with_an_empty_metadata_file(tmp_path, manifest):
    out = Output(str(tmp_path / "out"))
    spec = job(manifest)
    out.prepare(spec)
    run_shards(out, manifest, spec, only={"shard-000002"}, fail={"img6"})
    meta = pq.read_table(tmp_path / "out" / "metadata" / "shard-000002.parquet")
    assert meta.num_rows == 0 and meta.schema.names[0] == "id"
    assert out.done_shards() == {"shard-000002"}
    status = out.status()
    assert (status.shards_done, status.rows_done, status.images_done, status.failures) == (1, 1, 0, 1)


class BrokenUploads(MemoryFileSystem):
    protocol = "brokenmem"

    def pipe_file(self, path, value, **kwargs):
        if path.endswith("img2.png"):
            raise PermissionError("access denied")
        return super().pipe_file(path, value, **kwargs)


def test_a_failed_image_write_leaves_the_shard_uncommitted(tmp_path):
    path = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ["img0", "img1", "img2", "img3"], "prompt": ["a"] * 4}), path)
    out = Output("memory://broken-out")
    out.fs = BrokenUploads()
    spec = job(path, shard_size=4)
    out.prepare(spec)
    with pytest.raises(storage.StorageError, match="shard-000000: 1 of 4 images could not be written; the shard is not committed"):
        run_shards(out, path, spec)
    assert out.done_shards() == set()
    assert out.fs.exists("/broken-out/images/shard-000000/img3.png")
    assert not out.fs.exists("/broken-out/metadata/shard-000000.parquet")


def test_resume_scan_is_one_listing_and_ignores_temporary_files(tmp_path, manifest):
    out = Output(str(tmp_path / "out"))
    spec = job(manifest)
    out.prepare(spec)
    run_shards(out, manifest, spec, only={"shard-000001"})
    (tmp_path / "out" / "metadata" / ".shard-000002.parquet.tmp-123").write_bytes(b"partial")
    (tmp_path / "out" / "metadata" / "notes.txt").write_text("x")
    calls = []
    original = out.fs.ls
    out.fs.ls = lambda *a, **k: (calls.append(a), original(*a, **k))[-1]
    assert out.done_shards() == {"shard-000001"}
    assert len(calls) == 1
    assert out.prepare(spec) == {"shard-000001"}


def test_resume_on_memory_store(manifest):
    out = Output("memory://resume-out")
    spec = job(manifest)
    out.prepare(spec, mode="overwrite")
    run_shards(out, manifest, spec, only={"shard-000000", "shard-000002"})
    assert Output("memory://resume-out").prepare(spec, mode="resume") == {"shard-000000", "shard-000002"}
    assert not out.finish({"images": 5})
    run_shards(out, manifest, spec, only={"shard-000001"})
    assert out.finish({"images": 8})
    assert out.success() == {"shards": 3, "images": 8}
    status = out.status()
    assert (status.shards, status.shards_done, status.rows_done, status.images_done, status.failures) == (3, 3, 7, 8, 0)
    assert "_SUCCESS  yes" in status.format()
    out.prepare(spec, mode="overwrite")
    assert out.fs.find("/resume-out") == ["/resume-out/_sdbatch/job.json"]


def test_job_json_has_identity_and_no_credentials(tmp_path, manifest):
    out = Output(str(tmp_path / "out"))
    out.prepare(job(manifest))
    text = (tmp_path / "out" / "_sdbatch" / "job.json").read_text()
    assert "hunter2" not in text and "AKIA" not in text
    saved = json.loads(text)
    assert saved["identity"]["model_fingerprint"] == FINGERPRINT
    assert saved["identity"]["defaults"]["steps"] == 4
    assert saved["settings"]["storage_options"] == {"key": "***", "secret": "***"}
    assert (saved["rows"], saved["shards"]) == (7, 3)


@pytest.mark.parametrize("change, what", [
    ({"model_fingerprint": "0" * 16}, "model_fingerprint"),
    ({"manifest_fingerprint": "0" * 32}, "manifest_fingerprint"),
    ({"shard_size": 5}, "shard_size"),
    ({"defaults": {"steps": 5, "width": 64, "height": 64}}, "defaults"),
    ({"dtype": "fp16"}, "dtype"),
    ({"image": ImageEncoding("jpeg", 95)}, "image_format"),
    ({"format": "webdataset"}, "format"),
    ({"defaults": {"steps": 4, "width": 64, "height": 64, "strength": 0.5}}, "defaults"),
    ({"defaults": {"steps": 4, "width": 64, "height": 64, "resize": "crop"}}, "defaults"),
    ({"adapters": {"loras": {"cat": "a" * 64}, "embeddings": {}}}, "loras"),
    ({"adapters": {"loras": {}, "embeddings": {"<owl>": "b" * 64}}}, "embeddings"),
])
def test_a_different_job_is_refused_unless_overwriting(tmp_path, manifest, change, what):
    if "defaults" in change:
        change = {"defaults": Defaults(**change["defaults"])}
    out = Output(str(tmp_path / "out"))
    out.prepare(job(manifest))
    run_shards(out, manifest, job(manifest), only={"shard-000000"})
    with pytest.raises(OutputError, match=f"holds a different job \\({what}: .* there, .* now\\); use --overwrite"):
        out.prepare(job(manifest, **change))
    assert out.done_shards() == {"shard-000000"}
    # same job but other settings (batch size, ...) continue it
    assert out.prepare(job(manifest, settings={"batch_size": 64})) == {"shard-000000"}
    assert out.prepare(job(manifest, **change), mode="overwrite") == set()
    assert not (tmp_path / "out" / "images").exists() and not (tmp_path / "out" / "metadata").exists()
    assert json.loads((tmp_path / "out" / "_sdbatch" / "job.json").read_text())["identity"][what] != (
        job(manifest).identity()[what])


def test_quality_is_part_of_the_identity_and_older_jobs_are_png(tmp_path, manifest):
    out = Output(str(tmp_path / "jpeg"))
    spec = job(manifest, image=ImageEncoding("jpeg", 95))
    out.prepare(spec)
    run_shards(out, manifest, spec, only={"shard-000000"})
    with pytest.raises(OutputError, match="quality: 95 there, 80 now"):
        out.prepare(job(manifest, image=ImageEncoding("jpeg", 80)))
    assert out.prepare(job(manifest), mode="overwrite") == set()  # the .jpg files are sdbatch's to delete
    assert not (tmp_path / "jpeg" / "images").exists()
    out = Output(str(tmp_path / "old"))
    out.prepare(job(manifest))
    path = tmp_path / "old" / "_sdbatch" / "job.json"
    old = json.loads(path.read_text())
    del old["identity"]["image_format"], old["identity"]["quality"]  # as sdbatch wrote it before image formats
    path.write_text(json.dumps(old))
    assert out.prepare(job(manifest)) == set()
    assert sink.ImageEncoding.of_job(old) == sink.PNG
    with pytest.raises(OutputError, match="image_format: png there, webp now"):
        out.prepare(job(manifest, image=ImageEncoding("webp", 95)))


def test_older_jobs_ran_with_the_default_strength_and_resize_and_no_adapters(tmp_path, manifest):
    out = Output(str(tmp_path / "old"))
    out.prepare(job(manifest))
    path = tmp_path / "old" / "_sdbatch" / "job.json"
    old = json.loads(path.read_text())
    del old["identity"]["loras"], old["identity"]["embeddings"]  # as sdbatch wrote it before adapters
    del old["identity"]["defaults"]["strength"], old["identity"]["defaults"]["resize"]
    path.write_text(json.dumps(old))
    assert out.prepare(job(manifest)) == set()
    assert sink.adapters_of(old) == sink.NO_ADAPTERS
    with pytest.raises(OutputError, match='loras: {} there, {"cat": "aaaa'):
        out.prepare(job(manifest, adapters={"loras": {"cat": "a" * 64}, "embeddings": {}}))
    # an actor has not read the files yet: their sha256 are compared once it has
    assert out.check(job(manifest, adapters={"loras": None, "embeddings": None})) is not None


def test_metadata_records_mode_strength_input_sha256_and_adapters_never_image_bytes(tmp_path):
    path = str(tmp_path / "manifest.parquet")
    (tmp_path / "in.png").write_bytes(b"init file")
    pq.write_table(pa.table({
        "id": ["plain", "var", "paint"], "prompt": ["a <owl>", "b", "c <owl>"],
        "init_image": [None, "in.png", "in.png"], "mask_image": pa.array([None, None, b"mask bytes"], pa.binary()),
        "strength": [None, 0.4, None], "loras": ["cat:0.5", None, "dog,cat:0.25"], "label": [1, 2, 3],
    }), path)
    lora_sha = {"cat": "c" * 64, "dog": "d" * 64}
    spec = job(path, images=3, adapters={"loras": lora_sha, "embeddings": {"<owl>": "e" * 64}})
    out = Output(str(tmp_path / "out"))
    out.prepare(spec)
    with open_manifest(path) as m, ImageWriter(out) as writer:
        (shard,) = manifest_shards(m, 3)
        rows = read_shard(m, shard, spec.defaults)
        w = ShardWriter(out, writer, rows, job=out.read_job(), model=MODEL, model_fingerprint=FINGERPRINT)
        for item in rows.items:
            sha = [images.read(ref)[1] if ref is not None else None for ref in (item.init_image, item.mask_image)]
            used = ("<owl>",) if "<owl>" in item.prompt else ()
            w.add(item, pixels(item.seed), scheduler_config=SCHED_CONFIG, seconds=0.5,
                  inputs=sink.Inputs(*sha, embeddings=used))
        w.commit()
    meta = pq.read_table(tmp_path / "out" / "metadata" / "shard-000000.parquet")
    assert "init_image" not in meta.column_names and "mask_image" not in meta.column_names
    init_sha, mask_sha = hashlib.sha256(b"init file").hexdigest(), hashlib.sha256(b"mask bytes").hexdigest()
    got = meta.select(["mode", "strength", "init_image_sha256", "mask_image_sha256", "loras", "embeddings", "label"])
    assert got.to_pylist() == [
        {"mode": "txt2img", "strength": None, "init_image_sha256": None, "mask_image_sha256": None,
         "loras": [{"name": "cat", "scale": 0.5, "sha256": "c" * 64}], "embeddings": [{"token": "<owl>", "sha256": "e" * 64}],
         "label": 1},
        {"mode": "img2img", "strength": 0.4, "init_image_sha256": init_sha, "mask_image_sha256": None, "loras": [],
         "embeddings": [], "label": 2},
        {"mode": "inpaint", "strength": 0.8, "init_image_sha256": init_sha, "mask_image_sha256": mask_sha,
         "loras": [{"name": "cat", "scale": 0.25, "sha256": "c" * 64}, {"name": "dog", "scale": 1.0, "sha256": "d" * 64}],
         "embeddings": [{"token": "<owl>", "sha256": "e" * 64}], "label": 3},
    ]
    params = sink.read_params((tmp_path / "out" / meta.column("image_path")[2].as_py()).read_bytes())
    assert {k: params[k] for k in ("mode", "strength", "init_image_sha256", "mask_image_sha256", "loras")} == {
        k: got.to_pylist()[2][k] for k in ("mode", "strength", "init_image_sha256", "mask_image_sha256", "loras")}


def test_older_jobs_are_files_or_parquet_by_their_embed_images(tmp_path, manifest):
    for embedded, format in ((False, "files"), (True, "parquet")):
        out = Output(str(tmp_path / format))
        out.prepare(job(manifest, format=format))
        path = tmp_path / format / "_sdbatch" / "job.json"
        old = json.loads(path.read_text())
        del old["identity"]["format"]  # as sdbatch wrote it before --format
        path.write_text(json.dumps({**old, "identity": {**old["identity"], "embed_images": embedded}}))
        assert sink.output_format_of(json.loads(path.read_text())) == format
        assert out.prepare(job(manifest, format=format)) == set()
        with pytest.raises(OutputError, match=f"format: {format} there, webdataset now"):
            out.prepare(job(manifest, format="webdataset"))


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.format)
def test_webdataset_layout_one_tar_per_shard_with_image_json_and_prompt(tmp_path, manifest, encoding):
    root = tmp_path / "out"
    out, spec = Output(str(root)), job(manifest, format="webdataset", image=encoding)
    out.prepare(spec)
    run_shards(out, manifest, spec, fail={"img2"})
    assert sorted(os.listdir(root / "shards")) == [f"shard-00000{i}.tar" for i in range(3)]
    assert not (root / "images").exists()
    meta = pq.read_table(root / "metadata" / "shard-000000.parquet")
    assert meta.column_names[-2:] == ["key", "tar"]
    rows = meta.to_pylist()
    # img2 failed: its key (position 3) is not used, the others keep theirs
    assert [(r["id"], r["key"], r["tar"]) for r in rows] == [
        ("img0", "shard-000000-000000", "shards/shard-000000.tar"), ("img1-0", "shard-000000-000001", "shards/shard-000000.tar"),
        ("img1-1", "shard-000000-000002", "shards/shard-000000.tar")]
    with tarfile.open(root / "shards" / "shard-000000.tar") as tar:
        infos = tar.getmembers()
    assert [m.name for m in infos] == sorted(m.name for m in infos)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in infos} == {(0, 0, 0, "", "", 0o644)}
    members = tar_members(root / "shards" / "shard-000000.tar")
    assert len(members) == 3 * len(rows)
    for r in rows:
        data = members[f"{r['key']}.{encoding.extension}"]
        assert r["image_path"] == f"{r['tar']}/{r['key']}.{encoding.extension}"
        assert hashlib.sha256(data).hexdigest() == r["image_sha256"] and sink.read_params(data)["prompt"] == r["prompt"]
        assert json.loads(members[f"{r['key']}.json"]) == {k: v for k, v in r.items() if k != "generation_seconds"}
        assert members[f"{r['key']}.txt"].decode() == r["prompt"]


def test_webdataset_tars_are_byte_identical_across_writers_and_redos(tmp_path, manifest):
    tars = []
    for name, kwargs in (("a", {"threads": 1, "max_pending": 1}), ("b", {"threads": 4, "max_pending": 16})):
        out, spec = Output(str(tmp_path / name)), job(manifest, format="webdataset")
        out.prepare(spec)
        run_shards(out, manifest, spec, writer_kwargs=kwargs)
        tars.append({p.name: p.read_bytes() for p in (tmp_path / name / "shards").iterdir()})
    assert tars[0] == tars[1] and len(tars[0]) == 3
    out = Output(str(tmp_path / "a"))
    (tmp_path / "a" / "metadata" / "shard-000001.parquet").unlink()
    run_shards(out, manifest, spec, only={"shard-000001"})
    assert (tmp_path / "a" / "shards" / "shard-000001.tar").read_bytes() == tars[0]["shard-000001.tar"]


def test_an_uncommitted_tar_is_never_counted_and_is_replaced_on_redo(tmp_path, manifest):
    root = tmp_path / "out"
    out, spec = Output(str(root)), job(manifest, format="webdataset")
    out.prepare(spec)
    run_shards(out, manifest, spec, only={"shard-000000"})
    committed = (root / "shards" / "shard-000000.tar").read_bytes()
    # a tar uploaded by an attempt that died before its metadata, and a temporary file a kill cut short
    (root / "shards" / "shard-000001.tar").write_bytes(committed[:1000])
    cut_short = root / "shards" / f".shard-000002.tar.tmp-{'a' * 32}"
    cut_short.write_bytes(b"half a tar")
    assert out.done_shards() == {"shard-000000"} and out.status().images_done == 4
    assert out.prepare(spec) == {"shard-000000"} and not cut_short.exists()
    run_shards(out, manifest, spec, only={"shard-000001"})
    meta = pq.read_table(root / "metadata" / "shard-000001.parquet").to_pylist()
    members = tar_members(root / "shards" / "shard-000001.tar")
    assert [hashlib.sha256(members[r["key"] + ".png"]).hexdigest() for r in meta] == [r["image_sha256"] for r in meta]
    assert len(members) == 3 * len(meta) == 9


def test_overwrite_never_deletes_a_folder_that_is_not_an_sdbatch_dataset(tmp_path, manifest):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for mode in ("auto", "overwrite"):
        with pytest.raises(OutputError, match="not empty and is not an sdbatch dataset"):
            Output(str(precious)).prepare(job(manifest), mode=mode)
    assert os.listdir(precious) == ["thesis.tex"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        Output(str(tmp_path / "afile")).prepare(job(manifest))
    with pytest.raises(OutputError, match="nothing to resume"):
        Output(str(tmp_path / "new")).prepare(job(manifest), mode="resume")
    # an existing empty folder is fine
    (tmp_path / "empty").mkdir()
    assert Output(str(tmp_path / "empty")).prepare(job(manifest)) == set()


def test_overwrite_keeps_files_sdbatch_did_not_write(tmp_path, manifest):
    out = Output(str(tmp_path / "out"))
    out.prepare(job(manifest))
    run_shards(out, manifest, job(manifest))
    (tmp_path / "out" / "README.md").write_text("my notes")
    out.prepare(job(manifest, dtype="bf16"), mode="overwrite")
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "_sdbatch"]


def test_status_of_something_that_is_not_a_dataset(tmp_path):
    with pytest.raises(OutputError, match="not an sdbatch dataset"):
        Output(str(tmp_path)).status()


class SlowStore(MemoryFileSystem):
    """Uploads take `delay` seconds; records how many images are in memory, waiting or uploading."""

    protocol = "slowmem"
    delay = 0.1

    def pipe_file(self, path, value, **kwargs):
        time.sleep(self.delay)
        return super().pipe_file(path, value, **kwargs)


def test_writer_applies_backpressure_with_a_slow_store():
    out = Output("memory://slow-out")
    out.fs = SlowStore()
    lock, live, peak = threading.Lock(), [0], [0]

    def done(_):
        with lock:
            live[0] -= 1

    image = np.zeros((8, 8, 3), np.uint8)
    submit_times = []
    with ImageWriter(out, threads=2, max_pending=3) as writer:
        start = time.monotonic()
        for i in range(12):
            future = writer.submit(f"images/s/{i}.png", image, {"i": i})
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            future.add_done_callback(done)
            submit_times.append(time.monotonic() - start)
    total = time.monotonic() - start
    assert peak[0] <= 3 + 1  # the bound, plus one whose slot is freed just before its callback ran
    assert submit_times[2] < SlowStore.delay  # the first ones queue without waiting: denoising goes on
    assert submit_times[-1] > 3 * SlowStore.delay  # later ones wait for uploads: no unbounded queue
    assert total >= 12 / 2 * SlowStore.delay * 0.9
    assert len(out.fs.find("/slow-out/images/s")) == 12


def test_commit_requires_an_outcome_for_every_image(tmp_path, manifest):
    out = Output(str(tmp_path / "out"))
    spec = job(manifest)
    out.prepare(spec)
    with open_manifest(manifest) as m, ImageWriter(out) as writer:
        rows = read_shard(m, next(shards(m.num_rows, spec.shard_size)), spec.defaults)
        w = ShardWriter(out, writer, rows, job=out.read_job(), model=MODEL, model_fingerprint=FINGERPRINT)
        for item in rows.items[:-1]:
            w.add(item, pixels(item.seed), scheduler_config=SCHED_CONFIG, seconds=0.1)
        with pytest.raises(ValueError, match=r"shard-000000: cannot commit; no outcome for \['img2'\]"):
            w.commit()
        w.fail(rows.items[-1], "boom", 1)
        w.add(rows.items[-1], pixels(rows.items[-1].seed), scheduler_config=SCHED_CONFIG, seconds=0.1)  # a retry succeeded
        assert (w.commit().images, out.done_shards()) == (4, {"shard-000000"})


def test_a_resumed_run_removes_the_temporary_files_of_killed_writes(tmp_path, manifest):
    root = tmp_path / "out"
    out, spec = Output(str(root)), job(manifest)
    out.prepare(spec)
    run_shards(out, manifest, spec, only={"shard-000000"})
    cut_short = [root / "metadata" / f".shard-000001.parquet.tmp-{'a' * 32}",
                 root / "images" / "shard-000001" / f".img3.png.tmp-{'b' * 32}",
                 root / "images" / "shard-000000" / f".img0.png.tmp-{'c' * 32}"]
    for path in cut_short:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a PNG")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p not in cut_short}
    assert out.prepare(spec) == {"shard-000000"}
    assert not any(p.exists() for p in cut_short)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # nothing else touched


def test_damaged_metadata_is_named_moved_aside_and_its_shard_redone(tmp_path, manifest):
    from typer.testing import CliRunner

    from jobs.cli import app

    root = tmp_path / "out"
    out, spec = Output(str(root)), job(manifest)
    out.prepare(spec)
    run_shards(out, manifest, spec, fail={"img4"})
    assert out.finish({"images": 7})
    empty, garbage = root / "metadata" / "shard-000000.parquet", root / "failures" / "shard-000001.parquet"
    empty.write_bytes(b"")
    garbage.write_bytes(b"PAR1 this is not parquet PAR1")

    status = CliRunner().invoke(app, ["status", str(root)])
    assert status.exit_code == 0 and status.exception is None, status.output
    assert "metadata/shard-000000.parquet: not a readable Parquet file (0 bytes" in status.output
    assert "failures/shard-000001.parquet: not a readable Parquet file (29 bytes" in status.output
    assert "shards    1/3 done" in status.output and "_SUCCESS  stale: 2 shard(s) missing" in status.output

    # The next run: both shards' files moved aside, byte for byte; _SUCCESS gone; the two shards to redo.
    assert out.prepare(spec) == {"shard-000002"}
    assert not (root / "_SUCCESS").exists() and not empty.exists() and not garbage.exists()
    aside = {p.relative_to(root).parts[3:]: p.read_bytes() for p in (root / "_sdbatch" / "damaged").rglob("*.parquet")}
    assert aside[("metadata", "shard-000000.parquet")] == b""
    assert aside[("failures", "shard-000001.parquet")] == b"PAR1 this is not parquet PAR1"
    assert ("metadata", "shard-000001.parquet") in aside
    run_shards(out, manifest, spec, only={"shard-000000", "shard-000001"}, fail={"img4"})
    assert out.finish({"images": 7})
    status = out.status()
    assert (status.shards_done, status.images_done, status.failures, status.damaged) == (3, 7, 1, {})


def test_lost_job_file_is_rebuilt_from_the_metadata(tmp_path, manifest):
    root = tmp_path / "out"
    out, spec = Output(str(root)), job(manifest)
    out.prepare(spec)
    run_shards(out, manifest, spec, only={"shard-000001"})
    original = json.loads((root / "_sdbatch" / "job.json").read_text())
    (root / "_sdbatch" / "job.json").unlink()

    status = out.status()
    assert status.job == original and "job.json  missing; read from metadata/shard-000001.parquet" in status.format()
    with pytest.raises(OutputError, match="holds a different job"):
        out.prepare(job(manifest, shard_size=4))
    assert out.prepare(spec, mode="resume") == {"shard-000001"}
    assert json.loads((root / "_sdbatch" / "job.json").read_text()) == original

    # Metadata from before the job was recorded in it: the message says how to recover.
    (root / "_sdbatch" / "job.json").unlink()
    table = pq.read_table(root / "metadata" / "shard-000001.parquet")
    pq.write_table(table.replace_schema_metadata({}), root / "metadata" / "shard-000001.parquet")
    with pytest.raises(OutputError, match=f"no metadata file records the job .*; restore _sdbatch/job.json from a "
                                          f"copy, or start anew: rm -r {root}"):
        out.prepare(spec)


def test_overwrite_refuses_when_foreign_files_sit_in_the_dataset_folders(tmp_path, manifest):
    root = tmp_path / "out"
    out = Output(str(root))
    out.prepare(job(manifest))
    run_shards(out, manifest, job(manifest))
    (root / "images" / "shard-000001" / "my-edit.psd").write_bytes(b"hours of retouching")
    (root / "metadata" / "notes.txt").write_text("which prompts worked")
    (root / "images" / "shard-000000" / ".img0.png.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"partial")
    before = sorted(p for p in root.rglob("*") if p.is_file())
    with pytest.raises(OutputError, match=r"--overwrite would delete files sdbatch did not write "
                                          r"\(metadata/notes.txt, images/shard-000001/my-edit.psd\)"):
        out.check(job(manifest, dtype="bf16"), mode="overwrite")
    with pytest.raises(OutputError, match="sdbatch did not write"):
        out.prepare(job(manifest, dtype="bf16"), mode="overwrite")
    assert sorted(p for p in root.rglob("*") if p.is_file()) == before

    (root / "images" / "shard-000001" / "my-edit.psd").unlink()
    (root / "metadata" / "notes.txt").unlink()
    (root / "_sdbatch" / "damaged").mkdir()
    (root / "_sdbatch" / "damaged" / "kept.parquet").write_bytes(b"moved aside earlier")
    assert out.prepare(job(manifest, dtype="bf16"), mode="overwrite") == set()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "_sdbatch/damaged/kept.parquet", "_sdbatch/job.json"]


def test_image_shards_record_their_bounds_and_status_counts_rows_whose_images_are_all_done(tmp_path, manifest):
    out = Output(str(tmp_path / "out"))
    spec = job(manifest, shard_size=2)  # 8 images: img1's two images go to shards 0 and 1
    out.prepare(spec)
    with open_manifest(manifest) as m, ImageWriter(out) as writer:
        cut = list(manifest_shards(m, 2))
        assert [(s.start, s.start_k, s.stop, s.stop_k) for s in cut] == [(0, 0, 1, 1), (1, 1, 3, 0), (3, 0, 5, 0), (5, 0, 7, 0)]
        for shard in (cut[1], cut[2]):
            rows = read_shard(m, shard, spec.defaults)
            w = ShardWriter(out, writer, rows, job=out.read_job(), model=MODEL, model_fingerprint=FINGERPRINT)
            for item in rows.items:
                w.add(item, pixels(item.seed), scheduler_config=SCHED_CONFIG, seconds=0.5)
            w.commit()
    assert json.loads(pq.read_schema(tmp_path / "out" / "metadata" / "shard-000001.parquet").metadata[sink.SHARD_KEY]) == [1, 1, 3, 0]
    status = out.status()
    # img1 began in shard 0, which is not done: only img2, img3, img4
    assert (status.shards, status.shards_done, status.rows_done, status.images_done) == (4, 2, 3, 4)
    assert sink.rows_done({0: (0, 0, 1, 1), 1: (1, 1, 1, 3), 2: (1, 3, 3, 0)}) == 3
    assert sink.rows_done({0: (0, 0, 1, 1), 2: (1, 3, 3, 0)}) == 2 and sink.rows_done({2: (1, 3, 3, 0)}) == 1


def test_a_dataset_of_row_shards_continues_only_where_rows_and_images_agree(tmp_path, manifest):
    out = Output(str(tmp_path / "out"))
    out.prepare(job(manifest))
    path = tmp_path / "out" / "_sdbatch" / "job.json"
    old = json.loads(path.read_text())
    del old["identity"]["sharding"]  # as sdbatch wrote it before shards were cut by images
    path.write_text(json.dumps(old))
    with pytest.raises(OutputError, match="sharding: rows there, images now — an older sdbatch cut its shards by rows.*"
                                          "use --overwrite to replace it"):
        out.prepare(job(manifest))
    assert sink.total_shards(old) == 3  # 7 rows in shards of 3, as it was made
    old["images"] = old["rows"]  # every row one image: the same shards either way
    path.write_text(json.dumps(old))
    assert out.prepare(job(manifest, images=7)) == set()


@pytest.mark.parametrize("format", sink.FORMATS)
def test_a_split_shard_is_committed_once_from_the_outcomes_of_its_pieces(tmp_path, manifest, format):
    out = Output(str(tmp_path / "out"))
    spec = job(manifest, format=format)
    out.prepare(spec)
    with open_manifest(manifest) as m, ImageWriter(out) as writer:
        shard = next(manifest_shards(m, 3))  # img0, img1-0, img1-1
        records = {}
        for piece in shard.pieces():  # what each piece's actor hands back
            rows = read_shard(m, piece, spec.defaults)
            w = ShardWriter(out, writer, rows, job=out.read_job(), model=MODEL, model_fingerprint=FINGERPRINT)
            for item in rows.items:
                w.add(item, pixels(item.seed), scheduler_config=SCHED_CONFIG, seconds=0.5)
            records |= {r["id"]: r for r in w.collect()}
        assert not (tmp_path / "out" / "metadata").exists()  # pieces commit nothing
        whole = read_shard(m, shard, spec.defaults)
        w = ShardWriter(out, writer, whole, job=out.read_job(), model=MODEL, model_fingerprint=FINGERPRINT)
        for item in whole.items:
            if item.id == "img1-1":  # its piece timed out
                w.fail(item, "ran past --shard-timeout", attempts=3)
            else:
                w.adopt(item, records[item.id])
        assert (w.commit().images, out.done_shards()) == (2, {"shard-000000"})
    meta = pq.read_table(tmp_path / "out" / "metadata" / "shard-000000.parquet").to_pylist()
    assert [r["id"] for r in meta] == ["img0", "img1-0"]
    members = tar_members(tmp_path / "out" / "shards" / "shard-000000.tar") if format == "webdataset" else {}
    for r in meta:
        data = members[r["key"] + ".png"] if members else (tmp_path / "out" / r["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["image_sha256"] and (format != "parquet" or r["image"]["bytes"] == data)
    assert len(members) == (6 if format == "webdataset" else 0)
    assert not (tmp_path / "out" / "images" / "shard-000000" / "img1-1.png").exists()  # written by its piece, failed
    assert pq.read_table(tmp_path / "out" / "failures" / "shard-000000.parquet").column("id").to_pylist() == ["img1-1"]
