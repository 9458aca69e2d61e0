"""cluster.yaml, k8s/rayjob.yaml, the image (docker/Dockerfile and the Makefile's pins) and
docs/cluster.md: valid, consistent, runnable commands.

Nothing here builds an image or reaches a cloud: cluster.yaml goes through the same schema check
and default filling that `ray up` does before it contacts AWS.
"""
import fnmatch
import json
import re
import shlex
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import typer.main
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
PYPROJECT = ROOT / "pyproject.toml"
DOCS = ROOT / "docs" / "cluster.md"
CACHE_ENV = "SDBATCH_MODEL_CACHE"  # the variable sdbatch reads its model cache folder from


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_image_version(image: str) -> str:
    """rayproject/ray:2.60.0-py311-gpu -> 2.60.0"""
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", image)
    assert match, f"not a rayproject/ray GPU image: {image}"
    return match.group(1)


def makefile_vars() -> dict[str, str]:
    """NAME := value, NAME ?= value and NAME = value lines of the Makefile."""
    found = re.findall(r"^([A-Z_]+)\s*[:?]?=[ \t]*(.*?)\s*$", MAKEFILE.read_text(), re.M)
    return dict(found)


def makefile_recipe(target: str) -> str:
    """The recipe of `target`, its continuation lines joined."""
    match = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", MAKEFILE.read_text(), re.M)
    assert match, f"Makefile has no target {target}"
    return match.group(1).replace("\\\n", " ")


def dockerfile_args() -> dict[str, str]:
    """ARG NAME=default, before and after FROM."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", DOCKERFILE.read_text(), re.M))


def dockerfile_instructions(name: str) -> list[str]:
    """The arguments of every `name` instruction, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [m.strip() for m in re.findall(rf"^{name}\s+(.*)$", text, re.M)]


def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


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


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


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


def test_ray_versions_agree():
    assert ray_image_version(load(CLUSTER)["docker"]["image"]) == makefile_vars()["RAY_VERSION"]

# --- the image: docker/Dockerfile, .dockerignore, the Makefile, pyproject.toml -----------------


def test_image_pins_are_the_makefiles_and_pyprojects():
    args, make = dockerfile_args(), makefile_vars()
    for name in ("TORCH_VERSION", "RAY_VERSION", "TORCH_CUDA", "CUDA_VERSION"):
        assert args[name] == make[name], f"Dockerfile ARG {name}={args[name]}, Makefile {name}={make[name]}"
    # PyTorch's index cu128 is CUDA 12.8, the base image's.
    assert args["TORCH_CUDA"] == "cu" + "".join(args["CUDA_VERSION"].split(".")[:2])
    requires = {Requirement(r).name: Requirement(r) for r in pyproject()["project"]["dependencies"]}
    assert requires["torch"].specifier.contains(args["TORCH_VERSION"]), requires["torch"]
    assert requires["ray"].specifier.contains(args["RAY_VERSION"]), requires["ray"]


def test_image_pins_are_what_the_tests_run():
    make = makefile_vars()
    assert version("torch").split("+")[0] == make["TORCH_VERSION"]
    assert version("ray") == make["RAY_VERSION"]
    venv = makefile_recipe(r"\$\(STAMP\)")
    assert "torch==$(TORCH_VERSION)" in venv and "ray[default]==$(RAY_VERSION)" in venv


def test_dockerfile_installs_the_pins():
    runs = " ".join(dockerfile_instructions("RUN"))
    assert '"torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in runs
    assert '"ray[default]==${RAY_VERSION}"' in runs
    (base,) = dockerfile_instructions("FROM")
    assert base.startswith("nvidia/cuda:${CUDA_VERSION}-")
    # torch before sdbatch, and sdbatch installed with torch and Ray held at their pins.
    install = next(r for r in dockerfile_instructions("RUN") if "[s3,gcs,hub]" in r)
    assert '"torch==${TORCH_VERSION}"' in install and '"ray[default]==${RAY_VERSION}"' in install
    assert runs.index("--index-url") < runs.index("[s3,gcs,hub]")


def test_make_image_builds_the_dockerfile_with_the_makefiles_pins():
    recipe = makefile_recipe("image")
    assert "docker build -f docker/Dockerfile" in recipe and "-t $(IMAGE) ." in recipe
    for name in dockerfile_args():
        assert f"--build-arg {name}=$({name})" in recipe, name
    assert "docker push $(IMAGE)" in makefile_recipe("push")


def test_image_installs_sdbatch_with_its_extras_and_runs_it():
    project = pyproject()
    extras = re.search(r"\[([\w,]+)\]\"", next(r for r in dockerfile_instructions("RUN") if "/tmp/sdbatch[" in r))
    assert set(extras.group(1).split(",")) == {"s3", "gcs", "hub"} <= set(project["project"]["optional-dependencies"])
    (entrypoint,) = dockerfile_instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == ["sdbatch"]
    assert project["project"]["scripts"]["sdbatch"] == "jobs.cli:program"
    # What pip needs to install the checkout: the metadata pyproject.toml names, every package.
    copied = " ".join(dockerfile_instructions("COPY")).split()
    needed = {"pyproject.toml", project["project"]["readme"], *project["project"]["license-files"]}
    needed |= {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    assert needed <= set(copied), needed - set(copied)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern that matches it or
    one of its parent folders decides (`!` lets it in). fnmatch stands in for Go's filepath.Match."""
    prefixes = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 2)]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            matches = any(fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pattern[3:]) for p in prefixes)
        else:
            matches = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if matches:
            ignored = not keep
    return ignored


def test_build_context_is_only_the_package():
    patterns = [l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    for path in ["pyproject.toml", "README.md", "LICENSE", "jobs/cli.py", "sdcore/pipeline.py",
                 "sdcore/assets/bpe_simple_vocab_16e6.txt.gz"]:
        assert (ROOT / path).exists() and not dockerignored(path, patterns), path
    for path in [".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so", "out/images/0.png", ".git/HEAD",
                 "sd15/unet/diffusion_pytorch_model.fp16.safetensors", "v1-5-pruned-emaonly.ckpt",
                 "sdcore/__pycache__/pipeline.cpython-311.pyc", "sdcore/weights.safetensors", "jobs/model.bin",
                 ".pytest_cache/v/cache/nodeids", "bench/results/run.json", "manifests/demo.parquet", "tests/data/x"]:
        assert dockerignored(path, patterns), path


# --- k8s/rayjob.yaml ---------------------------------------------------------------------------


def pod_specs(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


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
    assert argv[2].startswith("s3://") and option(argv, "--output").startswith("s3://")
    assert int(option(argv, "--actors")) == gpu["replicas"] * worker["resources"]["limits"]["nvidia.com/gpu"]


def test_rayjob_runs_the_image_and_fetches_nothing_before_ray_starts():
    job = load(RAYJOB)
    images = {c["image"] for spec in pod_specs(job) for c in spec["containers"]}
    assert images == {makefile_vars()["IMAGE"]}
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == makefile_vars()["RAY_VERSION"]
    for spec in pod_specs(job):
        assert not spec.get("initContainers"), "the actors fetch the model themselves"


def test_rayjob_workers_cache_the_model_on_their_node():
    (gpu,) = load(RAYJOB)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    spec = gpu["template"]["spec"]
    (container,) = spec["containers"]
    cache = {e["name"]: e["value"] for e in container["env"]}[CACHE_ENV]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == cache]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert {"emptyDir", "hostPath"} & set(volume), volume  # on the node, not a network volume


def test_rayjob_retries_and_cleans_up():
    spec = load(RAYJOB)["spec"]
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] > 0  # a failed attempt runs again (and resumes)
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    # ttlSecondsAfterFinished only counts with shutdownAfterJobFinishes; it deletes the RayCluster.
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and 0 <= spec["ttlSecondsAfterFinished"] <= 3600
    comment = RAYJOB.read_text().split("ttlSecondsAfterFinished:")[0].rsplit("shutdownAfterJobFinishes:", 1)[1]
    assert "RayCluster" in comment and "RayJob" in comment


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
