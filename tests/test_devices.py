"""Where actors run and in what precision: a GPU slot always means CUDA, and a node where CUDA is
unusable says why; --dtype auto is fp16 on CUDA and fp32 on the CPU, decided before any actor
starts, and a resumed dataset keeps the dtype it was made in."""
import platform

import pytest
import torch

from jobs import devices
from jobs.driver import RunOptions, plan_actors, plan_job, resolve_job_dtype
from jobs.sink import OutputError
from tests.jobdata import write_manifest


def options(**changes) -> RunOptions:
    return RunOptions(manifest="m.parquet", model="builtin:tiny", output="out", **changes)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_actors_on_gpu_slots_resolve_to_cuda_never_the_cpu(device):
    plan = plan_actors(options(device=device), {"GPU": 2.0, "CPU": 16.0})
    assert (plan.count, plan.resources, plan.device, plan.cpu_threads) == (2, {"num_gpus": 1, "num_cpus": 1}, "cuda", None)
    assert plan_actors(options(device=device, actors=3), {"GPU": 2.0}).note.startswith("--actors 3, but the cluster has 2 GPU(s)")


def test_without_gpus_auto_plans_cpu_actors_of_one_thread():
    plan = plan_actors(options(device="auto", actors=2), {"CPU": 8.0})
    assert (plan.count, plan.resources, plan.device, plan.cpu_threads) == (2, {"num_cpus": 1}, "cpu", 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_node_without_it_names_the_node_and_the_reason():
    with pytest.raises(ValueError) as e:
        devices.resolve_device("cuda")
    assert str(e.value).startswith(f"--device cuda: no CUDA device is usable on {platform.node()}: ")
    assert str(e.value).endswith(devices.why_no_cuda())
    if torch.version.cuda is None:
        assert "is a build without CUDA" in str(e.value)
    assert devices.resolve_device("auto") == torch.device("cpu")  # the driver's own choice stays free


@pytest.mark.parametrize("device, auto", [("cpu", "fp32"), ("cuda", "fp16"), (torch.device("cuda", 1), "fp16")])
def test_auto_dtype_follows_the_device_and_explicit_dtypes_stay(device, auto):
    assert devices.dtype_name("auto", device) == auto
    assert devices.resolve_dtype("auto", device) == devices.DTYPES[auto]
    for name, dtype in devices.DTYPES.items():
        assert devices.resolve_dtype(name, device) == dtype
    with pytest.raises(ValueError, match="--dtype must be one of auto, fp32, fp16, bf16, got 'fp8'"):
        devices.resolve_dtype("fp8", device)


@pytest.fixture
def tf32_off():
    """Both TF32 flags off for the test, and as they were after it: they are process-wide."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("device, dtype, tf32", [
    ("cuda", torch.float32, True),
    ("cuda", torch.float16, False),
    ("cuda", torch.bfloat16, False),
    ("cpu", torch.float32, False),
])
def test_tf32_only_for_fp32_on_cuda(tf32_off, device, dtype, tf32):
    devices.prepare_backend(torch.device(device), dtype)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)


@pytest.fixture
def new_job(tmp_path):
    """RunOptions for a 3-row manifest into an empty OUT."""
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["a cat", "a dog", "an owl"])
    return lambda **changes: RunOptions(manifest=str(manifest), model="builtin:tiny", output=str(tmp_path / "out"),
                                        **changes)


@pytest.mark.parametrize("cluster, dtype", [({"GPU": 2.0, "CPU": 16.0}, "fp16"), ({"CPU": 16.0}, "fp32")])
def test_a_new_dataset_with_auto_takes_the_dtype_of_the_planned_actors(new_job, cluster, dtype):
    opts = new_job()
    assert opts.dtype == "auto"
    job, _ = plan_job(opts)
    assert job.dtype is None  # not known before the actors' device is
    resolve_job_dtype(job, plan_actors(opts, cluster))
    assert job.dtype == dtype and job.settings["dtype_requested"] == "auto"


def test_a_resume_with_auto_keeps_the_recorded_dtype_on_any_machine(new_job):
    job, out = plan_job(new_job(dtype="bf16"))
    job.model_fingerprint = "builtin:tiny/v1"  # as the first actor reports it
    out.prepare(job)  # job.json
    for cluster in ({"GPU": 2.0}, {"CPU": 16.0}):
        opts = new_job()
        resumed, _ = plan_job(opts)
        resolve_job_dtype(resumed, plan_actors(opts, cluster))
        assert resumed.dtype == "bf16"
    job, _ = plan_job(new_job(mode="overwrite"))  # a new dataset in its place: auto decides anew
    assert job.dtype is None
    with pytest.raises(OutputError, match="dtype: bf16 there, fp32 now"):
        plan_job(new_job(dtype="fp32"))
