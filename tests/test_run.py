"""`sdbatch run` as a user runs it: manifest in, dataset out, every row exactly once; a driver
killed with SIGKILL and run again; bad input stopped before Ray starts and before anything is written."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from jobs import driver
from jobs.cli import app
from tests.jobdata import MODEL, check_images, read_dataset, seed_of, snapshot, tar_members, write_manifest

SDBATCH = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "sdbatch")
TINY = ["--model", MODEL, "--width", "64", "--height", "64", "--steps", "2", "--scheduler", "ddim"]


def sdbatch(*args, timeout=180, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([SDBATCH, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def assert_user_error(result, *fragments):
    """Exit code 2 and one line `sdbatch: error: ...` naming the problem, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("sdbatch: error: ") and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def manifest(tmp_path):
    return write_manifest(
        tmp_path / "manifest.parquet",
        id=["cat", "dog", "owl", "fox", "nan", "emu", "yak"],
        prompt=["a cat", "a dog, ünïcode", "an owl", "a fox", "overflows", "an emu", ""],
        num_images=[1, 3, 1, 1, 1, 1, 1],
        seed=pa.array([7, None, None, 2**63 - 1, None, None, None], pa.int64()),
        scheduler=[None, "euler_a", None, "ddpm", None, None, "pndm"],
        guidance_scale=[None, None, 1.0, None, 1e30, None, None],  # 1e30 overflows to NaN: a failure
        label=["c", "d", "o", "f", "n", "e", "y"],
    )


def test_manifest_to_dataset(tmp_path, manifest):
    out = tmp_path / "out"
    r = sdbatch("run", manifest, "--output", out, "--shard-size", 3, "--batch-size", 2, "--actors", 1, *TINY)
    assert r.returncode == 0, r.stderr
    assert "done: 8 images, 1 failed in" in r.stdout and "actor 0 (cpu" in r.stdout
    assert "images 9/9 (100%)" in r.stderr and "failed 1" in r.stderr

    meta, failures = read_dataset(out)
    assert sorted(meta) == sorted(["cat", "dog-0", "dog-1", "dog-2", "owl", "fox", "emu", "yak"])
    assert list(failures) == ["nan"] and "NaN" in failures["nan"]["error"] and failures["nan"]["label"] == "n"
    check_images(out, meta)
    rows = pq.read_table(manifest).to_pylist()
    for row_number, row in enumerate(rows):
        ids = [row["id"]] if row["num_images"] == 1 else [f"{row['id']}-{k}" for k in range(row["num_images"])]
        for k, image_id in enumerate(ids):
            got = meta.get(image_id) or failures[image_id]
            assert got["manifest_row"] == row_number and got["prompt"] == row["prompt"] and got["label"] == row["label"]
            base = row["seed"] if row["seed"] is not None else seed_of(row["id"])
            assert got["seed"] == (base + k) % 2**63
            assert got["scheduler"] == (row["scheduler"] or "ddim")
            assert got["guidance_scale"] == (row["guidance_scale"] or 7.5)
            assert (got["steps"], got["width"], got["height"], got["negative_prompt"]) == (2, 64, 64, "")
    assert meta["fox"]["seed"] == 2**63 - 1 and meta["cat"]["seed"] == 7
    assert {r["model"] for r in meta.values()} == {MODEL} and {r["model_fingerprint"] for r in meta.values()} == {"builtin:tiny/v1"}
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["shard-000000.parquet", "shard-000001.parquet",
                                                                     "shard-000002.parquet"]
    success = json.loads((out / "_SUCCESS").read_text())
    assert (success["images"], success["failures"], success["rows"], success["shards"]) == (8, 1, 7, 3)
    last = success["last_run"]
    assert 0 < last["startup_seconds"] and 0 < last["working_seconds"]
    assert last["startup_seconds"] + last["working_seconds"] < last["wall_seconds"]
    assert "s checking, starting Ray and loading the model" in r.stdout
    job = json.loads((out / "_sdbatch" / "job.json").read_text())
    assert job["settings"]["batch_size"] == 2 and job["identity"]["shard_size"] == 3

    status = sdbatch("status", out)
    assert status.returncode == 0
    for line in ("shards    3/3 done (0 remaining)", "rows      7/7 done", "images    8/9 written", "failures  1",
                 "_SUCCESS  yes"):
        assert line in status.stdout

    # A different manifest into the same folder is refused before Ray starts; the dataset is untouched.
    before = snapshot(out)
    other = write_manifest(tmp_path / "other.parquet", prompt=["something else"])
    assert_user_error(sdbatch("run", other, "--output", out, "--shard-size", 3, *TINY),
                      "holds a different job (manifest_fingerprint:", "use --overwrite")
    assert_user_error(sdbatch("run", manifest, "--output", out, "--shard-size", 4, *TINY), "shard_size: 3 there, 4 now")
    assert snapshot(out) == before


def kill_when_committed(args: list, out: Path, shards: int) -> dict:
    """Start `sdbatch run args`, SIGKILL it once `shards` shards are committed, wait until the actor it
    leaves behind is quiet; the metadata files then, with their bytes and mtimes."""
    first = subprocess.Popen([SDBATCH, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list((out / "metadata").glob("*.parquet"))) < shards:
            assert first.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    # The actor dies with its driver's Ray, but may still commit the shard it had: wait for quiet.
    done_before, quiet_since, deadline = snapshot(out / "metadata"), time.monotonic(), time.monotonic() + 30
    while time.monotonic() - quiet_since < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        if (now := snapshot(out / "metadata")) != done_before:
            done_before, quiet_since = now, time.monotonic()
    return done_before


def written_images(out: Path, extension: str) -> dict[str, bytes]:
    """Every image written so far, committed or not, by the stem of its image_path: id or webdataset key."""
    if (out / "shards").is_dir():
        return {name.split(".")[0]: data for tar in (out / "shards").glob("*.tar")
                for name, data in tar_members(tar).items() if name.endswith(f".{extension}")}
    return {p.stem: p.read_bytes() for p in (out / "images").rglob(f"*.{extension}")}


@pytest.mark.parametrize("image_format, extension, output_format", [
    ("png", "png", "files"), ("jpeg", "jpg", "files"), ("png", "png", "webdataset"), ("webp", "webp", "parquet")])
def test_killed_driver_resumes_without_losing_or_redoing_anything(tmp_path, image_format, extension, output_format):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"prompt {i}" for i in range(24)], steps=[10] * 24)
    out = tmp_path / "out"
    job_args = ["run", manifest, "--output", out, "--image-format", image_format, "--format", output_format]
    args = [*job_args, "--shard-size", 3, *TINY]
    done_before = kill_when_committed(args, out, 2)
    assert 2 <= len(done_before) < 8, sorted(done_before)
    assert not (out / "_SUCCESS").exists()
    images_before = written_images(out, extension)
    other = "webp" if image_format == "png" else "png"  # a resume in another format is another job
    assert_user_error(sdbatch(*job_args, "--image-format", other, *TINY, "--resume"),
                      f"image_format: {image_format} there, {other} now")
    other = "files" if output_format == "webdataset" else "webdataset"
    assert_user_error(sdbatch(*job_args, "--format", other, *TINY, "--resume"),
                      f"format: {output_format} there, {other} now")

    r = sdbatch(*job_args, *TINY)  # without --shard-size: a continued job keeps its own
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(done_before)} of 8 shards already done" in r.stderr
    assert f"({len(done_before)} shards were already done)" in r.stdout
    assert f"this run: {24 - 3 * len(done_before)} images" in r.stdout
    after = snapshot(out / "metadata")
    assert {name: after[name] for name in done_before} == done_before  # not redone: same bytes, same mtime
    meta, failures = read_dataset(out)
    assert sorted(meta, key=int) == [str(i) for i in range(24)] and not failures
    images = check_images(out, meta)
    if output_format == "webdataset":
        files = {str(p.relative_to(out)) for p in (out / "shards").iterdir()}
        assert files == {m["tar"] for m in meta.values()} and not (out / "images").exists()  # no orphans
        assert written_images(out, extension) == {m["key"]: images[i] for i, m in meta.items()}
    else:
        files = {str(p.relative_to(out)) for p in (out / "images").rglob("*") if p.is_file()}
        assert files == {m["image_path"] for m in meta.values()}  # no orphans
    by_stem = {Path(m["image_path"]).stem: images[i] for i, m in meta.items()}
    assert images_before and all(by_stem[stem] == data for stem, data in images_before.items())  # redone: same bytes
    assert json.loads((out / "_SUCCESS").read_text())["images"] == 24


def test_a_row_of_many_images_spans_shards_and_a_kill_keeps_every_committed_one(tmp_path):
    # 800 images of one row in shards of 50: a kill costs at most the shards in flight, not the row.
    # (A row of 10,000 images takes ~5 min on one core at 64x64 and 1 step; 800 keep the test near 45 s.)
    big = 800
    manifest = write_manifest(tmp_path / "m.parquet", id=["a", "big", "b", "c"], prompt=["a", "many", "b", "c"],
                              num_images=[1, big, 3, 1], label=["la", "lbig", "lb", "lc"])
    out = tmp_path / "out"
    args = ["run", manifest, "--output", out, "--shard-size", 50, "--batch-size", 16,
            "--model", MODEL, "--width", "64", "--height", "64", "--steps", "1", "--scheduler", "ddim"]
    total, shards = big + 5, -(-(big + 5) // 50)
    done_before = kill_when_committed(args, out, 3)
    assert 3 <= len(done_before) < shards - 2, sorted(done_before)
    images_before = {name: snapshot(out / "images" / name.removesuffix(".parquet")) for name in done_before}
    first = pq.read_table(out / "metadata" / "shard-000000.parquet").to_pylist()
    assert [r["id"] for r in first] == ["a", *(f"big-{k}" for k in range(49))]
    assert {r["label"] for r in first[1:]} == {"lbig"} and {r["manifest_row"] for r in first[1:]} == {1}

    r = sdbatch(*args)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(done_before)} of {shards} shards already done" in r.stderr
    assert f"this run: {total - 50 * len(done_before)} images" in r.stdout
    after = snapshot(out / "metadata")
    assert {name: after[name] for name in done_before} == done_before  # not redone: same bytes, same mtime
    for name, files in images_before.items():
        assert snapshot(out / "images" / name.removesuffix(".parquet")) == files
    meta, failures = read_dataset(out)  # asserts that no id appears twice
    assert set(meta) == {"a", "c", *(f"big-{k}" for k in range(big)), "b-0", "b-1", "b-2"} and not failures
    assert all(meta[f"big-{k}"]["seed"] == (seed_of("big") + k) % 2**63 for k in range(big))
    check_images(out, meta)
    pngs = {str(p.relative_to(out)) for p in (out / "images").rglob("*.png")}
    assert pngs == {m["image_path"] for m in meta.values()}  # no orphans
    success = json.loads((out / "_SUCCESS").read_text())
    assert (success["images"], success["rows"], success["shards"]) == (total, 4, shards)
    status = sdbatch("status", out)
    assert f"shards    {shards}/{shards} done" in status.stdout and "rows      4/4 done" in status.stdout


def test_auto_dtype_resumes_a_dataset_in_the_dtype_it_was_made_in(tmp_path, no_ray):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a cat", "a dog", "an owl"])
    out = tmp_path / "out"
    args = ["run", manifest, "--output", out, "--shard-size", 2, "--actors", 1, *TINY]
    assert sdbatch(*args, "--dtype", "bf16").returncode == 0
    made = {p.name: p.read_bytes() for p in (out / "images").rglob("*.png")}
    (out / "metadata" / "shard-000001.parquet").unlink()  # as if the run had stopped before its last commit

    r = sdbatch(*args)  # --dtype auto, on a CPU, where a new dataset would be fp32
    assert r.returncode == 0, r.stderr
    assert "resuming: 1 of 2 shards already done" in r.stderr and "starting 1 CPU actor(s), bf16" in r.stderr
    assert {p.name: p.read_bytes() for p in (out / "images").rglob("*.png")} == made  # made again in bf16, bit for bit
    job = json.loads((out / "_sdbatch" / "job.json").read_text())
    assert job["identity"]["dtype"] == "bf16" and job["settings"]["dtype_requested"] == "bf16"
    before = snapshot(out)
    assert_user_error(invoke(*args, "--dtype", "fp32"), "dtype: bf16 there, fp32 now", "use --overwrite")
    assert snapshot(out) == before


# --- bad input: exit 2, nothing written, Ray never started ---------------------------------------------

@pytest.fixture
def no_ray(monkeypatch):
    def refuse(opts):
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr(driver, "connect_ray", refuse)


def invoke(*args):
    """`sdbatch ...` in this process (a subprocess costs seconds of imports); same exit codes and streams."""
    result = CliRunner().invoke(app, list(map(str, args)))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.mark.parametrize("columns, message", [
    ({"text": ["a cat"]}, "missing required column 'prompt'"),
    ({"prompt": ["a", "b", "c"], "steps": [20, 0, 2000]}, "column 'steps': 2 rows out of range 1..1000 (rows 1, 2: 0, 2000)"),
    ({"prompt": ["a", "b"], "id": ["x", "x"]}, "column 'id': 1 duplicate id ('x' at rows 0, 1)"),
    ({"prompt": ["a"], "widht": [64]}, "unknown column 'widht': did you mean 'width'?"),
    ({"prompt": ["a"], "scheduler": ["karras"]}, "column 'scheduler': 1 row with an unknown scheduler"),
    ({"prompt": ["a"], "loras": ["cat:0.5"]}, "column 'loras': 1 row naming a LoRA that is not declared"),
    ({"prompt": ["a"], "init_image": ["nope.png"]}, "column 'init_image': 1 row naming a file that does not exist"),
])
def test_bad_manifest(tmp_path, no_ray, columns, message):
    manifest = write_manifest(tmp_path / "m.parquet", **columns)
    assert_user_error(invoke("run", manifest, "--output", tmp_path / "out", *TINY), message)
    assert not (tmp_path / "out").exists()


def test_not_a_manifest(tmp_path, no_ray):
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n")
    assert_user_error(invoke("run", text, "--output", tmp_path / "out", *TINY), "prompts.txt: not a Parquet file")
    assert_user_error(invoke("run", tmp_path / "nope.parquet", "--output", tmp_path / "out", *TINY), "no such file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "--model /no/such/model: no such file or directory"),
    (["--model", "builtin:huge"], "unknown built-in model; the only one is builtin:tiny"),
    (["--model", "{manifest}"], "expected a diffusers folder or a .safetensors / .ckpt file"),
    (["--model", "{tmp}"], "not a diffusers model folder (no unet/, vae/, text_encoder/)"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "many"], "--batch-size must be auto or a number of images, got 'many'"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs CUDA, and --device cpu runs on the CPU"),
    (["--actors", "0", "--shard-size", "-1"], "--actors must be at least 1, got 0; --shard-size must be at least 1"),
    (["--steps", "0"], "--steps 0 is out of range 1..1000"),
    (["--width", "100"], "--width 100 must be a multiple of 8"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--quality", "90"], "--quality applies to jpeg and webp; png is lossless"),
    (["--image-format", "webp", "--quality", "101"], "--quality must be 1..100, got 101"),
    (["--format", "tar"], "--format must be one of files, webdataset, parquet, got 'tar'"),
    (["--format", "webdataset", "--embed-images"], "--embed-images is --format parquet; it does not go with"),
    (["--resume"], "nothing to resume"),
    (["--storage-option", "anon"], "--storage-option 'anon': expected key=value"),
    (["--lora", "cat=/no/cat.safetensors"], "--lora cat: /no/cat.safetensors: no such file or directory"),
    (["--embedding", "<owl>"], "--embedding '<owl>': expected NAME=PATH_OR_URI"),
    (["--strength", "2", "--resize", "crop"], "--strength 2.0 must be a number in 0 < strength <= 1"),
    (["--shard-timeout", "0", "--row-timeout", "-1"], "--shard-timeout must be a number of seconds > 0, got 0.0; "
                                                      "--row-timeout must be a number of seconds > 0, got -1.0"),
])
def test_bad_options(tmp_path, no_ray, manifest, args, message):
    args = [a.format(manifest=manifest, tmp=tmp_path) for a in args]
    r = invoke("run", manifest, "--output", tmp_path / "out", *TINY, *args)
    assert_user_error(r, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp8"], "Invalid value for '--dtype': Value error, 'fp8' is not one of 'auto', 'fp32', 'fp16', 'bf16'."),
    (["--device", "tpu"], "Invalid value for '--device': Value error, 'tpu' is not one of 'auto', 'cuda', 'cpu'."),
    (["--scheduler", "karras"], "Invalid value for '--scheduler': Value error, 'karras' is not one of 'ddpm', 'ddim'"),
])
def test_values_outside_the_choices(tmp_path, no_ray, manifest, args, message):
    r = invoke("run", manifest, "--output", tmp_path / "out", *TINY, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_resuming_with_other_adapters_or_strength_is_refused_before_ray_starts(tmp_path, no_ray, manifest):
    lora = tmp_path / "cat.safetensors"
    lora.write_bytes(b"lora")
    opts = driver.RunOptions(manifest=str(manifest), model=MODEL, output=str(tmp_path / "out"),
                             defaults=driver.Defaults(width=64, height=64, steps=2, scheduler="ddim"))
    job, out = driver.plan_job(opts)
    job.model_fingerprint, job.dtype, job.adapters = "f", "fp32", {"loras": {"cat": "a" * 64}, "embeddings": {}}
    out.prepare(job)
    assert_user_error(invoke("run", manifest, "--output", tmp_path / "out", *TINY, "--resume"),
                      'holds a different job (loras: {"cat": "aaaa')
    assert_user_error(invoke("run", manifest, "--output", tmp_path / "out", *TINY, "--resume", "--lora", f"cat={lora}",
                             "--strength", "0.5"), "holds a different job (defaults:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(tmp_path, no_ray, manifest):
    assert_user_error(invoke("run", manifest, "--output", tmp_path / "out", *TINY, "--device", "cuda"),
                      "--device cuda: no CUDA device is visible here")


def test_output_that_is_not_a_dataset_is_never_touched(tmp_path, no_ray, manifest):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for mode in ([], ["--overwrite"]):
        assert_user_error(invoke("run", manifest, "--output", precious, *TINY, *mode), "is not empty and is not an sdbatch dataset")
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_user_error(invoke("run", manifest, "--output", afile, *TINY), "is a file, not a folder")


def test_bad_model_exits_2_quickly_through_the_real_command(tmp_path, manifest):
    start = time.monotonic()
    r = sdbatch("run", manifest, "--output", tmp_path / "out", "--model", tmp_path / "missing.safetensors")
    assert_user_error(r, "missing.safetensors: no such file or directory")
    assert time.monotonic() - start < 30  # no Ray start, no model load
    assert not (tmp_path / "out").exists() and not os.path.exists(tmp_path / "out")


def test_compile_reaches_every_actor_and_keeps_the_images(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", id=["a", "b", "c"], prompt=["a cat", "a dog", "an owl"])
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        r = sdbatch("run", manifest, "--output", out, "--actors", 1, *TINY, *extra, timeout=400)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "_sdbatch" / "job.json").read_text())["settings"]["compile"] == bool(extra)
        meta, _ = read_dataset(out)
        runs[name] = {i: np.asarray(Image.open(out / row["image_path"])).astype(int) for i, row in meta.items()}
    assert sorted(runs["compiled"]) == ["a", "b", "c"]
    for image_id, eager in runs["eager"].items():
        assert np.abs(runs["compiled"][image_id] - eager).max() <= 2


def test_compile_without_a_compiler_stops_the_job_before_any_output(tmp_path, manifest):
    # CXX reaches the actors' processes: the local Ray cluster inherits the command's environment.
    r = sdbatch("run", manifest, "--output", tmp_path / "out", *TINY, "--compile", env={"CXX": "/nonexistent/c++"})
    assert r.returncode == 2, (r.stdout, r.stderr)
    error = r.stderr.splitlines()[-1]  # after the plan line that Ray's start follows
    assert error.startswith("sdbatch: error: an actor could not start: CompileUnavailableError: --compile: torch.compile "
                            "cannot build code for cpu"), r.stderr
    assert "/nonexistent/c++" in error and "run without --compile" in error and "Traceback" not in r.stderr
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # the lease, taken before Ray, is released


needs_mounts = pytest.mark.skipif(
    subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0,
    reason="needs `unshare -m` (a private mount namespace) to make a read-only or full file system")


@needs_mounts
@pytest.mark.parametrize("store, message", [
    ("ro", "read-only file system (Read-only file system); not retried"),
    ("full", "no space left (No space left on device); not retried"),
])
def test_read_only_or_full_output_exits_2_before_ray_starts(tmp_path, manifest, store, message):
    # A small tmpfs in a mount namespace of the command's own: read-only, or filled to the last byte.
    disk = tmp_path / "disk"
    disk.mkdir()
    prepare = {"ro": f"mount -t tmpfs -o ro,size=1m tmpfs {disk}",
               "full": f"mount -t tmpfs -o size=64k tmpfs {disk} && mkdir {disk}/out && "
                       f"(dd if=/dev/zero of={disk}/fill bs=4k 2>/dev/null; true)"}[store]
    command = f"{prepare} && exec {SDBATCH} run {manifest} --output {disk}/out {' '.join(TINY)}"
    start = time.monotonic()
    r = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=120)
    assert_user_error(r, f"{disk}/out: cannot write here: ", message)
    assert time.monotonic() - start < 15  # no retries, no Ray, no model
    assert "actor" not in r.stderr


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below `pid`, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child in [p for p, pp in parents.items() if pp == parent]:
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            todo.append(child)
    return found


def sigterm_when(command: list[str], ready, timeout: float) -> tuple[int, str]:
    """Run `command` and send it SIGTERM as soon as `ready(pid)` holds; its exit code and stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready(process.pid):
            assert time.monotonic() < deadline and process.poll() is None, "never ready for the signal"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, stderr


def test_signal_during_ray_start_says_so_and_leaves_no_ray_process(tmp_path, manifest):
    ray = {}

    def ray_started(pid: int) -> bool:
        ray.update(descendants(pid))
        return any("raylet" in cmd or "gcs_server" in cmd for cmd in ray.values())

    returncode, stderr = sigterm_when([SDBATCH, "run", str(manifest), "--output", str(tmp_path / "out"), *TINY],
                                      ray_started, timeout=60)
    assert returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        "sdbatch: error: interrupted during start-up, before any actor was ready: nothing was generated, and Ray "
        "was shut down; re-run the same command to start again"), stderr
    deadline = time.monotonic() + 15
    while (left := [cmd for pid, cmd in ray.items() if Path(f"/proc/{pid}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGTERM (its SigCgt mask in /proc)."""
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_signal_while_the_program_imports_says_so(tmp_path, manifest):
    """A SIGTERM that lands while `sdbatch` is still importing torch and Ray, seconds before any check."""
    returncode, stderr = sigterm_when([SDBATCH, "run", str(manifest), "--output", str(tmp_path / "out"), *TINY],
                                      catches_sigterm, timeout=30)
    assert returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "sdbatch: error: interrupted while starting; nothing was done", stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def hanging_manifest(tmp_path):
    # Row "hang" would take minutes (1000 steps at 512² on builtin:tiny); the others take a blink.
    return write_manifest(tmp_path / "hang.parquet", id=["a", "hang", "b", "c"], prompt=["a", "slow", "b", "c"],
                          steps=[2, 1000, 2, 2], width=[64, 512, 64, 64], height=[64, 512, 64, 64])


def run_past_the_hanging_row(out, manifest, *options, within: float) -> tuple[subprocess.CompletedProcess, dict]:
    """`sdbatch run` of `hanging_manifest` with `options`: it succeeds within `within` seconds, and only
    "hang" fails; the process and the failure records."""
    start = time.monotonic()
    r = sdbatch("run", manifest, "--output", out, *options, *TINY, timeout=300)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - start < within
    meta, failures = read_dataset(out)
    assert sorted(meta) == ["a", "b", "c"] and list(failures) == ["hang"]
    return r, failures


def test_row_timeout_fails_only_the_row_that_hangs(tmp_path, hanging_manifest):
    _, failures = run_past_the_hanging_row(tmp_path / "out", hanging_manifest, "--shard-size", 4, "--row-timeout", 2,
                                           within=60)
    assert "RowTimeout: ran past --row-timeout 2 s per image; stopped at step" in failures["hang"]["error"]


def test_shard_timeout_kills_the_actor_and_the_job_finishes(tmp_path, hanging_manifest):
    out = tmp_path / "out"
    r, failures = run_past_the_hanging_row(out, hanging_manifest, "--shard-size", 1, "--shard-timeout", 6, within=120)
    assert "actor 0: shard-000001 ran past --shard-timeout 6 s; killed; starting a replacement" in r.stderr
    assert failures["hang"]["error"].startswith(
        "gave up after 3 attempts of its shard; the last: shard-000001 ran past --shard-timeout 6 s")
    assert json.loads((out / "_SUCCESS").read_text())["failures"] == 1


def test_a_shard_that_expires_twice_runs_its_rows_alone_and_only_the_hanging_row_fails(tmp_path, hanging_manifest):
    out = tmp_path / "out"
    start = time.monotonic()
    r, failures = run_past_the_hanging_row(out, hanging_manifest, "--shard-size", 4, "--shard-timeout", 6, within=120)
    assert "shard-000000: ran past its deadline 2 times; its 4 rows run again one at a time" in r.stderr
    assert "shard-000000 (row 1 alone) ran past --shard-timeout 6 s; killed" in r.stderr
    meta, _ = read_dataset(out)
    assert failures["hang"]["error"] == ("gave up after 3 attempts of its shard, the last of its row alone; the last: "
                                         "shard-000000 (row 1 alone) ran past --shard-timeout 6 s")
    assert failures["hang"]["attempts"] == 3 and failures["hang"]["steps"] == 1000
    assert [p.name for p in (out / "metadata").iterdir()] == ["shard-000000.parquet"]  # one commit, by the driver
    check_images(out, meta)
    assert {str(p.relative_to(out)) for p in (out / "images").rglob("*.png")} == {m["image_path"] for m in meta.values()}
    assert json.loads((out / "_SUCCESS").read_text())["failures"] == 1
    assert "rows      4/4 done" in sdbatch("status", out).stdout
    assert time.monotonic() - start < 120


def test_an_inpainting_model_refuses_manifests_with_other_modes():
    assert driver.inpainting_problems({"inpaint": 3}, inpainting_unet=True) == []
    assert driver.inpainting_problems({"txt2img": 2, "img2img": 1}, inpainting_unet=False) == []
    assert driver.inpainting_problems({"inpaint": 3, "txt2img": 2, "img2img": 1}, inpainting_unet=True) == [
        "--model is an inpainting model, which needs an init_image and a mask_image on every row; "
        "the manifest also has 1 img2img, 2 txt2img image(s)"]
