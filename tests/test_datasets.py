"""A finished `sdbatch run` dataset loads unchanged with the tools people train with: pyarrow,
pandas, Ray Data and Hugging Face `datasets` — the recipes the README gives; `--embed-images` (of WebP);
`--format webdataset` (of JPEG) with the README's own snippet: webdataset, Ray Data, `datasets`, pandas;
`sdbatch status` with per-shard timing and failures."""
import hashlib
import io
import json
import logging
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

SDBATCH = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "sdbatch")
IDS = ["cat", "dog-0", "dog-1", "owl", "fox"]  # "nan" fails: guidance 1e30 overflows to NaN
LABELS = {"cat": "cat", "dog-0": "dog", "dog-1": "dog", "owl": "owl", "fox": "fox"}


def sdbatch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([SDBATCH, *map(str, args)], capture_output=True, text=True, timeout=180)


def make_dataset(tmp: Path, *options: str) -> Path:
    manifest = tmp / "manifest.parquet"
    pq.write_table(pa.table({
        "id": ["cat", "dog", "owl", "fox", "nan"],
        "prompt": ["a cat", "a dog", "an owl", "a fox", "overflows"],
        "num_images": [1, 2, 1, 1, 1],
        "guidance_scale": [None, None, None, None, 1e30],
        "label": ["cat", "dog", "owl", "fox", "nan"],
    }), manifest)
    out = tmp / "out"
    r = sdbatch("run", manifest, "--model", "builtin:tiny", "--output", out, "--actors", 1,
                "--width", 64, "--height", 64, "--steps", 2, "--shard-size", 3, *options)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("embedded"), "--embed-images", "--image-format", "webp")


@pytest.fixture(scope="module")
def webdataset_out(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("webdataset"), "--format", "webdataset", "--image-format", "jpeg")


def readme_snippet(marker: str) -> str:
    """The README's Python code block that holds `marker`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if marker in b]
    return block


def check_rows(ids, labels, paths, extension="png") -> None:
    assert sorted(ids) == sorted(IDS)
    assert {i: l for i, l in zip(ids, labels)} == LABELS
    first = ("cat", "dog-0", "dog-1")  # shards of 3 images: cat, dog-0, dog-1 | owl, fox, nan
    assert all(p == f"images/shard-{'000000' if i in first else '000001'}/{i}.{extension}" for i, p in zip(ids, paths))


def test_pyarrow_dataset(out):
    table = pads.dataset(out / "metadata", format="parquet").to_table()
    check_rows(table["id"].to_pylist(), table["label"].to_pylist(), table["image_path"].to_pylist())
    assert table.schema.field("seed").type == pa.int64() and table.schema.field("label").type == pa.string()


def test_pandas(out):
    import pandas as pd

    df = pd.read_parquet(out / "metadata")
    check_rows(list(df["id"]), list(df["label"]), list(df["image_path"]))
    with Image.open(out / df.loc[df["id"] == "cat", "image_path"].item()) as im:
        assert im.size == (64, 64)
    failures = pd.read_parquet(out / "failures")
    assert list(failures["id"]) == ["nan"] and "NaN" in failures["error"].item()


def test_ray_data(out):
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = ray.data.read_parquet(str(out / "metadata")).take_all()
        check_rows([r["id"] for r in rows], [r["label"] for r in rows], [r["image_path"] for r in rows])
        images = ray.data.read_images(str(out / "images"), include_paths=True).take_all()
        assert sorted(Path(r["path"]).stem for r in images) == sorted(IDS)
        assert all(r["image"].shape == (64, 64, 3) for r in images)
    finally:
        ray.shutdown()


def test_huggingface_datasets(out, tmp_path):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / "metadata" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    check_rows(ds["id"], ds["label"], ds["image_path"])
    # The image-folder view: resolve image_path against OUT and cast it to the Image feature.
    ds = ds.map(lambda row: {"image": str(out / row["image_path"])}).cast_column("image", datasets.Image())
    image = ds[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    with Image.open(out / ds[0]["image_path"]) as im:
        assert image.tobytes() == im.convert("RGB").tobytes()


def test_embedded_images_load_as_images_in_huggingface_datasets(embedded, tmp_path):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(embedded / "metadata" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    check_rows(ds["id"], ds["label"], ds["image_path"], "webp")
    for row in ds:
        webp = (embedded / row["image_path"]).read_bytes()  # the image files are written as well
        assert hashlib.sha256(webp).hexdigest() == row["image_sha256"]
        with Image.open(io.BytesIO(webp)) as im:
            assert isinstance(row["image"], Image.Image) and row["image"].format == im.format == "WEBP"
            assert row["image"].tobytes() == im.tobytes()


def test_embedded_images_are_plain_structs_elsewhere(embedded):
    table = pads.dataset(embedded / "metadata", format="parquet").to_table()
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for row in table.select(["image", "image_path", "image_sha256"]).to_pylist():
        assert row["image"]["path"] == row["image_path"]
        assert hashlib.sha256(row["image"]["bytes"]).hexdigest() == row["image_sha256"]
    # a job with embedded WebP images is a different job: it does not resume into a plain PNG dataset
    r = sdbatch("run", embedded.parent / "manifest.parquet", "--model", "builtin:tiny", "--output", embedded,
                "--width", 64, "--height", 64, "--steps", 2, "--shard-size", 3, "--resume")
    assert r.returncode == 2 and "format: parquet there, files now" in r.stderr, r.stderr
    assert "image_format: webp there, png now" in r.stderr


def test_status_shows_shard_timing_and_failures(out):
    r = sdbatch("status", out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "  failures  1" in lines and "  _SUCCESS  yes" in lines
    timing = {l.split()[0]: l.split()[1:] for l in lines if l.startswith("  shard-") or l.startswith("  all ")}
    assert sorted(timing) == ["all", "shard-000000", "shard-000001"]
    assert [int(timing[s][0]) for s in ("shard-000000", "shard-000001", "all")] == [3, 2, 5]  # "nan" failed
    assert all(float(t[1]) > 0 and float(t[2]) > 0 for t in timing.values())
    (failure,) = [l for l in lines if l.startswith("  nan ")]
    assert failure.split()[1] == "1" and "NonFiniteOutputError" in failure

    r = sdbatch("status", out, "--limit", 1)
    assert "... 1 more shards" in r.stdout and "shard-000001" not in r.stdout


def test_status_json_has_the_facts_of_the_text(out):
    text = sdbatch("status", out).stdout.splitlines()
    r = sdbatch("status", out, "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert (facts["shards_done"], facts["shards_total"], facts["images_done"], facts["failures"]) == (2, 2, 5, 1)
    assert facts["finished"] is True and facts["running"] is None and facts["eta_seconds"] is None
    timing = {l.split()[0]: l.split()[1:] for l in text if l.startswith("  shard-") or l.startswith("  all ")}
    for t in [*facts["shard_timing"], facts["timing_total"]]:
        assert timing[t["shard"]] == [str(t["images"]), f"{t['seconds']:.1f}", f"{t['images_per_second']:.2f}"]
    (failure,) = facts["first_failures"]
    assert failure["id"] == "nan" and failure["attempts"] == 1 and "NonFiniteOutputError" in failure["error"]


def test_readme_webdataset_snippet_loads_every_image_in_each_library(webdataset_out, tmp_path, monkeypatch):
    import datasets
    import ray
    import webdataset as wds

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").symlink_to(webdataset_out)  # the README's paths
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        snippet = {}
        exec(readme_snippet("import webdataset"), snippet)
        meta = snippet["meta"]
        assert sorted(meta["id"]) == sorted(IDS) and dict(zip(meta["id"], meta["label"])) == LABELS
        assert list(meta["image_path"]) == [f"{t}/{k}.jpg" for t, k in zip(meta["tar"], meta["key"])]
        sha256 = dict(zip(meta["key"], meta["image_sha256"]))
        ids = dict(zip(meta["key"], meta["id"]))
        assert set(meta["tar"]) == {"shards/shard-000000.tar", "shards/shard-000001.tar"}

        decoded = list(snippet["samples"])
        assert sorted(s["__key__"] for s in decoded) == sorted(sha256)
        for s in decoded:
            assert s["jpg"].size == (64, 64) and s["json"]["id"] == ids[s["__key__"]] and s["txt"] == s["json"]["prompt"]
            assert s["json"]["image_sha256"] == sha256[s["__key__"]]
        raw = {s["__key__"]: hashlib.sha256(s["jpg"]).hexdigest() for s in wds.WebDataset(snippet["shards"], shardshuffle=False)}
        assert raw == sha256

        rows = snippet["rays"].take_all()
        assert sorted(r["__key__"] for r in rows) == sorted(sha256)
        assert all(r["jpg"].shape == (64, 64, 3) and r["json"]["id"] == ids[r["__key__"]] for r in rows)
        rows = ray.data.read_webdataset(str(webdataset_out / "shards"), decoder=None).take_all()
        assert {r["__key__"]: hashlib.sha256(r["jpg"]).hexdigest() for r in rows} == sha256
        assert sorted(r["id"] for r in ray.data.read_parquet(str(webdataset_out / "metadata")).take_all()) == sorted(IDS)

        hf = snippet["hf"]
        assert isinstance(hf.features["jpg"], datasets.Image) and len(hf) == len(sha256)
        assert all(isinstance(image, Image.Image) and image.size == (64, 64) for image in hf["jpg"])
        files = hf.cast_column("jpg", datasets.Image(decode=False))
        assert {r["__key__"]: hashlib.sha256(r["jpg"]["bytes"]).hexdigest() for r in files} == sha256
    finally:
        ray.shutdown()
