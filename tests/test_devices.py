"""Where actors run: a GPU slot always means CUDA, and a node where CUDA is unusable says why."""
import platform

import pytest
import torch

from jobs import devices
from jobs.driver import RunOptions, plan_actors


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
