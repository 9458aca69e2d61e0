"""`sdbatch run` against a real S3 server (SeaweedFS, tests/s3server.py), through the CLI in a
subprocess: manifest read from the bucket, dataset written to it, resume on it, wrong credentials
stopped before any work, and the server stopped mid-job (bounded retries, nothing half-committed,
a re-run after the restart completes every row exactly once)."""
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.jobdata import MODEL, check_images, read_dataset

SDBATCH = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "sdbatch")
TINY = ["--model", MODEL, "--width", "64", "--height", "64", "--steps", "2", "--scheduler", "ddim"]
RETRY_SECONDS = "3"  # SDBATCH_STORAGE_RETRY_SECONDS: the storage-fault test must not wait 120 s


def base_env() -> dict[str, str]:
    """This process's environment without any AWS configuration of the machine running the tests."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"SDBATCH_STORAGE_RETRY_SECONDS": RETRY_SECONDS}


def sdbatch(*args, env: dict, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([SDBATCH, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def put_manifest(fs, url: str, **columns) -> str:
    with fs.open(url, "wb") as f:
        pq.write_table(pa.table(columns), f)
    return f"s3://{url}"


def download(fs, prefix: str, local: Path) -> Path:
    """The dataset under `prefix` as a local folder, so the local dataset checks apply to every object."""
    fs.invalidate_cache()
    fs.get(prefix.rstrip("/") + "/", str(local), recursive=True)
    return local


def objects(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p.removeprefix(prefix + "/") for p in fs.find(prefix))


def check_dataset(fs, prefix: str, local: Path, ids: list[str]) -> dict[str, dict]:
    """Every object of the dataset: one metadata row per id, its image (a file, or a webdataset tar's
    member) decoding with the row's hash and parameters, no stray object, and `_SUCCESS` with the counts."""
    out = download(fs, prefix, local)
    meta, failures = read_dataset(out)  # asserts that no id appears twice
    assert sorted(meta) == sorted(ids) and not failures
    check_images(out, meta)
    stored = {r.get("tar") or r["image_path"] for r in meta.values()}
    listed = objects(fs, prefix)
    assert {p for p in listed if p.startswith(("images/", "shards/"))} == stored
    assert {p for p in listed if not p.startswith(("images/", "shards/"))} == {
        "_SUCCESS", "_sdbatch/job.json", *(p for p in listed if p.startswith("metadata/shard-"))}
    success = json.loads((out / "_SUCCESS").read_text())
    assert (success["images"], success["failures"], success["rows"]) == (len(ids), 0, len(ids))
    return meta


@pytest.fixture
def bucket(s3_server):
    return s3_server.make_bucket(f"jobs-{uuid.uuid4().hex[:8]}")


def test_manifest_and_dataset_on_s3_and_resume(s3_server, bucket, tmp_path):
    fs = s3_server.filesystem()
    ids = [f"r{i}" for i in range(10)]
    manifest = put_manifest(fs, f"{bucket}/in/manifest.parquet", id=ids, prompt=[f"prompt {i}" for i in ids],
                            label=[i.upper() for i in ids])
    env = base_env() | s3_server.env
    out = f"s3://{bucket}/out"
    r = sdbatch("run", manifest, "--output", out, "--shard-size", 3, "--batch-size", 2, "--actors", 1, *TINY, env=env)
    assert r.returncode == 0, r.stderr
    assert f"done: 10 images, 0 failed in {out}" in r.stdout
    meta = check_dataset(fs, f"{bucket}/out", tmp_path / "first", ids)
    assert {m["label"] for m in meta.values()} == {i.upper() for i in ids}
    job = fs.cat_file(f"{bucket}/out/_sdbatch/job.json").decode()
    assert json.loads(job)["manifest"] == manifest
    for text in (r.stdout, r.stderr, job):
        assert s3_server.secret not in text and s3_server.key not in text

    # Resume: two shards and _SUCCESS gone (as after a crash); the re-run redoes only those.
    kept = {p: fs.info(f"{bucket}/out/{p}")["ETag"] for p in ("metadata/shard-000000.parquet",
                                                              "metadata/shard-000002.parquet")}
    fs.rm([f"{bucket}/out/metadata/shard-000001.parquet", f"{bucket}/out/metadata/shard-000003.parquet",
           f"{bucket}/out/_SUCCESS"])
    r = sdbatch("run", manifest, "--output", out, "--shard-size", 3, "--batch-size", 2, *TINY, env=env)
    assert r.returncode == 0, r.stderr
    assert "resuming: 2 of 4 shards already done" in r.stderr and "(2 shards were already done)" in r.stdout
    assert "this run: 4 images" in r.stdout  # shards 1 (3 rows) and 3 (1 row)
    again = check_dataset(fs, f"{bucket}/out", tmp_path / "second", ids)
    fs.invalidate_cache()
    assert {p: fs.info(f"{bucket}/out/{p}")["ETag"] for p in kept} == kept
    assert {i: m["image_sha256"] for i, m in again.items()} == {i: m["image_sha256"] for i, m in meta.items()}


def test_storage_options_on_the_command_line(s3_server, bucket, tmp_path):
    """No AWS environment at all: key, secret and endpoint come from --storage-option, and never
    reach job.json, metadata or the output."""
    fs = s3_server.filesystem()
    manifest = put_manifest(fs, f"{bucket}/m.parquet", prompt=["a", "b", "c"])
    options = [f"key={s3_server.key}", f"secret={s3_server.secret}",
               "client_kwargs=" + json.dumps({"endpoint_url": s3_server.endpoint_url})]
    args = [a for o in options for a in ("--storage-option", o)]
    r = sdbatch("run", manifest, "--output", f"s3://{bucket}/out", "--actors", 1, *TINY, *args, env=base_env())
    assert r.returncode == 0, r.stderr
    check_dataset(fs, f"{bucket}/out", tmp_path / "out", ["0", "1", "2"])
    job = json.loads(fs.cat_file(f"{bucket}/out/_sdbatch/job.json"))
    assert job["settings"]["storage_options"] == {
        "key": "***", "secret": "***", "client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    everything = r.stdout + r.stderr + "".join(
        fs.cat_file(p).decode("latin-1") for p in fs.find(f"{bucket}/out") if not p.endswith(".png"))
    assert s3_server.secret not in everything and s3_server.key not in everything


@pytest.mark.parametrize("where", ["manifest", "output"])
def test_wrong_credentials_exit_2_before_any_work(s3_server, bucket, tmp_path, where):
    fs = s3_server.filesystem()
    manifest = put_manifest(fs, f"{bucket}/m.parquet", prompt=["a", "b"])
    if where == "output":  # the manifest is readable (local); only the output bucket refuses
        fs.get(manifest.removeprefix("s3://"), str(tmp_path / "m.parquet"))
        manifest = tmp_path / "m.parquet"
    env = base_env() | s3_server.env | {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    start = time.monotonic()
    r = sdbatch("run", manifest, "--output", f"s3://{bucket}/out", *TINY, env=env, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("sdbatch: error: ") and "Traceback" not in r.stderr, r.stderr
    assert "denied" in r.stderr.lower() or "forbidden" in r.stderr.lower() or "credentials" in r.stderr.lower(), r.stderr
    assert "starting" not in r.stderr  # no actor, no Ray
    assert "not-the-secret" not in r.stderr
    assert time.monotonic() - start < 30
    assert objects(fs, f"{bucket}/out") == []


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_server_stopped_mid_job_then_restarted(s3_server, bucket, tmp_path, output_format):
    fs = s3_server.filesystem()
    rows = 24
    manifest = put_manifest(fs, f"{bucket}/m.parquet", prompt=[f"prompt {i}" for i in range(rows)], steps=[12] * rows)
    env = base_env() | s3_server.env
    out = f"s3://{bucket}/out"
    args = [SDBATCH, "run", manifest, "--output", out, "--shard-size", 3, "--batch-size", 1, "--actors", 1,
            "--format", output_format, *TINY]
    job = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while not fs.exists(f"{bucket}/out/metadata/shard-000000.parquet"):
            assert job.poll() is None, f"the job ended before the fault: {job.communicate()}"
            assert time.monotonic() < deadline, "no shard was committed within 90 s"
            time.sleep(0.1)
            fs.invalidate_cache()
        s3_server.stop()
        stopped = time.monotonic()
        stdout, stderr = job.communicate(timeout=90)  # retries are bounded: the job must give up
        gave_up_after = time.monotonic() - stopped
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        s3_server.start()
    assert job.returncode not in (0, None), (stdout, stderr)
    assert gave_up_after < 60
    assert "sdbatch: error: " in stderr and "re-run the same command to continue" in stderr, stderr
    assert "failed after" in stderr and "Traceback" not in stderr, stderr
    assert not re.search(r"(shard-\d+): \1", stderr), stderr  # the shard is named once

    # Nothing half-committed: every committed shard has all its images; no _SUCCESS.
    fs = s3_server.filesystem()
    listed = objects(fs, f"{bucket}/out")
    committed = [p for p in listed if p.startswith("metadata/")]
    assert committed and len(committed) < rows // 3 and "_SUCCESS" not in listed, listed
    local = download(fs, f"{bucket}/out", tmp_path / "partial")
    meta, _ = read_dataset(local)
    check_images(local, meta)
    assert len(meta) == 3 * len(committed)

    r = sdbatch("run", manifest, "--output", out, "--shard-size", 3, "--batch-size", 1, "--format", output_format,
                *TINY, env=env)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(committed)} of 8 shards already done" in r.stderr
    check_dataset(fs, f"{bucket}/out", tmp_path / "final", [str(i) for i in range(rows)])


def test_output_exists_sees_objects_written_by_another_process(s3_server, bucket):
    """s3fs answers `exists` from its cached listing of the parent; Output must not trust it."""
    from jobs.sink import Output

    out = Output(f"s3://{bucket}/out", s3_server.storage_options | {"skip_instance_cache": True})
    out.write("failures/shard-000000.parquet", b"x")
    out.fs.ls(out.path("failures"))  # the listing is cached now
    s3_server.filesystem().pipe_file(f"{bucket}/out/failures/shard-000001.parquet", b"y")  # another writer
    assert out.exists("failures/shard-000001.parquet")
    s3_server.filesystem().rm(f"{bucket}/out/failures/shard-000000.parquet")
    assert not out.exists("failures/shard-000000.parquet")


def test_validate_finds_missing_images_and_adapters_on_s3(s3_server, bucket):
    fs = s3_server.filesystem()
    fs.pipe({f"{bucket}/in/imgs/a.png": b"a", f"{bucket}/other/c.png": b"c", f"{bucket}/loras/cat.safetensors": b"l"})
    manifest = put_manifest(fs, f"{bucket}/in/manifest.parquet", prompt=["a", "b", "c", "d"],
                            init_image=["imgs/a.png", "imgs/b.png", f"s3://{bucket}/other/c.png", None],
                            loras=["cat", None, None, None])
    env = base_env() | s3_server.env
    cat = f"cat=s3://{bucket}/loras/cat.safetensors"
    r = sdbatch("validate", manifest, "--lora", cat, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert ("column 'init_image': 1 row naming a file that does not exist (row 1: 'imgs/b.png'); relative paths are "
            f"relative to the manifest's folder, s3://{bucket}/in") in r.stderr
    fs.pipe(f"{bucket}/in/imgs/b.png", b"b")
    r = sdbatch("validate", manifest, "--lora", cat, env=env)
    assert r.returncode == 0 and "modes (images)   img2img: 3, txt2img: 1" in r.stdout, r.stderr
    r = sdbatch("validate", manifest, "--lora", cat, "--embedding", f"<owl>=s3://{bucket}/owl.pt", env=env)
    assert r.returncode == 2 and f"--embedding <owl>: s3://{bucket}/owl.pt: no such file or folder" in r.stderr


def test_a_mixed_mode_job_reads_its_images_and_adapters_from_s3(s3_server, bucket, tmp_path):
    """Init images and masks beside an S3 manifest (relative paths), adapters on S3: each image is the one
    sdcore makes for its row alone from the same files."""
    import numpy as np
    import torch
    from PIL import Image

    import sdcore
    from sdcore.builtin import write_tiny_adapters
    from sdcore.embeddings import add_embeddings, read_embedding
    from sdcore.images import fit_image, fit_mask
    from sdcore.lora import Adapters, read_lora
    from tests.jobdata import pixels, seed_of

    files = write_tiny_adapters(tmp_path / "adapters")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    fs = s3_server.filesystem()
    for name in ("init.png", "mask.png"):
        fs.put(str(tmp_path / name), f"{bucket}/in/images/{name}")
    for path in files.values():
        fs.put(str(path), f"{bucket}/adapters/{path.name}")
    prompts = ["a <toy> in a garden", "a fox in a garden"]
    manifest = put_manifest(fs, f"{bucket}/in/manifest.parquet", id=["a", "b"], prompt=prompts,
                            init_image=["images/init.png"] * 2, mask_image=[None, "images/mask.png"],
                            loras=["style:0.6", None])
    env = base_env() | s3_server.env
    r = sdbatch("run", manifest, "--output", f"s3://{bucket}/out", "--actors", 1, *TINY, "--strength", "0.5",
                "--lora", f"style=s3://{bucket}/adapters/style.safetensors",
                "--embedding", f"<toy>=s3://{bucket}/adapters/toy.safetensors", env=env)
    assert r.returncode == 0, r.stderr
    meta = check_dataset(fs, f"{bucket}/out", tmp_path / "out", ["a", "b"])
    images = check_images(tmp_path / "out", meta)
    assert (meta["a"]["mode"], meta["b"]["mode"]) == ("img2img", "inpaint")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CPU actor: the low bits of a CPU image depend on the thread count
    try:
        pipe = sdcore.load_pipeline(MODEL)
        add_embeddings(pipe, [read_embedding(files["embedding"], "<toy>")])
        init = [fit_image(Image.open(tmp_path / "init.png"), 64, 64)]
        mask = [fit_mask(Image.open(tmp_path / "mask.png"), 64, 64)]
        merged = Adapters(pipe)
        for image_id, prompt, loras, masks in (("a", prompts[0], [(read_lora(files["lora"], "style"), 0.6)], {}),
                                               ("b", prompts[1], [], {"mask_images": mask})):
            merged.activate(loras)
            expected = pipe.generate([prompt], seeds=[seed_of(image_id)], steps=2, height=64, width=64,
                                     scheduler="ddim", output="np", init_images=init, strength=0.5, **masks)[0]
            assert (pixels(images[image_id]) == expected).all(), image_id
    finally:
        torch.set_num_threads(threads)
