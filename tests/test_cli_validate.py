"""`sdbatch validate` and `sdbatch status` as a user runs them: exit codes, stdout, stderr."""
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from typer.testing import CliRunner

from jobs import sink
from jobs.cli import app
from jobs.manifest import Defaults, open_manifest
from jobs.sink import JobSpec, Output

SDBATCH = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "sdbatch")


def sdbatch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([SDBATCH, *map(str, args)], capture_output=True, text=True, timeout=60)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("sdbatch: error: ")
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({
        "prompt": ["a cat", "a dog", "an owl"], "width": [512, 768, 512], "num_images": [1, 3, 1], "label": ["c", "d", "o"],
    }), path)
    return path


def test_validate_prints_a_summary(good):
    r = sdbatch("validate", good, "--steps", 20, "--scheduler", "ddim")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{good}: OK\n")
    for line in ("rows             3", "images           5", "pass-through     label",
                 "sizes (images)   768x512: 3, 512x512: 2", "schedulers       ddim: 5", "denoising steps  100 (20.0 per image)"):
        assert line in r.stdout


def test_validate_bad_manifest_exits_2_with_one_line(tmp_path):
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"prompt": ["a"] * 20, "steps": [20] * 4 + [0] + [20] * 4 + [0] + [20] * 7 + [1500] + [20] * 2}), path)
    r = sdbatch("validate", path)
    assert_user_error(r)
    assert r.stderr == f"sdbatch: error: {path}: column 'steps': 3 rows out of range 1..1000 (rows 4, 9, 17: 0, 0, 1500)\n"


def test_validate_typo_column(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "negative_promt": ["blurry"]}), path)
    assert_user_error(sdbatch("validate", path), "unknown column 'negative_promt': did you mean 'negative_prompt'?")


def test_validate_missing_and_non_parquet_files(tmp_path):
    assert_user_error(sdbatch("validate", tmp_path / "nope.parquet"), "nope.parquet: no such file")
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n")
    assert_user_error(sdbatch("validate", text), "prompts.txt: not a Parquet file")


def test_validate_bad_defaults_and_options(good):
    assert_user_error(sdbatch("validate", good, "--steps", 0, "--height", 100), "--steps 0 is out of range 1..1000",
                      "--height 100 must be a multiple of 8")
    r = sdbatch("validate", good, "--scheduler", "karras")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert "Invalid value for '--scheduler': Value error, 'karras' is not one of 'ddpm', 'ddim'" in r.stderr
    assert_user_error(sdbatch("validate", good, "--storage-option", "anon"), "--storage-option 'anon': expected key=value")


def test_validate_checks_loras_images_and_adapter_files(tmp_path):
    (tmp_path / "cat.safetensors").write_bytes(b"lora")
    (tmp_path / "in.png").write_bytes(b"png")
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"], "id": ["c", "d"], "init_image": ["in.png", None],
                             "strength": [0.3, None], "loras": ["cat:0.5", "dog"]}), path)
    cat = f"cat={tmp_path / 'cat.safetensors'}"
    assert_user_error(sdbatch("validate", path, "--lora", cat),
                      "column 'loras': 1 row naming a LoRA that is not declared (row 1: 'dog'; ids 'd'); declared: cat")
    r = sdbatch("validate", path, "--lora", cat, "--lora", f"dog={tmp_path / 'cat.safetensors'}", "--strength", 0.5,
                "--resize", "crop")
    assert r.returncode == 0, r.stderr
    assert "modes (images)   img2img: 1, txt2img: 1" in r.stdout
    assert_user_error(sdbatch("validate", path, "--lora", cat, "--lora", f"dog={tmp_path / 'dog.safetensors'}"),
                      f"--lora dog: {tmp_path / 'dog.safetensors'}: no such file or directory")
    assert_user_error(sdbatch("validate", path, "--lora", cat, "--lora", cat), "--lora cat: declared twice")
    assert_user_error(sdbatch("validate", path, "--strength", 1.5), "--strength 1.5 must be a number in 0 < strength <= 1")


def test_version_is_the_one_the_metadata_records():
    r = sdbatch("--version")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == f"sdbatch {sink.SDBATCH_VERSION}\n"


@pytest.mark.parametrize("command", ["validate", "run", "generate"])
def test_help_lists_the_choices(command):
    r = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "--scheduler <ddpm|ddim|pndm|euler|euler_a|dpmpp_2m|dpmpp_2m_karras|lms>" in r.stdout
    if command != "validate":
        assert "--device <auto|cuda|cpu>" in r.stdout and "--dtype <auto|fp32|fp16|bf16>" in r.stdout


def test_status(tmp_path, good):
    assert_user_error(sdbatch("status", tmp_path / "missing"), "not an sdbatch dataset")
    out = Output(str(tmp_path / "out"))
    with open_manifest(str(good)) as m:
        out.prepare(JobSpec(manifest=str(good), manifest_fingerprint=m.fingerprint(), model="builtin:tiny",
                            model_fingerprint="f", rows=3, images=5, shard_size=2, defaults=Defaults(), dtype="fp32"))
    r = sdbatch("status", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "shards    0/3 done (3 remaining)" in r.stdout and "rows      0/3 done" in r.stdout  # 5 images in shards of 2
    assert "images    0/5 written" in r.stdout and "_SUCCESS  no" in r.stdout
