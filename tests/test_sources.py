"""`--model` sources without Ray: which files are fetched, the node cache, the Hub through its cache.

The multi-node jobs that take their model from S3 are in tests/test_cluster_jobs.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch

import sdcore
from jobs import sources
from jobs.sources import SourceError
from reference import SD15
from sdcore import weights
from tests.jobdata import UNUSED_RELEASE_FILES, write_tiny_folder

RELEASE_FILES = (SD15 / "files.txt").read_text().split()
GENERATION_SMALL_FILES = {
    "model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny model in the SD v1.5 release's layout, with the files generation must not fetch."""
    return write_tiny_folder(tmp_path_factory.mktemp("release") / "sd15", release_layout=True)


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --- what a source is ---------------------------------------------------------------------------------

def test_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sd15").mkdir(parents=True)
    assert sources.parse("builtin:tiny").kind == "builtin"
    assert sources.parse("models/sd15").kind == "local"  # an existing path wins over a look-alike repo id
    assert sources.parse("./missing/folder").kind == "local"
    assert sources.parse("file:///data/sd15").text == "/data/sd15"
    assert sources.parse("s3://bucket/models/sd15/").kind == "uri"
    assert sources.parse("gs://bucket/v1-5-pruned-emaonly.safetensors").kind == "uri"
    hub = sources.parse("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert (hub.kind, hub.repo, hub.path, hub.revision) == ("hub", "stable-diffusion-v1-5/stable-diffusion-v1-5", "", None)
    hub = sources.parse("stable-diffusion-v1-5/stable-diffusion-v1-5/v1-5-pruned-emaonly.safetensors@39593d5")
    assert (hub.repo, hub.path, hub.revision) == ("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                  "v1-5-pruned-emaonly.safetensors", "39593d5")


def test_default_cache():
    assert sources.default_cache({"SDBATCH_MODEL_CACHE": "/c", "HF_HOME": "/hf"}) == Path("/c")
    assert sources.default_cache({"HF_HOME": "/hf"}) == Path("/hf/sdbatch")
    assert sources.default_cache({}) == Path.home() / ".cache" / "sdbatch"


# --- which files: the release's real file list ---------------------------------------------------------

@pytest.mark.parametrize("dtype, variant", [(torch.float32, ""), (torch.float16, ".fp16"), (torch.bfloat16, ".fp16")])
def test_the_release_folder_fetches_configs_tokenizer_and_one_weight_file_each(dtype, variant):
    kind, files = sources.select(RELEASE_FILES, dtype, "sd15")
    assert kind == "folder"
    assert set(files) == GENERATION_SMALL_FILES | {
        f"unet/diffusion_pytorch_model{variant}.safetensors", f"vae/diffusion_pytorch_model{variant}.safetensors",
        f"text_encoder/model{variant}.safetensors"}


def test_safetensors_before_pickles_and_the_other_variant_when_one_is_missing():
    no_fp16 = [f for f in RELEASE_FILES if ".fp16." not in f]
    assert "unet/diffusion_pytorch_model.safetensors" in sources.select(no_fp16, torch.float16, "x")[1]
    only_pickles = [f for f in RELEASE_FILES if not f.endswith(".safetensors")]
    assert "unet/diffusion_pytorch_model.bin" in sources.select(only_pickles, torch.float32, "x")[1]
    assert "text_encoder/pytorch_model.fp16.bin" in sources.select(only_pickles, torch.float16, "x")[1]


def test_incomplete_and_foreign_folders_are_named():
    no_vae = [f for f in RELEASE_FILES if not f.startswith("vae/")]
    with pytest.raises(SourceError, match=r"no vae/config.json; no vae/diffusion_pytorch_model.safetensors"):
        sources.select(no_vae, torch.float32, "s3://b/sd15")
    with pytest.raises(SourceError, match="SDXL"):
        sources.select(RELEASE_FILES + ["text_encoder_2/config.json"], torch.float32, "x")


def test_single_files_prefer_ema_only_safetensors():
    top = [f for f in RELEASE_FILES if "/" not in f and f != "model_index.json"]  # single files, no diffusers folder
    assert sources.select(top, torch.float32, "x") == ("file", ["v1-5-pruned-emaonly.safetensors"])
    assert sources.select(["v1-5-pruned-emaonly.ckpt", "v1-5-pruned.ckpt"], torch.float32, "x") == (
        "file", ["v1-5-pruned-emaonly.ckpt"])
    assert sources.select(["a.safetensors", "a.fp16.safetensors"], torch.float16, "x") == ("file", ["a.fp16.safetensors"])
    with pytest.raises(SourceError, match="several checkpoints .*a.safetensors, b.safetensors"):
        sources.select(["a.safetensors", "b.safetensors"], torch.float32, "x")
    with pytest.raises(SourceError, match="neither a diffusers folder"):
        sources.select(["README.md", "model.onnx"], torch.float32, "x")


def test_the_loader_reads_the_variant_that_was_fetched(release, tmp_path):
    """Loading picks the same file per dtype as the selection (one rule, sdcore.weights.weight_file_names)."""
    for dtype, variant in ((torch.float32, ""), (torch.float16, ".fp16")):
        fetched = sources.select(sorted(files_under(release)), dtype, "x")[1]
        alone = tmp_path / f"alone{variant}"
        for rel in fetched:
            (alone / rel).parent.mkdir(parents=True, exist_ok=True)
            (alone / rel).write_bytes((release / rel).read_bytes())
        assert sdcore.load_pipeline(release, dtype=dtype).fingerprint == sdcore.load_pipeline(alone, dtype=dtype).fingerprint


# --- fsspec URIs: the node cache --------------------------------------------------------------------------

@pytest.fixture
def remote(release):
    """The release-layout folder in an fsspec memory file system (a stand-in for a bucket, in-process)."""
    fs = fsspec.filesystem("memory")
    root = f"/models-{os.getpid()}/sd15"
    fs.put(str(release), root, recursive=True)
    yield f"memory://{root}", fs, root
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_a_folder_uri_fetches_only_what_generation_reads_once(remote, release, tmp_path):
    url, fs, root = remote
    sources.check(url)
    first = sources.resolve(url, cache=tmp_path / "cache")
    local = Path(first.path)
    assert files_under(local) - {".lock"} - {f for f in files_under(local) if f.startswith(".sdbatch/")} == (
        set(sources.select(sorted(files_under(release)), torch.float32, "x")[1]))
    assert not set(UNUSED_RELEASE_FILES) & files_under(local)
    assert first.downloaded_files == 12 and first.revision.startswith("files:")
    assert {f["path"] for f in first.files} == set(files_under(local)) - {".lock"} - {
        f for f in files_under(local) if f.startswith(".sdbatch/")}
    assert sdcore.load_pipeline(local).fingerprint == sdcore.load_pipeline(release).fingerprint

    again = sources.resolve(url, cache=tmp_path / "cache")
    assert (again.path, again.downloaded_files, again.revision) == (first.path, 0, first.revision)

    # a changed remote file is fetched again, alone, and changes the revision
    fs.pipe(f"{root}/scheduler/scheduler_config.json", (release / "scheduler" / "scheduler_config.json").read_bytes() + b" ")
    changed = sources.resolve(url, cache=tmp_path / "cache")
    assert changed.downloaded_files == 1 and changed.revision != first.revision

    # half precision fetches the fp16 weights, and the loader then reads those
    half = sources.resolve(url, cache=tmp_path / "cache", dtype=torch.float16)
    assert half.downloaded_files == 3
    assert {f["path"] for f in half.files} >= {"unet/diffusion_pytorch_model.fp16.safetensors"}


def test_a_damaged_or_half_written_cache_is_never_used(remote, release, tmp_path):
    url, _, _ = remote
    local = Path(sources.resolve(url, cache=tmp_path / "cache").path)
    unet = local / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])  # truncated behind the cache's back
    stale = local / ".partial" / "0123.part"  # what a download killed halfway leaves
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half")
    repaired = sources.resolve(url, cache=tmp_path / "cache")
    assert repaired.downloaded_files == 1 and not stale.exists()
    assert unet.read_bytes() == (release / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_a_download_killed_halfway_leaves_no_file_in_the_cache(tmp_path):
    """A process killed in the middle of a file: the file never enters the cache, and the next
    resolve cleans up what it left."""
    big = write_tiny_folder(tmp_path / "big", text_encoder_padding=3 * sources.CHUNK)
    url, cache = f"memory:///killed-{os.getpid()}", tmp_path / "cache"
    child = f"""
import os, signal, fsspec
from jobs import sources
fs = fsspec.filesystem("memory")
fs.put({str(big)!r}, {url.removeprefix("memory://")!r}, recursive=True)
open_file = type(fs)._open
def killing_open(self, path, mode="rb", **kwargs):  # dies reading the big file's second chunk
    f = open_file(self, path, mode, **kwargs)
    if path.endswith("text_encoder/model.safetensors"):
        read = f.read
        f.read = lambda n=-1: os.kill(os.getpid(), signal.SIGKILL) if f.tell() else read(n)
    return f
type(fs)._open = killing_open
sources.resolve({url!r}, cache={str(cache)!r})
"""
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    (local,) = (cache / "fsspec").iterdir()
    assert [p.stat().st_size for p in (local / ".partial").iterdir()]  # all it left is a temporary file
    assert files_under(local) - {".lock"} == {".sdbatch/text_encoder/config.json.json", "text_encoder/config.json"} | {
        p.relative_to(local).as_posix() for p in (local / ".partial").iterdir()}

    fs = fsspec.filesystem("memory")
    fs.put(str(big), url.removeprefix("memory://"), recursive=True)
    try:
        resolved = sources.resolve(url, cache=cache)
    finally:
        fs.rm(url.removeprefix("memory://"), recursive=True)
    # The stand-in bucket was written anew here, so every file has a new version and is fetched again.
    assert resolved.downloaded_files == 6 and not list((local / ".partial").iterdir())
    assert sdcore.load_pipeline(resolved.path).fingerprint == sdcore.load_pipeline(big).fingerprint


def test_a_single_file_uri_and_missing_sources(remote, tmp_path):
    url, fs, root = remote
    fs.pipe(f"{root}/model.safetensors", fs.cat(f"{root}/unet/diffusion_pytorch_model.safetensors"))
    resolved = sources.resolve(f"{url}/model.safetensors", cache=tmp_path / "cache")
    assert Path(resolved.path).name == "model.safetensors" and resolved.downloaded_files == 1
    with pytest.raises(SourceError, match="no such file or folder"):
        sources.check(f"{url}-missing/")
    with pytest.raises(SourceError, match="expected a diffusers folder or a .safetensors / .ckpt file"):
        sources.check(f"{url}/model_index.json")
    with pytest.raises(SourceError, match="no such file or directory"):
        sources.check(str(tmp_path / "nothing-here"))


# --- Hugging Face repo ids, offline through a pre-populated cache ------------------------------------------

COMMIT = "39593d5650112b4cc580433f6b0435385882d819"


def populate_hub_cache(hub_cache: Path, repo: str, folder: Path, files: list[str]) -> Path:
    """What `snapshot_download` leaves in a Hugging Face cache (files in a snapshot of the commit,
    `refs/main` naming it), without the network."""
    repo_dir = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    for rel in files:
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).write_bytes((folder / rel).read_bytes())
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_a_hub_repo_id_resolves_from_the_cache_offline(release, tmp_path):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # tests/conftest.py: nothing may reach the network
    snapshot = populate_hub_cache(tmp_path / "cache" / "hub", "acme/tiny-sd", release, sorted(files_under(release)))
    sources.check("acme/tiny-sd", cache=tmp_path / "cache")
    resolved = sources.resolve("acme/tiny-sd", cache=tmp_path / "cache")
    assert Path(resolved.path) == snapshot and resolved.revision == COMMIT and resolved.downloaded_files == 0
    assert {f["path"] for f in resolved.files} == set(sources.select(sorted(files_under(release)), torch.float32, "x")[1])
    assert sdcore.load_pipeline(resolved.path).fingerprint == sdcore.load_pipeline(release).fingerprint
    assert sources.resolve(f"acme/tiny-sd@{COMMIT}", cache=tmp_path / "cache").path == resolved.path

    with pytest.raises(SourceError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        sources.check("acme/other-model", cache=tmp_path / "cache")
    with pytest.raises(SourceError, match="not in the Hugging Face cache"):
        sources.check("acme/tiny-sd@v2", cache=tmp_path / "cache")


def test_a_hub_single_file_by_its_path(release, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "repo" / "v1-5-pruned.safetensors").write_bytes(b"y" * 10)
    names = ["v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors"]
    snapshot = populate_hub_cache(tmp_path / "cache" / "hub", "acme/single", tmp_path / "repo", names)
    assert sources.resolve("acme/single", cache=tmp_path / "cache").path == str(snapshot / names[0])
    assert sources.resolve(f"acme/single/{names[1]}", cache=tmp_path / "cache").path == str(snapshot / names[1])


def test_generate_takes_a_hub_id_from_hf_home(release, tmp_path):
    """The CLI with the Hub's own cache (HF_HOME), as a user with a pre-downloaded model runs it."""
    populate_hub_cache(tmp_path / "hf" / "hub", "acme/tiny-sd", release, sorted(files_under(release)))
    env = {k: v for k, v in os.environ.items() if k not in ("SDBATCH_MODEL_CACHE", "HF_HUB_CACHE")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "fox.png"
    sdbatch = Path(sys.executable).parent / "sdbatch"
    r = subprocess.run([str(sdbatch), "generate", "a fox", "--model", "acme/tiny-sd", "--steps", "2", "--width", "64",
                        "--height", "64", "-o", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    from jobs.sink import read_params

    params = read_params(out.read_bytes())
    assert params["model"] == "acme/tiny-sd" and params["model_revision"] == COMMIT
    r = subprocess.run([str(sdbatch), "generate", "a fox", "--model", "acme/not-there", "-o", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "acme/not-there: not in the Hugging Face cache" in r.stderr


def test_scorer_layouts_select_only_what_the_scorers_read():
    clip_repo = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
                 "vocab.json", "merges.txt", "tokenizer.json", "preprocessor_config.json", "README.md"]
    assert sources.select(clip_repo, torch.float32, "x", sources.CLIP) == (
        "folder", ["config.json", "model.safetensors", "vocab.json", "merges.txt"])
    assert sources.select(RELEASE_FILES, torch.float16, "sd15", sources.SAFETY_CHECKER) == (
        "folder", ["safety_checker/config.json", "safety_checker/model.fp16.safetensors",
                   "feature_extractor/preprocessor_config.json"])
    assert sources.select(["README.md", "sac+logos+ava1-l14-linearMSE.pth"],
                          torch.float32, "x", sources.AESTHETIC) == ("file", ["sac+logos+ava1-l14-linearMSE.pth"])
    for available, layout, message in (
        (clip_repo, sources.SAFETY_CHECKER, "--safety-checker x: .*name the folder that holds it"),
        ([f for f in RELEASE_FILES if not f.startswith("feature_extractor/")], sources.SAFETY_CHECKER,
         "no feature_extractor/preprocessor_config.json"),
        (["config.json", "vocab.json"], sources.CLIP, "--clip-model x: no model.safetensors"),
        (["README.md", "a.pth", "b.pth"], sources.AESTHETIC, "--aesthetic-model x: holds several checkpoints"),
        (["README.md"], sources.AESTHETIC, "--aesthetic-model x: expected a .safetensors / .pth file"),
    ):
        with pytest.raises(SourceError, match=message):
            sources.select(available, torch.float32, "x", layout)


def test_scorers_resolve_from_uris_and_the_hub_like_models(release, tmp_path):
    from sdcore import scorer_weights
    from tests.scorerdata import TINY_PROJECTION, reference_safety_checker, save_aesthetic, save_safety_checker, \
        tiny_clip_folder

    tiny_clip_folder(tmp_path / "scorers" / "clip")
    (tmp_path / "scorers" / "clip" / "flax_model.msgpack").write_bytes(b"not read")
    save_safety_checker(reference_safety_checker(), tmp_path / "scorers" / "sd")
    save_aesthetic(tmp_path / "scorers" / "aesthetic.pth", TINY_PROJECTION)
    fs, root = fsspec.filesystem("memory"), f"/scorers-{os.getpid()}"
    fs.put(str(tmp_path / "scorers"), root, recursive=True)
    try:
        clip = sources.resolve(f"memory://{root}/clip", cache=tmp_path / "cache", layout=sources.CLIP)
        assert {f["path"] for f in clip.files} == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
        scorer_weights.load_clip(clip.path)
        checker = sources.resolve(f"memory://{root}/sd", cache=tmp_path / "cache", layout=sources.SAFETY_CHECKER)
        assert checker.downloaded_files == 3
        assert scorer_weights.load_safety_checker_folder(checker.path)[1] == 224
        aesthetic = sources.resolve(f"memory://{root}/aesthetic.pth", cache=tmp_path / "cache",
                                    layout=sources.AESTHETIC)
        scorer_weights.load_aesthetic_predictor(aesthetic.path)
        with pytest.raises(SourceError, match="--clip-model memory://.*: no such file or folder"):
            sources.check(f"memory://{root}/nope", layout=sources.CLIP)
    finally:
        fs.rm(root, recursive=True)

    # The model's own safety checker, from a Hub repo: only its three files are fetched
    populate_hub_cache(tmp_path / "cache" / "hub", "acme/tiny-sd", release, sorted(files_under(release)))
    sources.check("acme/tiny-sd", cache=tmp_path / "cache", layout=sources.SAFETY_CHECKER)
    resolved = sources.resolve("acme/tiny-sd", cache=tmp_path / "cache", layout=sources.SAFETY_CHECKER)
    assert {f["path"] for f in resolved.files} == {"safety_checker/config.json", "safety_checker/model.safetensors",
                                                   "feature_extractor/preprocessor_config.json"}
