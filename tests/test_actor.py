"""Actors: the shard runner on its own (failures per image, never per shard), then actors on a
local Ray under the driver: byte-identical output whatever the actor / batch / shard counts, an
actor killed mid-shard, a shard that keeps killing its actors, a model that changed."""
import hashlib
import io
import json
import threading
import time

import pytest
import ray
import torch

import sdcore
from jobs import actor, driver
from jobs.adapters import Adapters
from jobs.images import load as images_load
from jobs.actor import ActorConfig, OneThreadRunner, ShardFailed, ShardRunner
from jobs.buckets import BATCH_ON_CPU, BUCKETS, BatchSizes, fitting_bucket
from jobs.plan import shards
from jobs.sink import Output, OutputError
from sdcore import allocator
from sdcore.builtin import write_tiny_adapters
from sdcore.errors import NonFiniteOutputError
from tests.jobdata import (DEFAULTS, MODEL, TIMING, check_images, pixels, read_dataset, seed_of, snapshot,
                           start_local_ray, write_manifest, write_tiny_folder)

# --- the runner, without Ray ------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Actors on the CPU run one torch thread (the thread count changes low bits); so do the
    references here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return sdcore.load_pipeline(MODEL)


def make_runner(manifest, out, **config) -> ShardRunner:
    return ShardRunner(ActorConfig(manifest=str(manifest), output=str(out), model=MODEL, defaults=DEFAULTS,
                                   device="cpu", **config))


def test_the_writer_queue_holds_two_batches(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a cat"])
    for batch_size, queue in [(None, 16), (4, 16), (16, 32)]:  # None: auto, 4 rows on the CPU
        runner = make_runner(manifest, tmp_path / f"out{batch_size}", batch_size=batch_size)
        try:
            assert runner.writer.max_pending == queue
        finally:
            runner.close()


def test_auto_batches_fit_the_free_memory_and_halve_for_their_size_only():
    gib = 2**30
    for free in (gib, 8 * gib, 80 * gib):
        small, large = (fitting_bucket(free, side, side, torch.float16) for side in (512, 1024))
        assert small in BUCKETS and large <= small and fitting_bucket(free, 512, 512, torch.float32) <= small
    assert fitting_bucket(80 * gib, 512, 512, torch.float16) > fitting_bucket(8 * gib, 512, 512, torch.float16)
    assert fitting_bucket(0, 512, 512, torch.float16) == 1
    sizes = BatchSizes(None, torch.device("cpu"), torch.float32)
    assert sizes.rows(64, 64) == sizes.rows(64, 72) == BATCH_ON_CPU
    sizes.halve(64, 64, BATCH_ON_CPU)
    assert (sizes.rows(64, 64), sizes.rows(64, 72)) == (BATCH_ON_CPU // 2, BATCH_ON_CPU)
    # A short batch pads to the smallest bucket that holds it, never past its size's rows.
    assert [sizes.padded(n, 32) for n in (1, 3, 8, 9, 31)] == [1, 4, 8, 16, 32]
    assert [sizes.padded(n, 6) for n in (3, 5)] == [4, 6]


def run_all(runner: ShardRunner, rows: int, shard_size: int) -> list[dict]:
    try:
        return [runner.run_shard(s) for s in shards(rows, shard_size)]
    finally:
        runner.close()


def reference(pipe, prompt: str, seed: int, **params):
    """The image an in-process pipeline call makes for one row."""
    settings = {"steps": DEFAULTS.steps, "guidance_scale": DEFAULTS.guidance_scale, "width": DEFAULTS.width,
                "height": DEFAULTS.height, "scheduler": DEFAULTS.scheduler, **params}
    return pipe.generate([prompt], seeds=[seed], output="np", **settings)[0]


def test_the_runner_resolves_the_adapter_files_and_reports_their_sha256(tmp_path):
    files = write_tiny_adapters(tmp_path)
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a <owl>"], loras=["cat:0.5"])
    runner = make_runner(manifest, tmp_path / "out", adapters=Adapters.of([f"cat={files['lora']}"],
                                                                          [f"<owl>={files['embedding']}"]))
    assert runner.info()["adapters"] == {"loras": {"cat": hashlib.sha256(files["lora"].read_bytes()).hexdigest()},
                                         "embeddings": {"<owl>": hashlib.sha256(files["embedding"].read_bytes()).hexdigest()}}
    assert runner.adapter_files.loras["cat"][0] == str(files["lora"])
    assert list(runner.loras) == ["cat"] and [e.token for e in runner.embeddings] == ["<owl>"]


def test_an_init_image_shared_by_a_batch_is_read_once_per_size(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "init.png")
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a", "b", "c"], init_image=["init.png"] * 3,
                              num_images=[3, 1, 1], width=[64, 64, 128])
    loads = []
    monkeypatch.setattr(actor.images, "load", lambda *args, **kw: loads.append(args[1:4]) or images_load(*args, **kw))
    results = run_all(make_runner(manifest, tmp_path / "out", batch_size=4), rows=3, shard_size=3)
    assert sum(r["images"] for r in results) == 5
    assert sorted(loads) == [("init_image", 64, 64), ("init_image", 128, 64)]  # 4 images at 64x64, 1 at 128x64


def test_runner_makes_every_image_of_its_shards(tmp_path, pipe):
    manifest = write_manifest(
        tmp_path / "m.parquet", id=["a", "b", "c", "d", "e"], prompt=["a cat", "a dog", "ünïcode owl", "", "a fox"],
        num_images=[1, 2, 1, 1, 1], scheduler=["ddim", "euler_a", "ddim", "ddpm", "ddim"], label=[1, 2, 3, 4, 5])
    runner = make_runner(manifest, tmp_path / "out", batch_size=3)
    assert runner.info()["fingerprint"] == "builtin:tiny/v1" and runner.info()["device"] == "cpu"
    assert runner.info()["allocator"] == allocator.DEFAULT  # only asked for, by the driver: not this test's process
    results = run_all(runner, 5, 3)
    assert [(r["shard"], r["images"], r["failures"]) for r in results] == [("shard-000000", 4, 0), ("shard-000001", 2, 0)]
    assert runner.progress() == ("shard-000001", 2)
    meta, failures = read_dataset(tmp_path / "out")
    assert sorted(meta) == ["a", "b-0", "b-1", "c", "d", "e"] and not failures
    pngs = check_images(tmp_path / "out", meta)
    assert meta["b-1"]["seed"] == seed_of("b", 1) and meta["b-1"]["label"] == 2 and meta["b-1"]["manifest_row"] == 1
    assert json.loads(meta["b-0"]["scheduler_config"]) == pipe.make_scheduler("euler_a").config
    for image_id, row in meta.items():  # the same pixels as a plain pipeline call per image
        expected = reference(pipe, row["prompt"], row["seed"], scheduler=row["scheduler"])
        assert (pixels(pngs[image_id]) == expected).all(), image_id


def test_nan_image_is_a_failure_and_the_rest_of_the_shard_succeeds(tmp_path):
    # A huge guidance scale overflows float32: builtin:tiny really produces NaN there.
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a", "b", "c", "d"], guidance_scale=[7.5, 1e30, 7.5, 7.5])
    results = run_all(make_runner(manifest, tmp_path / "out"), 4, 4)
    assert [(r["images"], r["failures"]) for r in results] == [(3, 1)]
    meta, failures = read_dataset(tmp_path / "out")
    assert sorted(meta) == ["0", "2", "3"] and list(failures) == ["1"]
    assert "NaN" in failures["1"]["error"] and failures["1"]["attempts"] == 1 and failures["1"]["guidance_scale"] == 1e30
    assert not (tmp_path / "out/images/shard-000000/1.png").exists()


def test_nan_rows_inside_a_batch_keep_their_batch_mates(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["fine", "NaN here", "fine too"])
    runner = make_runner(manifest, tmp_path / "out", batch_size=3)
    real = runner.pipe.generate

    def generate(prompts, **kw):
        images = real(prompts, **kw)
        bad = [i for i, p in enumerate(prompts) if "NaN" in p]
        if bad:
            raise NonFiniteOutputError(bad, [None if i in bad else im for i, im in enumerate(images)])
        return images

    monkeypatch.setattr(runner.pipe, "generate", generate)
    assert [(r["images"], r["failures"]) for r in run_all(runner, 3, 3)] == [(2, 1)]
    meta, failures = read_dataset(tmp_path / "out")
    assert sorted(meta) == ["0", "2"] and failures["1"]["attempts"] == 1


def test_a_failing_batch_is_retried_row_by_row_to_isolate_the_bad_row(tmp_path, pipe, monkeypatch):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["one", "boom", "three", "four"])
    runner = make_runner(manifest, tmp_path / "out", batch_size=3)
    real, calls = runner.pipe.generate, []

    def generate(prompts, **kw):
        calls.append(list(prompts))
        if "boom" in prompts:
            raise RuntimeError("this prompt breaks the model")
        return real(prompts, **kw)

    monkeypatch.setattr(runner.pipe, "generate", generate)
    assert [(r["images"], r["failures"]) for r in run_all(runner, 4, 4)] == [(3, 1)]
    assert calls == [["one", "boom", "three"], ["one"], ["boom"], ["three"], ["four"]]
    meta, failures = read_dataset(tmp_path / "out")
    assert sorted(meta) == ["0", "2", "3"]
    assert failures["1"]["attempts"] == 2 and failures["1"]["error"].startswith("RuntimeError: this prompt breaks the model")
    pngs = check_images(tmp_path / "out", meta)
    assert (pixels(pngs["2"]) == reference(pipe, "three", seed_of("2"))).all()  # made alone, same pixels


def test_a_shard_where_every_image_fails_raises_and_commits_nothing(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a", "b"])
    runner = make_runner(manifest, tmp_path / "out")

    def broken(prompts, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner.pipe, "generate", broken)
    with pytest.raises(ShardFailed, match="all 2 images failed.*illegal memory access"):
        run_all(runner, 2, 2)
    assert not (tmp_path / "out" / "metadata").exists()


def record_unet_batches(monkeypatch, pipe, out_of_memory=lambda x: False) -> list[int]:
    """Wrap the pipeline's UNet call: note every call's (samples, latent height, ran out of memory) for
    its latents x [B, 4, h, w], raising torch.OutOfMemoryError where `out_of_memory(x)` says so."""
    real, seen = pipe.predict_noise, []

    def predict_noise(x, t, context):
        seen.append((len(x), x.shape[-2], out_of_memory(x)))
        if seen[-1][2]:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {len(x)} samples of {tuple(x.shape[1:])}")
        return real(x, t, context)

    monkeypatch.setattr(pipe, "predict_noise", predict_noise)
    return seen


def test_padded_batches_make_the_same_images_and_drop_the_pad_rows(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"p{i}" for i in range(9)],
                              guidance_scale=[7.5] * 7 + [1.0] * 2)  # two groups: 7 rows with guidance, 2 without
    outputs = {}
    for name, pad in (("plain", False), ("padded", True)):
        runner = make_runner(manifest, tmp_path / name, batch_size=4, pad_batches=pad)
        seen = record_unet_batches(monkeypatch, runner.pipe)
        assert [(r["images"], r["failures"]) for r in run_all(runner, 9, 9)] == [(9, 0)]
        meta, failures = read_dataset(tmp_path / name)
        assert sorted(meta, key=int) == [str(i) for i in range(9)] and not failures
        written = sorted(p.name for p in (tmp_path / name / "images/shard-000000").iterdir())
        assert written == sorted(f"{i}.png" for i in range(9))
        outputs[name] = check_images(tmp_path / name, meta)
        # Guided rows go through the UNet as a whole batch of 2 samples each: 4 rows, then 3 (padded to 4 or not).
        guided = {n for n, _, _ in seen if n > 1}
        assert guided == ({8} if pad else {8, 6}), (name, seen)
    assert outputs["padded"] == outputs["plain"]


def test_out_of_memory_halves_the_batch_for_its_size_and_keeps_the_images(tmp_path, pipe, monkeypatch):
    # Rows of 64x64, and one of 64x72 that runs out of memory even alone; four 64x64 rows at once do too.
    heights = [64, 64, 64, 64, 64, 72, 64, 64]
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"p{i}" for i in range(8)], height=heights)
    runner = make_runner(manifest, tmp_path / "out", batch_size=4, pad_batches=True)
    seen = record_unet_batches(monkeypatch, runner.pipe, lambda x: len(x) > 4 or x.shape[-2] == 72 // 8)
    results = run_all(runner, 8, 4)
    assert [(r["images"], r["failures"]) for r in results] == [(4, 0), (3, 1)]
    # The first batch of four 64x64 rows ran out of memory; after it, two rows at a time, in the next shard too
    # (whose last 64x64 row goes alone: the smallest bucket that holds it).
    assert [n for n, h, oom in seen if h == 8 and oom] == [8]
    assert [n for n, h, oom in seen if h == 8 and not oom] == [4] * 4 + [4] * 2 + [2] * 2  # 2 steps a batch
    assert [n for n, h, oom in seen if h == 9] == [2, 2]  # a row alone (no padding past it), tried twice
    assert runner.batch_sizes.rows(64, 64) == 2 and runner.batch_sizes.rows(72, 64) == 4  # only a batch halves it
    meta, failures = read_dataset(tmp_path / "out")
    assert sorted(meta, key=int) == ["0", "1", "2", "3", "4", "6", "7"] and list(failures) == ["5"]
    assert failures["5"]["attempts"] == 2 and failures["5"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    pngs = check_images(tmp_path / "out", meta)
    for image_id in meta:
        assert (pixels(pngs[image_id]) == reference(pipe, f"p{image_id}", seed_of(image_id))).all(), image_id


def test_each_call_prepares_the_next_one_before_it_waits_for_its_images(tmp_path, pipe, monkeypatch):
    # Two groups (steps 2 and 3): batches of 2, 1 and 2 rows; the next call may be in the next group.
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"p{i}" for i in range(5)], steps=[2, 2, 2, 3, 3])
    runner = make_runner(manifest, tmp_path / "out", batch_size=2)
    calls, real = [], runner.pipe.generate

    def generate(prompts, **kwargs):
        calls.append((list(prompts), kwargs["prepared"] is not None))
        return real(prompts, **kwargs)

    monkeypatch.setattr(runner.pipe, "generate", generate)
    assert [(r["images"], r["failures"]) for r in run_all(runner, 5, 5)] == [(5, 0)]
    assert calls == [(["p0", "p1"], False), (["p2"], True), (["p3", "p4"], True)]
    meta, _ = read_dataset(tmp_path / "out")
    pngs = check_images(tmp_path / "out", meta)
    for image_id, row in meta.items():
        assert (pixels(pngs[image_id]) == reference(pipe, row["prompt"], row["seed"], steps=row["steps"])).all()


def test_a_compiled_actor_compiles_the_default_size_before_its_first_shard(tmp_path):
    from torch._dynamo.utils import counters

    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a", "b"])
    torch._dynamo.reset()
    counters.clear()
    runner = make_runner(manifest, tmp_path / "out", batch_size=2, compile=True)
    compiled_at_start = counters["stats"]["unique_graphs"]
    assert compiled_at_start > 0
    run_all(runner, 2, 2)
    assert counters["stats"]["unique_graphs"] == compiled_at_start  # the shard's rows met no new shape
    meta, _ = read_dataset(tmp_path / "out")
    assert sorted(meta) == ["0", "1"]


def test_the_model_runs_on_one_thread_whichever_thread_calls(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a", "b", "c", "d"])
    threads, in_shard, release = [], threading.Event(), threading.Event()
    real_load = actor.load_pipeline

    def load_pipeline(*args, **kwargs):
        threads.append(threading.get_ident())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(actor, "load_pipeline", load_pipeline)
    body = OneThreadRunner(ActorConfig(manifest=str(manifest), output=str(tmp_path / "out"), model=MODEL,
                                       defaults=DEFAULTS, device="cpu", batch_size=2))

    def on_a_new_thread(call, *args):  # as Ray runs each call, on a thread of its pool
        result = []
        caller = threading.Thread(target=lambda: result.append(call(*args)))
        caller.start()
        return caller, result

    caller, _ = on_a_new_thread(body.start)
    caller.join()
    real_generate = body.runner.pipe.generate

    def generate(prompts, **kwargs):
        threads.append(threading.get_ident())
        in_shard.set()
        assert release.wait(30)
        return real_generate(prompts, **kwargs)

    monkeypatch.setattr(body.runner.pipe, "generate", generate)
    for shard in shards(4, 2):
        caller, result = on_a_new_thread(body.run_shard, shard)
        assert in_shard.wait(30)
        assert body.progress() == (shard.id, 0)  # answers while the shard waits in the model thread
        release.set()
        caller.join()
        assert result[0]["images"] == 2
        in_shard.clear(), release.clear()
    assert len(threads) == 3 and len(set(threads)) == 1 and threads[0] != threading.get_ident()
    body.runner.close()


# --- actors under the driver, on a local Ray --------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray()  # 2 CPUs: room for two 1-core actors
    yield
    ray.shutdown()


def run_driver(manifest, out, *, on_dispatch=None, **options) -> tuple[driver.RunResult, str]:
    opts = driver.RunOptions(manifest=str(manifest), model=options.pop("model", MODEL), output=str(out),
                             defaults=DEFAULTS, device="cpu", **options)
    stream = io.StringIO()  # stands in for stderr (not a terminal: one progress line per update)
    return driver.run(opts, stream=stream, on_dispatch=on_dispatch), stream.getvalue()


@pytest.fixture
def varied_manifest(tmp_path):
    """Rows that differ in every way that changes batching: sizes, steps, schedulers (also the
    stochastic ones), guidance, negative prompts, several images per row."""
    n = 11
    return write_manifest(
        tmp_path / "varied.parquet",
        id=[f"r{i}" for i in range(n)],
        prompt=[f"a photo of thing {i}" for i in range(n)],
        scheduler=["ddim", "euler_a", "ddpm", "ddim", "dpmpp_2m", "euler_a", "ddim", "lms", "ddim", "ddpm", "pndm"],
        height=[64, 64, 72, 64, 64, 72, 64, 64, 64, 64, 64],
        steps=[2, 2, 2, 3, 2, 2, 2, 2, 3, 2, 2],
        guidance_scale=[7.5, 7.5, 7.5, 1.0, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5],
        negative_prompt=[None, "blurry", None, None, None, None, "ugly", None, None, None, None],
        num_images=[1, 2, 1, 1, 1, 1, 3, 1, 1, 1, 1],
        label=[f"L{i}" for i in range(n)],
    )


def test_output_does_not_depend_on_actors_batches_or_shards(tmp_path, local_ray, varied_manifest):
    a, _ = run_driver(varied_manifest, tmp_path / "a", actors=1, batch_size=1, shard_size=3)
    b, log = run_driver(varied_manifest, tmp_path / "b", actors=2, batch_size=4, shard_size=7)
    assert (a.images, a.failures, a.shards_run) == (14, 0, 5) and (b.images, b.failures, b.shards_run) == (14, 0, 2)
    assert sum(s.images for s in b.actors) == 14
    assert {s.allocator for s in a.actors + b.actors} == {allocator.KEPT}  # CPU actors own their processes
    meta_a, _ = read_dataset(tmp_path / "a")
    meta_b, _ = read_dataset(tmp_path / "b")
    assert sorted(meta_a) == sorted(meta_b) and len(meta_a) == 14
    pngs_a, pngs_b = check_images(tmp_path / "a", meta_a), check_images(tmp_path / "b", meta_b)
    for image_id in meta_a:
        assert pngs_a[image_id] == pngs_b[image_id], image_id
        differs = {k for k in meta_a[image_id] if meta_a[image_id][k] != meta_b[image_id][k]}
        assert differs <= {*TIMING, "image_path"}, (image_id, differs)
    assert "images 14/14 (100%)" in log
    for out in ("a", "b"):
        success = json.loads((tmp_path / out / "_SUCCESS").read_text())
        assert success["images"] == 14 and success["failures"] == 0


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_an_actor_killed_mid_shard_is_replaced_and_its_shard_redone(tmp_path, local_ray, pipe, output_format):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"p{i}" for i in range(8)], steps=[8] * 8)
    out = tmp_path / "out"
    killed = {}

    def on_dispatch(actor, shard):
        if shard.id != "shard-000001" or killed:
            return
        killed["shard"] = shard.id

        def kill_when_it_has_started():  # once the shard has an image (a webdataset holds it until the commit)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and ray.get(actor.progress.remote()) < (shard.id, 1):
                time.sleep(0.005)
            killed["was_done"] = (out / "metadata" / f"{shard.id}.parquet").exists()
            ray.kill(actor)

        threading.Thread(target=kill_when_it_has_started, daemon=True).start()

    result, log = run_driver(manifest, out, actors=2, batch_size=2, shard_size=4, on_dispatch=on_dispatch,
                             format=output_format)
    assert killed == {"shard": "shard-000001", "was_done": False}
    assert result.actor_restarts == 1 and "starting a replacement" in log
    meta, failures = read_dataset(out)
    assert sorted(meta, key=int) == [str(i) for i in range(8)] and not failures
    pngs = check_images(out, meta)
    for image_id in ("4", "7"):  # the redone shard's images are the right ones
        assert (pixels(pngs[image_id]) == reference(pipe, f"p{image_id}", seed_of(image_id), steps=8)).all()
    assert (out / "_SUCCESS").exists()


def test_a_shard_that_keeps_killing_its_actor_goes_to_failures(tmp_path, local_ray, monkeypatch):
    monkeypatch.setattr(driver, "SHARD_ATTEMPTS", 2)
    manifest = write_manifest(tmp_path / "m.parquet", prompt=[f"p{i}" for i in range(6)])
    out = tmp_path / "out"

    def on_dispatch(actor, shard):
        if shard.id == "shard-000001":
            ray.kill(actor)

    result, log = run_driver(manifest, out, actors=1, shard_size=2, on_dispatch=on_dispatch)
    assert result.actor_restarts == 2 and (result.images, result.failures) == (4, 2)
    meta, failures = read_dataset(out)
    assert sorted(meta) == ["0", "1", "4", "5"] and sorted(failures) == ["2", "3"]
    assert failures["2"]["attempts"] == 2 and "gave up after 2 attempts" in failures["2"]["error"]
    assert failures["2"]["prompt"] == "p2" and failures["2"]["seed"] == seed_of("2")
    assert not (out / "images" / "shard-000001").exists() or not any((out / "images" / "shard-000001").iterdir())
    assert json.loads((out / "_SUCCESS").read_text())["failures"] == 2
    assert "shard-000001: gave up" in log


def test_a_rerun_of_a_finished_job_changes_nothing_and_another_model_needs_overwrite(tmp_path, local_ray):
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a", "b"])
    out = tmp_path / "out"
    run_driver(manifest, out)
    before = snapshot(out)
    again, _ = run_driver(manifest, out)
    assert (again.shards_run, again.shards_skipped, again.images) == (0, 1, 2) and snapshot(out) == before
    folder = write_tiny_folder(tmp_path / "tiny-folder")
    with pytest.raises(OutputError, match="holds a different job .*model_fingerprint: builtin:tiny/v1 there, sha256:"):
        run_driver(manifest, out, model=str(folder))
    assert snapshot(out) == before
    result, _ = run_driver(manifest, out, model=str(folder), mode="overwrite")
    assert result.images == 2
    job = json.loads((out / "_sdbatch" / "job.json").read_text())
    assert job["model"] == str(folder) and job["identity"]["model_fingerprint"].startswith("sha256:")
    meta, _ = read_dataset(out)
    assert {r["model"] for r in meta.values()} == {str(folder)}
    # Same weights, same image, within a level: oneDNN's kernels pick their code path by where a weight
    # lies in memory (checked: a 1x1 conv's low bits move with its weight's address mod 64), and the
    # folder's weights are memory-mapped at the files' offsets, builtin:tiny's in aligned memory.
    now, then = (torch.tensor(pixels(p)).int() for p in (check_images(out, meta)["0"], before["images/shard-000000/0.png"][1]))
    assert (now - then).abs().max().item() <= 1
    assert Output(str(out)).status().success is not None
