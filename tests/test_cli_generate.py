"""`sdbatch generate`: one image with its parameters, and bad arguments refused before any model load."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdcore
from jobs import sink
from sdcore.builtin import write_tiny_adapters
from sdcore.embeddings import add_embeddings, read_embedding
from sdcore.images import fit_image, fit_mask
from sdcore.lora import Adapters, read_lora

SDBATCH = str(Path(sys.executable).parent / "sdbatch")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SDBATCH, "generate", *args], capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def test_writes_the_pipeline_image_with_its_parameters(tmp_path):
    out = tmp_path / "fox.png"
    result = run("a red fox in snow", "--model", "builtin:tiny", "--seed", "7", "--steps", "3", "--scheduler", "dpmpp_2m",
                 "--guidance-scale", "5", "--width", "64", "--height", "72", "--negative-prompt", "blurry", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "step 3/3" in result.stderr
    params = sink.read_params(out.read_bytes())
    assert params | {"scheduler_config": None} == {
        "prompt": "a red fox in snow", "negative_prompt": "blurry", "seed": 7, "steps": 3, "guidance_scale": 5.0,
        "width": 64, "height": 72, "scheduler": "dpmpp_2m", "mode": "txt2img", "strength": None,
        "init_image_sha256": None, "mask_image_sha256": None, "loras": [], "embeddings": [], "resize": None,
        "scheduler_config": None, "model": "builtin:tiny",
        "model_fingerprint": "builtin:tiny/v1", "model_revision": None, "sdbatch_version": sink.SDBATCH_VERSION,
    }
    assert params["scheduler_config"]["name"] == "dpmpp_2m" and params["scheduler_config"]["beta_schedule"] == "scaled_linear"
    # --dtype auto on the CPU is fp32, sdcore's own default
    expected = sdcore.load_pipeline("builtin:tiny").generate(
        ["a red fox in snow"], seeds=[7], negative_prompts=["blurry"], steps=3, guidance_scale=5, height=72, width=64,
        scheduler="dpmpp_2m", output="np")[0]
    assert np.array_equal(np.asarray(Image.open(out)), expected)


def test_inpaints_with_a_lora_and_a_learned_token(tmp_path):
    files = write_tiny_adapters(tmp_path)
    init = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)  # fitted to 64x64
    Image.fromarray(init).save(tmp_path / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    result = run("a <toy> on a table", "--model", "builtin:tiny", "--seed", "3", "--steps", "4", "--scheduler", "euler_a", "--width", "64",
                 "--height", "64", "--init-image", str(tmp_path / "init.png"), "--mask-image", str(tmp_path / "mask.png"),
                 "--strength", "0.75", "--resize", "crop", "--lora", f"style={files['lora']}", "--loras", "style:0.7",
                 "--embedding", f"<toy>={files['embedding']}", "-o", str(out))
    assert result.returncode == 0, result.stderr
    params = sink.read_params(out.read_bytes())
    assert (params["mode"], params["strength"], params["resize"]) == ("inpaint", 0.75, "crop")
    assert params["mask_image_sha256"] == hashlib.sha256((tmp_path / "mask.png").read_bytes()).hexdigest()
    assert [(e["name"], e["scale"]) for e in params["loras"]] == [("style", 0.7)]
    assert [e["token"] for e in params["embeddings"]] == ["<toy>"]

    pipe = sdcore.load_pipeline("builtin:tiny")
    add_embeddings(pipe, [read_embedding(files["embedding"], "<toy>")])
    Adapters(pipe).activate([(read_lora(files["lora"], "style"), 0.7)])
    expected = pipe.generate(["a <toy> on a table"], seeds=[3], steps=4, height=64, width=64, scheduler="euler_a", output="np", strength=0.75,
                             init_images=[fit_image(Image.open(tmp_path / "init.png"), 64, 64, "crop")],
                             mask_images=[fit_mask(Image.open(tmp_path / "mask.png"), 64, 64, "crop")])[0]
    assert np.array_equal(np.asarray(Image.open(out)), expected)


def test_an_init_image_that_does_not_decode_exits_2_before_loading(tmp_path):
    (tmp_path / "init.png").write_bytes(b"not a picture")
    result = run("a fox", "--model", "builtin:tiny", "-o", str(tmp_path / "x.png"), "--init-image", str(tmp_path / "init.png"))
    assert result.returncode == 2
    assert f"--init-image {tmp_path / 'init.png'}: not an image format Pillow reads (13 bytes, beginning b'not a pi')" \
        in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.png").exists()


def test_a_strength_that_leaves_no_step_exits_2_before_loading(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "init.png")
    result = run("a fox", "--model", "builtin:tiny", "-o", str(tmp_path / "x.png"), "--init-image",
                 str(tmp_path / "init.png"), "--strength", "0.1", "--steps", "5")
    assert result.returncode == 2
    assert ("--strength 0.1 --steps 5: strength 0.1 of 5 steps leaves no step to denoise (it needs strength x steps "
            ">= 1)") in result.stderr
    assert "Traceback" not in result.stderr and "step 1/" not in result.stderr and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--width", "65"], "--width 65 must be a multiple of 8"),
    (["--steps", "0"], "--steps 0 is out of range 1..1000"),
    (["--scheduler", "heun"], "Invalid value for '--scheduler': Value error, 'heun' is not one of 'ddpm', 'ddim'"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such file or directory"),
    (["--dtype", "fp8"], "Invalid value for '--dtype': Value error, 'fp8' is not one of 'auto', 'fp32', 'fp16', 'bf16'."),
    (["--quality", "80"], "--quality applies to jpeg and webp; png is lossless"),
    (["--image-format", "jpeg", "--quality", "0"], "--quality must be 1..100, got 0"),
    (["--image-format", "webp"], "x.png: the name says png, but --image-format is webp"),
    (["--strength", "0"], "--strength 0.0 must be a number in 0 < strength <= 1"),
    (["--resize", "fill"], "Invalid value for '--resize': Value error, 'fill' is not one of 'stretch', 'crop'"),
    (["--mask-image", "m.png"], "--mask-image needs --init-image: inpainting repaints the masked part"),
    (["--init-image", "/no/such/init.png"], "No such file or directory: '/no/such/init.png'"),
    (["--lora", "cat=/no/cat.safetensors"], "--lora cat: /no/cat.safetensors: no such file or directory"),
    (["--loras", "cat:0.5"], "--loras cat:0.5: cat not declared; declare each with --lora NAME=SRC"),
    (["--loras", "cat:big"], "'cat:big': the scale 'big' is not a number"),
    (["--embedding", "owl"], "--embedding 'owl': expected NAME=PATH_OR_URI"),
])
def test_bad_arguments_exit_2_before_loading(tmp_path, args, message):
    out = tmp_path / "x.png"
    result = run("a fox", "--model", "builtin:tiny", "-o", str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "step 1/" not in result.stderr
    assert not out.exists()


def test_webp_carries_the_parameters_in_its_exif(tmp_path):
    out = tmp_path / "fox.webp"
    result = run("a fox, ünïcode", "--model", "builtin:tiny", "--steps", "1", "--width", "64", "--height", "64",
                 "--image-format", "webp", "--quality", "80", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sink.read_params(out.read_bytes())["prompt"] == "a fox, ünïcode"
    with Image.open(out) as im:
        assert im.format == "WEBP" and im.size == (64, 64)


def test_unloadable_model_is_a_clear_error(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    result = run("a fox", "--model", str(folder), "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "sdbatch: error:" in result.stderr and "Traceback" not in result.stderr


def test_compile_gives_the_eager_image_up_to_rounding(tmp_path):
    out = tmp_path / "owl.png"
    result = run("an owl", "--model", "builtin:tiny", "--seed", "3", "--steps", "3", "--width", "64", "--height", "64",
                 "--scheduler", "ddim", "--compile", "-o", str(out))
    assert result.returncode == 0, result.stderr
    eager = sdcore.load_pipeline("builtin:tiny").generate(["an owl"], seeds=[3], steps=3, height=64, width=64,
                                                               scheduler="ddim", output="np")[0]
    compiled = np.asarray(Image.open(out)).astype(int)
    assert np.abs(compiled - eager).max() <= 2


def test_compile_without_a_compiler_is_refused_before_the_first_step(tmp_path):
    out = tmp_path / "x.png"
    result = run("a fox", "--model", "builtin:tiny", "--compile", "-o", str(out), env={"CXX": "/nonexistent/c++"})
    assert result.returncode == 2
    assert "sdbatch: error: --compile: torch.compile cannot build code for cpu" in result.stderr
    assert "/nonexistent/c++" in result.stderr and "Traceback" not in result.stderr and "step 1/" not in result.stderr
    assert not out.exists()
