"""Image to image and inpainting: equality with diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (per-row generators), per-row independence, images, bad input."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sdcore
from tests.reference import (
    TINY_CLIP,
    TINY_UNET,
    TINY_VAE,
    reference_pipeline,
    reference_text_encoder,
    reference_unet,
    reference_vae,
    sd15_config,
    write_diffusers_folder,
)
from tests.test_pipeline import tiny_folder, tiny_pipe  # noqa: F401  (fixtures)

# diffusers mixes numpy 2 and tensors in ways numpy warns about.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SCHEDULERS = ["ddpm", "ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms"]
PROMPTS, SEEDS = ["a red fox in snow", "a lighthouse at dusk"], [7, 123]
SIZE = 64  # pixels, both sides: 8x8 latents


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory):
    """A tiny model whose UNet is an inpainting one (9 input channels), as stable-diffusion-inpainting."""
    return write_diffusers_folder(tmp_path_factory.mktemp("tiny-inpainting"), reference_unet({**TINY_UNET, "in_channels": 9}),
                                  reference_vae(TINY_VAE), reference_text_encoder(TINY_CLIP))


@pytest.fixture(scope="module")
def inpainting_pipe(inpainting_folder):
    return sdcore.load_pipeline(str(inpainting_folder))


def init_images(height=SIZE, width=SIZE) -> list[np.ndarray]:
    """Two pictures with structure (gradients) and texture (noise), one per row."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for row in range(2):
        smooth = np.stack([np.sin(3 * x + row), np.cos(4 * y - row), x * y], axis=-1) * 100 + 128
        images.append(np.clip(smooth + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8))
    return images


def mask_images(height=SIZE, width=SIZE) -> list[np.ndarray]:
    """A rectangle to repaint per row, with soft edges so that binarizing at 128 matters."""
    y, x = np.mgrid[0:height, 0:width]
    first = np.where((x > width // 4) & (y > height // 3), 255, 0)
    second = np.clip((x - width / 2) * 16 + 128, 0, 255)
    return [first.astype(np.uint8), second.astype(np.uint8)]


def reference(folder, scheduler: str, kind: str):
    """diffusers' StableDiffusion{kind}Pipeline over the same folder, with the same scheduler."""
    import diffusers

    pipe = getattr(diffusers, f"StableDiffusion{kind}Pipeline").from_pipe(reference_pipeline(folder, scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def reference_run(pipe, rows: list[int], steps: int, strength: float, masks: bool):
    """The reference's latents [B, 4, h, w] and uint8 images [B, H, W, 3] for the given rows, one generator each."""
    kwargs = dict(image=[Image.fromarray(init_images()[i]) for i in rows])
    if masks:
        kwargs |= dict(mask_image=[Image.fromarray(mask_images()[i]) for i in rows], height=SIZE, width=SIZE)
    latents = pipe([PROMPTS[i] for i in rows], num_inference_steps=steps, strength=strength, guidance_scale=7.5,
                   generator=[torch.Generator("cpu").manual_seed(SEEDS[i]) for i in rows], output_type="latent",
                   **kwargs).images
    pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    decoded = pipe.image_processor.postprocess(pixels, output_type="np")
    return latents, (decoded * 255).round().astype(np.uint8)


def our_run(pipe, rows: list[int], steps: int, strength: float, masks: bool, scheduler: str, output: str):
    return pipe.generate([PROMPTS[i] for i in rows], seeds=[SEEDS[i] for i in rows], steps=steps, height=SIZE, width=SIZE,
                         guidance_scale=7.5, scheduler=scheduler, output=output, strength=strength,
                         init_images=[init_images()[i] for i in rows],
                         mask_images=[mask_images()[i] for i in rows] if masks else None)


def assert_equals_reference(ours_pipe, reference_pipe, scheduler: str, steps: int, strength: float, masks: bool):
    """Both rows in one batch equal the reference's (latents to float32 rounding, images within uint8 2), and a row
    alone equals itself in the batch."""
    their_latents, their_images = reference_run(reference_pipe, [0, 1], steps, strength, masks)
    run = dict(steps=steps, strength=strength, masks=masks, scheduler=scheduler)
    our_latents = torch.stack(our_run(ours_pipe, [0, 1], output="latent", **run))
    our_images = np.stack(our_run(ours_pipe, [0, 1], output="np", **run))
    scale = their_latents.abs().max().item()
    assert scale > 0.1  # not a comparison of two near-zero tensors
    # The random tiny UNet's latents grow large (tens): float32 rounding is relative to that.
    assert (our_latents - their_latents).abs().max().item() <= 1e-4 * max(1.0, scale / 10)
    diff = int(np.abs(our_images.astype(int) - their_images.astype(int)).max())
    assert diff <= 2, (scheduler, strength, diff)
    assert torch.equal(our_run(ours_pipe, [1], output="latent", **run)[0], our_latents[1])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_img2img_equals_diffusers_with_per_row_generators(tiny_folder, tiny_pipe, scheduler):
    assert_equals_reference(tiny_pipe, reference(tiny_folder, scheduler, "Img2Img"), scheduler, steps=5, strength=0.6,
                            masks=False)


@pytest.mark.parametrize("scheduler, strength", [("euler", 1.0), ("ddim", 1.0), ("lms", 0.25), ("pndm", 0.25),
                                                 ("dpmpp_2m_karras", 0.25)])
def test_img2img_strength_edges_equal_diffusers(tiny_folder, tiny_pipe, scheduler, strength):
    assert_equals_reference(tiny_pipe, reference(tiny_folder, scheduler, "Img2Img"), scheduler, steps=8,
                            strength=strength, masks=False)


def test_img2img_denoises_the_last_strength_x_steps_steps(tiny_pipe):
    seen = []
    tiny_pipe.generate(PROMPTS[:1], seeds=SEEDS[:1], steps=10, height=SIZE, width=SIZE, strength=0.55, output="latent",
                       init_images=init_images()[:1], progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]


@pytest.mark.parametrize("unet, scheduler, strength", [
    ("plain", "euler_a", 1.0), ("plain", "ddim", 0.7), ("plain", "dpmpp_2m_karras", 0.7),
    ("inpainting", "ddpm", 1.0), ("inpainting", "euler_a", 0.7), ("inpainting", "lms", 0.7),
])
def test_inpainting_equals_diffusers(request, unet, scheduler, strength):
    folder = request.getfixturevalue("tiny_folder" if unet == "plain" else "inpainting_folder")
    pipe = request.getfixturevalue("tiny_pipe" if unet == "plain" else "inpainting_pipe")
    assert pipe.inpainting_unet == (unet == "inpainting")
    assert_equals_reference(pipe, reference(folder, scheduler, "Inpaint"), scheduler, steps=5, strength=strength,
                            masks=True)


def test_inpainting_with_a_plain_unet_keeps_the_unmasked_latents(tiny_pipe):
    latents = our_run(tiny_pipe, [0], steps=3, strength=1.0, masks=True, scheduler="euler_a", output="latent")[0]
    kept = tiny_pipe.prepare(PROMPTS[:1], seeds=SEEDS[:1], height=SIZE, width=SIZE, strength=1.0,
                             init_images=init_images()[:1], mask_images=mask_images()[:1])
    keep = kept.mask[0] == 0
    assert keep.any() and (~keep).any()
    assert torch.equal(latents[keep.expand_as(latents)], kept.init_latents[0][keep.expand_as(latents)])


def test_inputs_prepared_ahead_give_the_same_images(inpainting_pipe):
    rows = dict(seeds=SEEDS, height=SIZE, width=SIZE, strength=0.7, init_images=init_images(), mask_images=mask_images())
    kwargs = dict(rows, steps=3, scheduler="euler_a", output="latent")
    plain = inpainting_pipe.generate(PROMPTS, **kwargs)
    ahead = inpainting_pipe.generate(PROMPTS, **kwargs, prepared=inpainting_pipe.prepare(PROMPTS, **rows))
    assert all(torch.equal(a, b) for a, b in zip(plain, ahead))
    other_masks = [255 - m for m in mask_images()]
    with pytest.raises(ValueError, match="prepared for other rows"):
        inpainting_pipe.generate(PROMPTS, **kwargs, prepared=inpainting_pipe.prepare(PROMPTS, **rows | dict(mask_images=other_masks)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask_images=mask_images()), "mask images need init images"),
    (dict(init_images=init_images(SIZE, 32)), r"init image 0 must be a uint8 array of shape \(64, 64, 3\).*got uint8 \(64, 32, 3\)"),
    (dict(init_images=[x.astype(np.float32) for x in init_images()]), "init image 0 must be a uint8 array"),
    (dict(init_images=init_images()[:1]), "one init image per prompt, got 1 for 2"),
    (dict(init_images=init_images(), mask_images=mask_images(32, 32)), r"mask image 0 must be a uint8 array of shape \(64, 64\)"),
    (dict(init_images=init_images(), strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(init_images=init_images(), strength=1.5), r"strength must be in \(0, 1\]"),
    (dict(init_images=init_images(), strength=0.1), "strength 0.1 of 5 steps leaves no step to denoise"),
])
def test_bad_image_inputs(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe.generate(PROMPTS, seeds=SEEDS, steps=5, height=SIZE, width=SIZE, output="latent", **kwargs)


@pytest.mark.parametrize("kwargs", [{}, dict(init_images=init_images())])
def test_inpainting_unet_refuses_rows_without_init_image_and_mask(inpainting_pipe, kwargs):
    with pytest.raises(ValueError, match="inpainting UNet .*needs an init image and a mask image"):
        inpainting_pipe.generate(PROMPTS, seeds=SEEDS, steps=2, height=SIZE, width=SIZE, **kwargs)


# --- full SD v1.5 size ---------------------------------------------------------------------------

@pytest.mark.full_size
@pytest.mark.parametrize("mode", ["img2img", "inpaint-plain", "inpaint-9ch"])
def test_full_size_equals_diffusers(full_sd15_folder, tmp_path, mode):
    folder = full_sd15_folder
    scheduler, kind = ("euler_a", "Img2Img") if mode == "img2img" else ("ddpm", "Inpaint")
    if mode == "inpaint-9ch":
        # A release-size UNet with 9 input channels, beside the full-size folder's other components.
        folder = tmp_path / "inpainting"
        folder.mkdir()
        for entry in os.listdir(full_sd15_folder):
            if entry != "unet":
                (folder / entry).symlink_to(full_sd15_folder / entry)
        reference_unet({**sd15_config("unet"), "in_channels": 9}).save_pretrained(folder / "unet")
    ours = sdcore.load_pipeline(str(folder))
    assert ours.inpainting_unet == (mode == "inpaint-9ch")
    assert_equals_reference(ours, reference(folder, scheduler, kind), scheduler, steps=3, strength=0.7,
                            masks=mode != "img2img")
