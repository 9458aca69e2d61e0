"""`sdbatch verify`: a finished dataset is intact; each kind of damage is found and named by shard
and id; `--repair` and `sdbatch run --resume` make the same bytes again; refused on bad input and
while a driver holds the output."""
import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from typer.testing import CliRunner

from jobs import driver
from jobs.cli import app
from jobs.lease import Lease
from jobs.sink import Output
from tests.jobdata import DEFAULTS, MODEL, TIMING, start_local_ray, write_manifest

# 10 images in shards of 3 (the last one short): the row `dog` spans shards 0 and 1, `nan` (guidance overflows) fails.
IDS = ["cat", "dog", "owl", "fox", "nan", "emu", "yak", "ant"]


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray()
    yield
    ray.shutdown()


def run_job(manifest: Path, out: Path, **options) -> None:
    opts = driver.RunOptions(manifest=str(manifest), model=MODEL, output=str(out), defaults=DEFAULTS, device="cpu",
                             actors=1, shard_size=3, **options)
    driver.run(opts, stream=io.StringIO())


@pytest.fixture(scope="module")
def made(tmp_path_factory, local_ray) -> tuple[Path, Path]:
    """(manifest, a finished dataset) to copy: tests damage their own copy."""
    root = tmp_path_factory.mktemp("verify")
    manifest = write_manifest(root / "manifest.parquet", id=IDS, prompt=[f"a {i}" for i in IDS],
                              num_images=[1, 3, 1, 1, 1, 1, 1, 1],
                              guidance_scale=[None, None, None, None, 1e30, None, None, None])
    run_job(manifest, root / "out")
    return manifest, root / "out"


@pytest.fixture
def dataset(made, tmp_path) -> Path:
    return Path(shutil.copytree(made[1], tmp_path / "out"))


def verify(*args) -> tuple[int, str]:
    r = CliRunner().invoke(app, ["verify", *map(str, args)])
    return r.exit_code, r.output


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "_sdbatch" not in p.parts}


def metadata_rows(folder: Path) -> list[dict]:
    rows = []
    for f in sorted((folder / "metadata").glob("*.parquet")):
        rows += pq.read_table(f).drop_columns(list(TIMING)).to_pylist()
    return rows


def rewrite(path: Path, change) -> None:
    """Rewrite a Parquet file with `change(table)`, keeping its schema metadata (job, bounds)."""
    table = pq.read_table(path)
    pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), path)


def test_finished_dataset_is_intact(dataset):
    for quick in ([], ["--quick"]):
        code, output = verify(dataset, *quick)
        assert code == 0, output
        assert output.rstrip().endswith("intact") and "4/4 shards committed; 9 images checked" in output
        assert "1 failures" in output
    code, output = verify(dataset, "--json")
    report = json.loads(output)
    assert code == 0 and report["intact"] and report["images"] == 9 and report["failures"] == 1
    assert report["problems"] == [] and report["shards"] == report["shards_committed"] == 4


def delete(p: Path) -> None:
    p.unlink()


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


def alter(p: Path) -> None:  # same size, one byte different
    data = bytearray(p.read_bytes())
    data[-20] ^= 0xFF
    p.write_bytes(bytes(data))


def duplicate_first_row(p: Path) -> None:
    rewrite(p, lambda t: pa.concat_tables([t, t.slice(0, 1)]))


def add_neighbours_last_row(p: Path) -> None:  # shard-000000's dog-1, from the row both shards cut
    last = pq.read_table(p.with_name("shard-000000.parquet")).slice(2, 1)
    rewrite(p, lambda t: pa.concat_tables([t, last.cast(t.schema)]))


@pytest.mark.parametrize("damage, path, found, quick_finds", [
    (delete, "images/shard-000001/dog-2.png", "shard-000001 id dog-2: image images/shard-000001/dog-2.png is missing", True),
    (truncate, "images/shard-000000/dog-0.png", "shard-000000 id dog-0: image images/shard-000000/dog-0.png does not "
                                                "match its sha256", False),
    (alter, "images/shard-000002/emu.png", "shard-000002 id emu: image images/shard-000002/emu.png does not match", False),
    (delete, "metadata/shard-000002.parquet", "shard-000002: not committed", True),
    (truncate, "metadata/shard-000003.parquet", "shard-000003: metadata/shard-000003.parquet: not a readable Parquet", True),
    (truncate, "failures/shard-000002.parquet", "shard-000002: failures/shard-000002.parquet: not a readable Parquet", True),
    (delete, "_sdbatch/job.json", "_sdbatch/job.json is missing (rebuilt from metadata/shard-000000.parquet)", True),
    (delete, "_SUCCESS", "_SUCCESS is missing though every shard is committed", True),
    (duplicate_first_row, "metadata/shard-000000.parquet", "shard-000000 id cat: id recorded twice", True),
    (add_neighbours_last_row, "metadata/shard-000001.parquet", "shard-000001 id dog-1: id also recorded in shard-000000",
     True),
])
def test_verify_names_the_damage(dataset, damage, path, found, quick_finds):
    damage(dataset / path)
    code, output = verify(dataset)
    assert code == 1 and found in output, output
    code, output = verify(dataset, "--quick")
    assert (code, found in output) == ((1, True) if quick_finds else (0, False)), output


def test_verify_finds_orphans_and_a_stale_success(dataset):
    (dataset / "images" / "shard-000001" / "stray.png").write_bytes(b"not ours")
    (dataset / "images" / "notes.txt").write_text("mine")
    (dataset / "metadata" / "shard-000003.parquet").unlink()
    # A write in flight (or cut short by a kill) is no orphan.
    (dataset / "images" / "shard-000000" / ".cat.png.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"half")
    code, output = verify(dataset)
    assert code == 1, output
    for line in ("shard-000001: orphan object images/shard-000001/stray.png", "orphan object images/notes.txt",
                 "shard-000003: not committed", "_SUCCESS is there, but 1 shard(s) are not committed",
                 "1 temporary file(s)"):
        assert line in output


def test_repair_then_resume_makes_the_same_bytes(made, dataset):
    manifest, original = made
    before, rows_before = files(original), metadata_rows(original)
    delete(dataset / "images/shard-000000/cat.png")
    alter(dataset / "images/shard-000001/fox.png")
    truncate(dataset / "metadata/shard-000002.parquet")
    delete(dataset / "metadata/shard-000003.parquet")
    delete(dataset / "_sdbatch/job.json")
    (dataset / "images/shard-000001/stray.png").write_bytes(b"not ours")

    code, output = verify(dataset, "--repair")
    assert code == 1 and "withdrew 3 shard(s) (shard-000000, shard-000001, shard-000002)" in output, output
    assert "moved 1 orphan object(s)" in output and "removed _SUCCESS" in output and "wrote _sdbatch/job.json back" in output
    aside = next((dataset / "_sdbatch" / "damaged").iterdir())
    assert sorted(str(p.relative_to(aside)) for p in aside.rglob("*.p*")) == [
        "failures/shard-000002.parquet", "images/shard-000001/stray.png", *(f"metadata/shard-00000{i}.parquet" for i in range(3))]
    code, output = verify(dataset)
    assert code == 1 and "repair" not in output.splitlines()[-1], output  # only a run is left to do

    run_job(manifest, dataset, mode="resume")
    code, output = verify(dataset)
    assert code == 0, output
    assert files(dataset).keys() == before.keys()
    assert {k: v for k, v in files(dataset).items() if k.startswith("images/")} == \
        {k: v for k, v in before.items() if k.startswith("images/")}
    assert metadata_rows(dataset) == rows_before


def test_embedded_images_are_checked(made, tmp_path):
    out = tmp_path / "embedded"
    run_job(made[0], out, format="parquet")
    assert verify(out)[0] == 0
    path = out / "metadata" / "shard-000001.parquet"
    rewrite(path, lambda t: t.set_column(t.schema.get_field_index("image"), "image", pa.array(
        [{"bytes": b"x" if i == 0 else r["bytes"], "path": r["path"]} for i, r in enumerate(t.column("image").to_pylist())],
        t.schema.field("image").type)))
    code, output = verify(out)
    assert code == 1 and "shard-000001 id dog-2: embedded image does not match its path and sha256" in output, output


def test_repair_refused_while_a_run_holds_the_output(dataset):
    lease = Lease(Output(str(dataset)))
    lease.acquire()
    try:
        (dataset / "_SUCCESS").unlink()
        code, output = verify(dataset, "--repair")
        assert code == 2 and "in use by another sdbatch run" in output, output
        code, output = verify(dataset)
        assert code == 1 and "running   run " in output, output
    finally:
        lease.release()


def test_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        code, output = verify(folder)
        assert code == 2 and "not an sdbatch dataset" in output, output
        assert not (folder / "_sdbatch").exists()
    assert verify(tmp_path / "empty", "--repair")[0] == 2 and not (tmp_path / "empty" / "_sdbatch").exists()


def s3_options(s3_server) -> list[str]:
    return [f"--storage-option={k}={json.dumps(v) if not isinstance(v, str) else v}"
            for k, v in s3_server.storage_options.items()]


def test_verify_on_s3(dataset, s3_server):
    fs = s3_server.filesystem()
    bucket = s3_server.make_bucket("verify")
    fs.put(str(dataset), f"{bucket}/out", recursive=True)
    url, options = f"s3://{bucket}/out", s3_options(s3_server)
    code, output = verify(url, *options)
    assert code == 0, output
    fs.rm(f"{bucket}/out/images/shard-000002/yak.png")
    fs.pipe(f"{bucket}/out/images/shard-000002/extra.png", b"not ours")
    code, output = verify(url, *options, "--repair")
    assert code == 1 and "shard-000002 id yak: image images/shard-000002/yak.png is missing" in output, output
    assert "orphan object images/shard-000002/extra.png" in output and "withdrew 1 shard(s) (shard-000002)" in output
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/metadata/shard-000002.parquet")
    assert not fs.exists(f"{bucket}/out/_SUCCESS")
    aside = sorted(p.split("/damaged/")[1].split("/", 1)[1] for p in fs.find(f"{bucket}/out/_sdbatch/damaged"))
    assert aside == ["failures/shard-000002.parquet", "images/shard-000002/extra.png", "metadata/shard-000002.parquet"]


def test_webdataset_damage_inside_tars_is_found_and_repaired_byte_identical(made, tmp_path):
    manifest, original = made[0], tmp_path / "made"
    run_job(manifest, original, format="webdataset")
    dataset = Path(shutil.copytree(original, tmp_path / "out"))
    code, output = verify(dataset)
    assert code == 0 and "4/4 shards committed; 9 images checked" in output, output
    tar = dataset / "shards" / "shard-000001.tar"
    with tarfile.open(tar) as t:  # dog-2, the first image of shard 1
        offset = t.getmember("shard-000001-000000.png").offset_data
    data = bytearray(tar.read_bytes())
    data[offset + 100] ^= 0xFF
    tar.write_bytes(bytes(data))
    tar = dataset / "shards" / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[:len(tar.read_bytes()) // 2])
    duplicate_first_row(dataset / "metadata" / "shard-000003.parquet")
    (dataset / "shards" / "shard-000009.tar").write_bytes(b"not ours")

    code, output = verify(dataset, "--repair")
    assert code == 1, output
    for line in ("shard-000001 id dog-2: image shards/shard-000001.tar/shard-000001-000000.png does not match its sha256",
                 "shard-000002: shards/shard-000002.tar: not a readable tar",
                 "shard-000003 id ant: key shard-000003-000000 recorded twice", "orphan object shards/shard-000009.tar",
                 "withdrew 3 shard(s) (shard-000001, shard-000002, shard-000003)", "moved 1 orphan object(s)"):
        assert line in output, output
    run_job(manifest, dataset, mode="resume", format="webdataset")
    code, output = verify(dataset)
    assert code == 0, output
    assert files(dataset).keys() == files(original).keys() and metadata_rows(dataset) == metadata_rows(original)
    tars = {k: v for k, v in files(original).items() if k.startswith("shards/")}
    assert len(tars) == 4 and {k: v for k, v in files(dataset).items() if k.startswith("shards/")} == tars


def test_verify_reads_webdataset_tars_on_s3(made, tmp_path, s3_server):
    out = tmp_path / "wds"
    run_job(made[0], out, format="webdataset")
    fs, bucket = s3_server.filesystem(), s3_server.make_bucket("verify-wds")
    fs.put(str(out), f"{bucket}/out", recursive=True)
    url, options = f"s3://{bucket}/out", s3_options(s3_server)
    code, output = verify(url, *options)
    assert code == 0 and "9 images checked (sha256)" in output, output
    tar = bytearray(fs.cat(f"{bucket}/out/shards/shard-000003.tar"))
    with tarfile.open(fileobj=io.BytesIO(bytes(tar))) as t:
        tar[t.getmember("shard-000003-000000.png").offset_data + 50] ^= 0xFF  # ant's image
    fs.pipe(f"{bucket}/out/shards/shard-000003.tar", bytes(tar))
    code, output = verify(url, *options)
    assert code == 1 and "shard-000003 id ant: image shards/shard-000003.tar/shard-000003-000000.png does not match" \
        in output, output
