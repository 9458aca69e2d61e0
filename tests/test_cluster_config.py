"""cluster.yaml, k8s/rayjob.yaml, k8s/Dockerfile and docs/cluster.md: valid, consistent, runnable commands.

Nothing here reaches a cloud: cluster.yaml goes through the same schema check and default
filling that `ray up` does before it contacts AWS.
"""
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import typer.main
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
DOCKERFILE = ROOT / "k8s" / "Dockerfile"
DOCS = ROOT / "docs" / "cluster.md"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_image_version(image: str) -> str:
    """rayproject/ray:2.60.0-py311-gpu -> 2.60.0"""
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", image)
    assert match, f"not a rayproject/ray GPU image: {image}"
    return match.group(1)


def sdbatch_run_commands() -> list[tuple[str, list[str]]]:
    """Every `sdbatch run ...` command that we give users, as (where, argv)."""
    shell = {
        "k8s/rayjob.yaml": [load(RAYJOB)["spec"]["entrypoint"]],
        # The commands in cluster.yaml's header comment, indented by three spaces.
        "cluster.yaml": [l[1:] for l in CLUSTER.read_text().splitlines() if l.startswith("#   ")],
        "docs/cluster.md": re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S),
    }
    found = []
    for where, texts in shell.items():
        for line in "\n".join(texts).replace("\\\n", " ").splitlines():  # join continuation lines
            argv = shlex.split(line, comments=True)
            for i in range(len(argv) - 1):
                if argv[i:i + 2] == ["sdbatch", "run"]:
                    found.append((where, argv[i:]))
    return found


def test_cluster_yaml_passes_rays_own_validation():
    config = load(CLUSTER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written: no unknown or misspelt keys
    validate_config(prepare_config(config))  # as `ray up` sees it, defaults filled in


def test_cluster_yaml_layout():
    config = load(CLUSTER)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the driver needs no Ray resources; no actor lands on the head
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]
    for name, t in workers.items():
        assert t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= t["resources"]["GPU"], name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
        assert t["docker"]["worker_run_options"] == ["--gpus all"], name
        # Workers write images to the bucket, and Ray gives an IAM role only to the head.
        assert t["node_config"]["IamInstanceProfile"], name
    assert any(t["max_workers"] > 0 for t in workers.values())
    assert "--gpus all" not in " ".join(config["docker"]["run_options"])  # fails on the CPU head

    # torch (CUDA build) before sdbatch, sdbatch from the copy that file_mounts makes.
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*\btorch\b", c))
    sdbatch_at = next(i for i, c in enumerate(setup) if "[s3]" in c)
    assert torch_at < sdbatch_at
    mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert f'"{mount}[s3]"' in setup[sdbatch_at]
    assert {"**/.venv", "**/.git"} <= set(config["rsync_exclude"])


def test_rayjob_is_a_gpu_cluster_running_sdbatch():
    job = load(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = cluster["workerGroupSpecs"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    # rayStartParams are command-line flags: Kubernetes wants them as strings.
    for params in [head["rayStartParams"], gpu["rayStartParams"]]:
        assert all(isinstance(v, str) for v in params.values())

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[2].startswith("s3://") and argv[argv.index("--output") + 1].startswith("s3://")
    assert int(argv[argv.index("--actors") + 1]) == gpu["replicas"] * worker["resources"]["limits"]["nvidia.com/gpu"]
    # Weights land where --model points, on the head and on every worker.
    model = argv[argv.index("--model") + 1]
    for pod in [head["template"]["spec"], gpu["template"]["spec"]]:
        fetch = pod["initContainers"][0]
        mount = fetch["volumeMounts"][0]["mountPath"]
        assert model.startswith(mount + "/") and model in " ".join(fetch["command"])
        assert mount in [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]

    images = {c["image"] for spec in [head["template"]["spec"], gpu["template"]["spec"]]
              for c in spec["containers"] + spec["initContainers"]}
    assert len(images) == 1  # one image, built from k8s/Dockerfile


def test_ray_versions_agree():
    from_line = next(l for l in DOCKERFILE.read_text().splitlines() if l.startswith("FROM "))
    dockerfile = ray_image_version(from_line.split()[1])
    assert ray_image_version(load(CLUSTER)["docker"]["image"]) == dockerfile
    assert load(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"] == dockerfile


def test_dockerfile_installs_torch_before_sdbatch():
    runs = [l for l in DOCKERFILE.read_text().splitlines() if l.startswith("RUN ")]
    assert re.search(r"pip install .*\btorch\b", runs[0])
    assert "[s3]" in runs[-1]
    copied = " ".join(l for l in DOCKERFILE.read_text().splitlines() if l.startswith("COPY "))
    for needed in ["pyproject.toml", "sdcore", "jobs"]:
        assert needed in copied


@pytest.mark.parametrize("where, argv", sdbatch_run_commands(), ids=lambda v: v if isinstance(v, str) else v[2])
def test_documented_run_commands(where, argv):
    assert argv[:2] == ["sdbatch", "run"], where
    options = [a.split("=")[0] for a in argv if a.startswith("--")]
    assert "--model" in options and "--output" in options, where
    assert "--ray-address" not in options, f"{where}: inside the cluster sdbatch joins it by itself"


def test_documented_run_options_exist():
    from jobs.cli import app

    run = typer.main.get_command(app).commands.get("run")
    if run is None:
        pytest.skip("`sdbatch run` is not implemented yet")
    known = {opt for param in run.params for opt in param.opts + param.secondary_opts}
    for where, argv in sdbatch_run_commands():
        unknown = {a.split("=")[0] for a in argv if a.startswith("--")} - known
        assert not unknown, f"{where}: sdbatch run has no {sorted(unknown)}"
