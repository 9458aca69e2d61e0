"""The cluster path: docker/Dockerfile, the Makefile's pins, cluster.yaml, docs/aws-iam/,
k8s/rayjob.yaml and docs/cluster.md: valid, consistent with each other, and commands that run.

Nothing here builds an image or reaches a cloud: cluster.yaml goes through the same schema check
and default filling that `ray up` does before it contacts AWS, and the container's start command
is the one Ray's own docker command runner writes.
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
from ray.autoscaler._private.docker import docker_start_cmds
from ray.autoscaler._private.util import prepare_config, validate_config
from typer._click.core import Context  # typer carries its own click
from typer._click.exceptions import UsageError

from jobs.cli import app

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
IAM = ROOT / "docs" / "aws-iam"
CACHE_ENV = "SDBATCH_MODEL_CACHE"  # the variable sdbatch reads its model cache folder from


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


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


def shell_lines() -> dict[str, list[str]]:
    """The shell lines we give users, continuation lines joined, by file."""
    texts = {
        "k8s/rayjob.yaml": [load(RAYJOB)["spec"]["entrypoint"]],
        # The commands in cluster.yaml's header comment, indented by three spaces.
        "cluster.yaml": [l[1:] for l in CLUSTER.read_text().splitlines() if l.startswith("#   ")],
        "docs/cluster.md": re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S),
    }
    return {where: "\n".join(t).replace("\\\n", " ").splitlines() for where, t in texts.items()}


def sdbatch_commands() -> list[tuple[str, list[str], list[str]]]:
    """Every `sdbatch ...` command that we give users: (where, what comes before it, argv)."""
    found = []
    for where, lines in shell_lines().items():
        for line in lines:
            argv = shlex.split(line, comments=True) if re.search(r"(^|\s)sdbatch\s", line) else []
            # the command itself, or the one that `ray job submit ... --` runs
            at = next((i for i, a in enumerate(argv) if a == "sdbatch" and (i == 0 or argv[i - 1] == "--")), None)
            if at is not None:
                found.append((where, argv[:at], argv[at:]))
    return found


def cluster_run_commands() -> list[tuple[str, list[str]]]:
    """The `sdbatch run` commands that run on a cluster: submitted as Ray jobs, or the RayJob's."""
    return [(where, argv) for where, before, argv in sdbatch_commands()
            if argv[1] == "run" and (where == "k8s/rayjob.yaml" or before[:3] == ["ray", "job", "submit"])]


def iam_commands() -> list[list[str]]:
    """Every `aws iam ...` command of docs/cluster.md, as argv."""
    lines = shell_lines()["docs/cluster.md"]
    return [shlex.split(line, comments=True) for line in lines if line.startswith("aws iam ")]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def instance_profiles() -> tuple[str, dict[str, str]]:
    """(the head's instance profile, {worker node type: its instance profile}) of cluster.yaml."""
    config = load(CLUSTER)
    types = config["available_node_types"]
    profile = {name: t["node_config"].get("IamInstanceProfile", {}).get("Name") for name, t in types.items()}
    head = config["head_node_type"]
    return profile.pop(head), profile


def role_of_profile() -> dict[str, str]:
    """{instance profile: role}, as docs/cluster.md's commands put the roles in the profiles."""
    return {option(a, "--instance-profile-name"): option(a, "--role-name")
            for a in iam_commands() if a[2] == "add-role-to-instance-profile"}


def policy(name: str) -> dict:
    return json.loads((IAM / name).read_text())


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# --- cluster.yaml ----------------------------------------------------------------------------


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
    assert any(t["max_workers"] > 0 for t in workers.values())
    assert "--gpus all" not in " ".join(config["docker"]["run_options"])  # fails on the CPU head


def test_every_node_runs_the_image_that_make_push_pushes():
    config = prepare_config(load(CLUSTER))
    image = makefile_vars()["IMAGE"]
    assert config["docker"]["image"] == image
    for key in ("head_image", "worker_image"):
        assert config["docker"].get(key, image) == image, key
    for name, t in config["available_node_types"].items():
        assert t.get("docker", {}).get("worker_image", image) == image, name
    assert image.rsplit(":", 1)[1] == pyproject()["project"]["version"]  # tagged with the version it holds


def test_rays_docker_run_clears_the_images_entry_point():
    """Ray starts the container as `docker run ... IMAGE bash`: with the image's ENTRYPOINT
    (sdbatch) in place that would run `sdbatch bash`, so run_options must reset it."""
    config = prepare_config(load(CLUSTER))
    docker = config["docker"]
    for name, t in config["available_node_types"].items():
        options = docker["run_options"] + t.get("docker", {}).get("worker_run_options", [])
        command = docker_start_cmds("ubuntu", docker["image"], {}, docker["container_name"], options,
                                    config["cluster_name"], "/root", "docker")
        argv = shlex.split(command)  # as the node's shell runs it
        at = argv.index(docker["image"])
        assert argv[at + 1:] == ["bash"], name
        assert "--entrypoint=" in argv[:at] or ["--entrypoint", ""] in [argv[i:i + 2] for i in range(at)], (name, command)


def test_nodes_install_nothing_at_boot():
    config = prepare_config(load(CLUSTER))  # Ray's defaults filled in: they pip install Ray and boto3
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        for command in config[key]:
            assert not re.search(r"\b(pip|conda|uv|apt-get|apt)\b.*\binstall\b", command), (key, command)
            assert "torch" not in command, (key, command)
    for name, t in config["available_node_types"].items():
        assert not t.get("worker_setup_commands"), name


def test_nothing_is_copied_to_the_nodes():
    config = prepare_config(load(CLUSTER))
    for remote, local in config["file_mounts"].items():
        path = (ROOT / Path(local).expanduser()).resolve()
        assert path != ROOT and ROOT not in path.parents, f"file_mounts copies {local} (the repository) to {remote}"
    assert not config["cluster_synced_files"]


def test_nodes_keep_the_model_in_a_host_folder():
    """The cache outlives the container (and a stopped node): a host folder mounted into it, and
    SDBATCH_MODEL_CACHE pointing there."""
    options = shlex.split(" ".join(load(CLUSTER)["docker"]["run_options"]))
    envs = dict(options[i + 1].split("=", 1) for i, o in enumerate(options) if o in ("-e", "--env"))
    mounts = dict(options[i + 1].split(":")[:2][::-1] for i, o in enumerate(options) if o in ("-v", "--volume"))
    cache = envs[CACHE_ENV]
    assert cache in mounts, f"{CACHE_ENV}={cache} is not a mounted host folder: {mounts}"
    assert mounts[cache].startswith("/")


# --- IAM: docs/aws-iam/ and the instance profiles cluster.yaml names --------------------------


def test_workers_have_an_instance_profile_of_their_own():
    head, workers = instance_profiles()
    assert head, "the head has no IamInstanceProfile: Ray would give it ray-autoscaler-v1, which cannot PassRole"
    for name, profile in workers.items():
        assert profile, f"{name}: workers get no IAM role by default, and they write the images"
        assert profile != head, f"{name}: the workers' profile is the head's (EC2 and PassRole on every worker)"
    assert "ray-autoscaler-v1" not in {head, *workers.values()}
    assert len(set(workers.values())) == 1  # one worker role, the one the head may pass


def test_head_may_pass_exactly_the_worker_role():
    # Each role has the name of its instance profile (docs/cluster.md creates them so).
    head, workers = instance_profiles()
    (worker_role,) = set(workers.values())
    statements = policy("head-policy.json")["Statement"]
    passing = [s for s in statements if any(a.lower() in ("iam:passrole", "iam:*", "*") for a in as_list(s["Action"]))]
    assert len(passing) == 1 and as_list(passing[0]["Action"]) == ["iam:PassRole"], passing
    (grant,) = passing
    assert grant["Effect"] == "Allow" and "NotResource" not in grant
    assert as_list(grant["Resource"]) == [f"arn:aws:iam::ACCOUNT_ID:role/{worker_role}"]
    assert grant["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    # Ray's autoscaler launches, finds, tags, starts, stops and terminates the workers.
    actions = {a for s in statements for a in as_list(s["Action"])}
    assert {"ec2:RunInstances", "ec2:CreateTags", "ec2:DescribeInstances", "ec2:StartInstances",
            "ec2:StopInstances", "ec2:TerminateInstances"} <= actions
    assert not any(a.startswith("iam:") for a in actions - {"iam:PassRole"})
    # It stops and terminates only this cluster's instances, by the tag Ray puts on them.
    for s in statements:
        if {"ec2:StopInstances", "ec2:TerminateInstances"} & set(as_list(s["Action"])):
            assert s["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": load(CLUSTER)["cluster_name"]}}


def test_worker_policy_is_the_bucket_and_nothing_else():
    for s in policy("worker-policy.json")["Statement"]:
        assert s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s
        for action in as_list(s["Action"]):
            assert action.startswith("s3:") and action != "s3:*", action
        for resource in as_list(s["Resource"]):
            assert resource in ("arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"), resource


def test_trust_policy_lets_ec2_instances_take_the_roles():
    (s,) = policy("trust-policy.json")["Statement"]
    assert (s["Effect"], s["Principal"], s["Action"]) == ("Allow", {"Service": "ec2.amazonaws.com"}, "sts:AssumeRole")


def test_documented_iam_commands_make_the_profiles_cluster_yaml_names():
    head, workers = instance_profiles()
    commands = iam_commands()
    roles = role_of_profile()
    assert all(role == profile for profile, role in roles.items()), roles  # head-policy.json names the role
    created_profiles = {option(a, "--instance-profile-name") for a in commands if a[2] == "create-instance-profile"}
    created_roles = {option(a, "--role-name") for a in commands if a[2] == "create-role"}
    assert {head, *workers.values()} <= created_profiles
    assert {roles[head], *(roles[p] for p in workers.values())} <= created_roles
    for a in commands:
        if a[2] == "create-role":
            assert option(a, "--assume-role-policy-document") == "file://docs/aws-iam/trust-policy.json"
    # Every policy document is one of docs/aws-iam/, as is or with its placeholders filled in by sed.
    inline = {}
    for a in commands:
        if a[2] == "put-role-policy":
            document = option(a, "--policy-document")
            source = re.search(r"(head|worker)-policy\.json$", document)
            assert source and (IAM / source.group(0)).exists(), document
            inline.setdefault(option(a, "--role-name"), set()).add(source.group(0))
    for p in workers.values():
        assert inline[roles[p]] == {"worker-policy.json"}
    assert inline[roles[head]] == {"worker-policy.json", "head-policy.json"}
    docs = DOCS.read_text()
    for name in ("worker-policy.json", "head-policy.json"):
        placeholders = set(re.findall(r"\b(BUCKET|ACCOUNT_ID)\b", (IAM / name).read_text()))
        for placeholder in placeholders:
            assert re.search(rf'sed "s/{placeholder}/\${placeholder}/g" docs/aws-iam/{name} >', docs), (name, placeholder)


def test_gpu_quota_is_named():
    """New AWS accounts may run 0 vCPUs of G and VT instances: the workers never launch."""
    for text in (CLUSTER.read_text(), DOCS.read_text()):
        assert "L-DB2E81BA" in text and "G and VT" in text


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
    assert project["project"]["scripts"]["sdbatch"] == "jobs.entry:main"
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
    assert images == {makefile_vars()["IMAGE"], load(CLUSTER)["docker"]["image"]} and len(images) == 1
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


# --- the commands we document ----------------------------------------------------------------


def resolve(argv: list[str]):
    """(the click command of `sdbatch ...`, its arguments)."""
    command, rest = typer.main.get_command(app), argv[1:]
    while hasattr(command, "commands"):  # a group
        name, rest = rest[0], rest[1:]
        command = command.get_command(Context(command), name)
        assert command is not None, f"{' '.join(argv)}: no command {name!r}"
    return command, rest


COMMANDS = sdbatch_commands()


def test_there_are_documented_commands_to_check():
    where = {w for w, _ in cluster_run_commands()}
    assert where == {"cluster.yaml", "docs/cluster.md", "k8s/rayjob.yaml"}, where
    assert any(argv[1] == "status" for w, _, argv in COMMANDS if w == "docs/cluster.md")


@pytest.mark.parametrize("where, before, argv", COMMANDS, ids=[f"{w}: {' '.join(a)[:50]}" for w, _, a in COMMANDS])
def test_documented_commands_parse(where, before, argv):
    """Every option exists, has a valid value, and every required argument is there."""
    command, rest = resolve(argv)
    try:
        command.make_context(" ".join(argv[:2]), list(rest), resilient_parsing=False)
    except UsageError as e:
        pytest.fail(f"{where}: `{' '.join(argv)}`: {e.format_message()}")


@pytest.mark.parametrize("where, argv", cluster_run_commands(), ids=[f"{w}: {' '.join(a)[:50]}" for w, a in cluster_run_commands()])
def test_cluster_run_commands(where, argv):
    options = [a.split("=")[0] for a in argv if a.startswith("--")]
    assert "--ray-address" not in options, f"{where}: inside the cluster sdbatch joins it by itself"
    assert "--actors" in options, f"{where}: without --actors a job uses the GPUs the cluster has when it starts"
    assert option(argv, "--device") == "cuda"
    model = option(argv, "--model")
    assert "://" in model or re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w.-]+)?", model), \
        f"{where}: --model {model} is a path on the nodes; the model comes from the Hub or the bucket"


def test_ray_job_commands_name_the_job_server():
    """`ray job ...` from your machine reaches the head only through `ray dashboard`'s tunnel."""
    jobs = [(where, shlex.split(l, comments=True)) for where, lines in shell_lines().items() if where != "k8s/rayjob.yaml"
            for l in lines if l.lstrip().startswith("ray job")]
    assert len(jobs) >= 4
    for where, argv in jobs:
        assert "--address" in argv and option(argv, "--address") == "http://localhost:8265", f"{where}: {shlex.join(argv)}"
