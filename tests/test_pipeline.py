"""Text-to-image pipeline: per-row determinism and equality with diffusers' StableDiffusionPipeline."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import sdcore
from sdcore import cpu
from sdcore.batching import Batching
from sdcore.cpu import CPUKernels
from sdcore.errors import NonFiniteOutputError
from sdcore.vae import Decoder
from tests.reference import (
    TINY_CLIP,
    TINY_UNET,
    TINY_VAE,
    reference_pipeline,
    reference_text_encoder,
    reference_unet,
    reference_vae,
    write_diffusers_folder,
)

PROMPTS = ["a red fox in snow", "an astronaut riding a horse", "", "a bowl of fruit, oil painting"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_diffusers_folder(
        tmp_path_factory.mktemp("tiny-sd"), reference_unet(TINY_UNET), reference_vae(TINY_VAE), reference_text_encoder(TINY_CLIP)
    )


@pytest.fixture(scope="module")
def tiny_pipe(tiny_folder):
    return sdcore.load_pipeline(str(tiny_folder))


@pytest.fixture(scope="module")
def builtin_pipe():
    return sdcore.load_pipeline("builtin:tiny")


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("scheduler, guidance_scale", [("ddpm", 7.5), ("euler_a", 7.5), ("dpmpp_2m", 7.5), ("euler_a", 1.0)])
@pytest.mark.usefixtures("few_threads")
def test_image_does_not_depend_on_its_batch(builtin_pipe, scheduler, guidance_scale):
    kwargs = dict(steps=4, guidance_scale=guidance_scale, height=64, width=48, scheduler=scheduler, output="np")
    seeds = [7, 8, 9, 10]
    together = builtin_pipe.generate(PROMPTS, seeds=seeds, **kwargs)
    alone = [builtin_pipe.generate([p], seeds=[s], **kwargs)[0] for p, s in zip(PROMPTS, seeds)]
    reordered = builtin_pipe.generate(PROMPTS[::-1], seeds=seeds[::-1], **kwargs)[::-1]
    for a, b, c in zip(together, alone, reordered):
        assert png_bytes(a) == png_bytes(b) == png_bytes(c)
    assert not np.array_equal(together[0], together[1]), "different rows should give different images"


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
@pytest.mark.usefixtures("few_threads")
def test_rows_of_other_guidance_share_a_batch_and_give_their_own_images(builtin_pipe, scheduler, monkeypatch):
    kwargs = dict(steps=2, height=32, width=32, scheduler=scheduler, output="latent")
    guidance, seeds = [7.5, 1.0, 3.0, 0.0], [7, 8, 9, 10]
    unet_rows, forward = [], builtin_pipe.unet.forward
    monkeypatch.setattr(builtin_pipe.unet, "forward", lambda x, *args: unet_rows.append(len(x)) or forward(x, *args))
    together = builtin_pipe.generate(PROMPTS, seeds=seeds, guidance_scale=guidance, **kwargs)
    # The guided rows share CFG's batch; the unguided ones go as they would alone (sdcore.batching).
    assert unet_rows == [4, 1, 1] * 2
    for prompt, seed, g, latents in zip(PROMPTS, seeds, guidance, together):
        alone = builtin_pipe.generate([prompt], seeds=[seed], guidance_scale=g, **kwargs)[0]
        assert torch.equal(latents, alone), g

    # As on a GPU: one CFG batch of every row, and the unguided rows still unguided.
    monkeypatch.setattr(builtin_pipe, "batching", Batching.for_device("cuda", torch.float32))
    unet_rows.clear()
    one_batch = builtin_pipe.generate(PROMPTS, seeds=seeds, guidance_scale=guidance, **kwargs)
    assert unet_rows == [8] * 2
    for a, b in zip(one_batch, together):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="guidance scale"):
        builtin_pipe.generate(PROMPTS, seeds=seeds, guidance_scale=[7.5, 1.0], **kwargs)


def test_inputs_prepared_ahead_give_the_same_images_and_before_wait_comes_last(builtin_pipe):
    rows = dict(seeds=[7, 8], guidance_scale=[7.5, 1.0], height=32, width=32)
    kwargs = dict(rows, steps=2, scheduler="euler_a", output="np")  # euler_a draws step noise from each row's generator
    plain = builtin_pipe.generate(PROMPTS[:2], **kwargs)
    events = []
    ahead = builtin_pipe.generate(PROMPTS[:2], **kwargs, prepared=builtin_pipe.prepare(PROMPTS[:2], **rows),
                                  progress=lambda step, total: events.append(step), before_wait=lambda: events.append("wait"))
    assert events == [1, 2, "wait"]  # every step queued before the host may prepare the next call
    assert all(np.array_equal(a, b) for a, b in zip(plain, ahead))
    with pytest.raises(ValueError, match="prepared for other rows"):
        builtin_pipe.generate(PROMPTS[1:3], **kwargs, prepared=builtin_pipe.prepare(PROMPTS[:2], **rows))


@pytest.mark.parametrize("few_threads", [2], indirect=True)
def test_on_the_cpu_guided_rows_share_the_unet_and_the_rest_go_a_row_at_a_time(builtin_pipe, monkeypatch, few_threads):
    monkeypatch.setattr(builtin_pipe, "batching", Batching.for_device("cpu", torch.float32, threads=few_threads))
    unet_rows, decoded_rows = [], []
    forward, decode = builtin_pipe.unet.forward, builtin_pipe.vae.decode
    monkeypatch.setattr(builtin_pipe.unet, "forward", lambda x, *args: unet_rows.append(len(x)) or forward(x, *args))
    monkeypatch.setattr(builtin_pipe.vae, "decode", lambda z: decoded_rows.append(len(z)) or decode(z))

    def calls(guidance_scale):
        unet_rows.clear(), decoded_rows.clear()
        builtin_pipe.generate(PROMPTS, seeds=[7, 8, 9, 10], steps=2, guidance_scale=guidance_scale, height=64, width=48,
                              scheduler="euler_a", output="np")
        return unet_rows[:], decoded_rows[:]

    assert calls(7.5) == ([8, 8], [1] * 4)  # each step one CFG batch of all four rows
    assert calls(1.0) == ([1] * 8, [1] * 4)
    # As after compile(): one shape to compile.
    monkeypatch.setattr(builtin_pipe, "batching", Batching.for_device("cpu", torch.float32, compiled=True, threads=2))
    assert calls(7.5) == ([2] * 8, [1] * 4)
    assert Batching.for_device("cpu", torch.bfloat16, threads=2).unet_rows(guided=True) == 1
    torch.set_num_threads(3)  # the few_threads fixture sets the count back
    monkeypatch.setattr(builtin_pipe, "batching", Batching.for_device("cpu", torch.float32))
    assert calls(7.5) == ([2] * 8, [1] * 4)


def test_same_seed_same_image_other_seed_other_image(builtin_pipe):
    kwargs = dict(steps=3, height=64, width=64, output="np")
    a = builtin_pipe.generate(["a cat"], seeds=[1], **kwargs)[0]
    b = builtin_pipe.generate(["a cat"], seeds=[1], **kwargs)[0]
    c = builtin_pipe.generate(["a cat"], seeds=[2], **kwargs)[0]
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms"])
def test_equals_diffusers_pipeline(tiny_folder, tiny_pipe, scheduler):
    reference = reference_pipeline(tiny_folder, scheduler)
    for prompt, negative, seed, guidance in [("a red fox in snow", None, 7, 7.5), ("a lighthouse", "blurry", 123, 3.0), ("a tree", None, 5, 1.0)]:
        ours = tiny_pipe.generate(
            [prompt], seeds=[seed], negative_prompts=None if negative is None else [negative],
            steps=5, guidance_scale=guidance, height=64, width=40, scheduler=scheduler, output="np",
        )[0]
        theirs = reference(
            prompt, negative_prompt=negative, num_inference_steps=5, guidance_scale=guidance, height=64, width=40,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        ).images[0]
        theirs = (theirs * 255).round().astype(np.uint8)
        assert ours.shape == theirs.shape
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2, (scheduler, prompt)


def test_latent_output_equals_diffusers(tiny_folder, tiny_pipe):
    ours = tiny_pipe.generate(["a fox"], seeds=[3], steps=4, height=64, width=64, scheduler="ddim", output="latent")[0]
    theirs = reference_pipeline(tiny_folder, "ddim")(
        "a fox", num_inference_steps=4, height=64, width=64, generator=torch.Generator("cpu").manual_seed(3), output_type="latent"
    ).images[0]
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_pil_output_and_odd_latent_sizes(builtin_pipe):
    images = builtin_pipe.generate(["a", "b"], seeds=[0, 1], steps=2, height=72, width=104)
    assert [im.size for im in images] == [(104, 72), (104, 72)]
    assert all(im.mode == "RGB" for im in images)


def test_progress_is_reported_per_step(builtin_pipe):
    seen = []
    builtin_pipe.generate(["a"], seeds=[0], steps=3, height=64, width=64, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=60), "multiples of 8"),
        (dict(steps=0), "steps"),
        (dict(output="jpeg"), "output"),
        (dict(scheduler="nope"), "ddpm"),
        (dict(seeds=[1, 2]), "one seed"),
    ],
)
def test_bad_arguments(builtin_pipe, kwargs, message):
    args = dict(seeds=[1], steps=2, height=64, width=64) | kwargs
    with pytest.raises(ValueError, match=message):
        builtin_pipe.generate(["a"], **args)


def test_non_finite_rows_are_reported_not_written(builtin_pipe, monkeypatch):
    encode = builtin_pipe.text_encoder.forward
    poisoned_ids = builtin_pipe.tokenizer(["b"])

    def poisoned(ids):
        hidden = encode(ids)
        hidden[(ids == poisoned_ids).all(dim=1)] = float("nan")
        return hidden

    monkeypatch.setattr(builtin_pipe.text_encoder, "forward", poisoned)
    with pytest.raises(NonFiniteOutputError) as info:
        builtin_pipe.generate(["a", "b", "c"], seeds=[0, 1, 2], steps=2, height=64, width=64, output="np")
    assert info.value.rows == [1]
    assert info.value.images[1] is None
    assert info.value.images[0].shape == (64, 64, 3) and info.value.images[2].shape == (64, 64, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close(dtype):
    full = sdcore.load_pipeline("builtin:tiny").generate(["a fox"], seeds=[4], steps=3, height=64, width=64, output="np")[0]
    half = sdcore.load_pipeline("builtin:tiny", dtype=dtype).generate(["a fox"], seeds=[4], steps=3, height=64, width=64, output="np")[0]
    assert half.shape == full.shape
    assert np.abs(half.astype(int) - full.astype(int)).mean() < 8


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_half_precision_latents_stay_float32_between_steps(scheduler):
    pipe = sdcore.load_pipeline("builtin:tiny", dtype=torch.bfloat16)
    kwargs = dict(steps=3, guidance_scale=1.0, height=32, width=32, scheduler=scheduler)
    got = pipe.generate(["a fox"], seeds=[4], output="latent", **kwargs)[0]
    # The same loop by hand: only the UNet runs in bfloat16; the noise and every step stay float32.
    sched = pipe.make_scheduler(scheduler)
    sched.set_timesteps(3)
    generator = torch.Generator("cpu").manual_seed(4)
    x = torch.randn(1, 4, 4, 4, generator=generator) * sched.init_noise_sigma
    context = pipe.encode_prompts(["a fox"])
    with torch.no_grad():
        for t in sched.timesteps:
            noise = pipe.predict_noise(sched.scale_model_input(x, t).to(torch.bfloat16), t, context)
            assert noise.dtype == torch.bfloat16
            x = sched.step(noise.float(), t, x, generator=[generator])
    assert got.dtype == torch.float32
    assert torch.equal(got, x[0])


def test_half_precision_decoder_overflow_is_redone_in_a_kept_float32_copy_and_lost_latents_are_not(monkeypatch):
    pipe = sdcore.load_pipeline("builtin:tiny", dtype=torch.float16)
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    latents[1] *= 1e4  # finite, but past float16's range in the decoder
    latents[2] = float("nan")
    decoded = []  # (weight dtype, rows) of every decoder call
    forward = Decoder.forward
    monkeypatch.setattr(Decoder, "forward", lambda self, z: decoded.append((self.conv_in.weight.dtype, len(z))) or forward(self, z))

    images, bad = pipe._decode(latents[:1])
    assert bad == [] and pipe._vae_decoder_fp32 is None  # made only when needed
    float32_decoders = []
    for _ in range(2):
        decoded.clear()
        images, bad = pipe._decode(latents)
        assert bad == [2] and images[2] is None
        assert images[1].shape == (32, 32, 3) and images[1].dtype == np.uint8
        assert decoded == [(torch.float16, 1)] * 3 + [(torch.float32, 1)]
        float32_decoders.append(pipe._vae_decoder_fp32)
    assert float32_decoders[0] is not None and float32_decoders[1] is float32_decoders[0]  # made once
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float16}


def test_compiled_unet_gives_the_eager_images_and_compiles_once_per_shape():
    from torch._dynamo.utils import counters

    # The tiny model's kernels are below the CPU fast paths' limits: lowered, compile meets those convolutions.
    pipe = sdcore.load_pipeline("builtin:tiny")
    cpu.accelerate(pipe, CPUKernels(matmul_min_kernel=0, winograd_min_channels=0))
    kwargs = dict(steps=4, height=64, width=64, scheduler="ddim", output="latent")
    eager = pipe.generate(["a fox", "a lighthouse"], seeds=[3, 4], **kwargs)
    pipe.compile()
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = pipe.generate(["a fox", "a lighthouse"], seeds=[3, 4], **kwargs)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # Every step's timestep is an input of the one graph, not a constant that forces a recompile, and
    # another step count or prompt of the same shape reuses it.
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    pipe.generate(["a bowl of fruit"], seeds=[5], **{**kwargs, "steps": 6})
    assert counters["stats"]["unique_graphs"] - graphs_before == 1


def test_decode_out_of_device_memory_retries_in_smaller_groups_and_keeps_the_denoising(builtin_pipe, monkeypatch):
    kwargs = dict(steps=2, height=64, width=64, scheduler="ddim", output="np")
    prompts, seeds = PROMPTS[:3], [1, 2, 3]
    expected = builtin_pipe.generate(prompts, seeds=seeds, **kwargs)
    decode, unet_forward = builtin_pipe.vae.decode, builtin_pipe.unet.forward
    decoded_rows, unet_calls = [], []

    def decode_at_most(rows):
        def decode_or_run_out(z):
            decoded_rows.append(len(z))
            if len(z) > rows:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return decode(z)
        return decode_or_run_out

    def counting_unet(x, *args):
        unet_calls.append(len(x))
        return unet_forward(x, *args)

    # As on a GPU: the whole batch in one call, until memory runs out.
    monkeypatch.setattr(builtin_pipe, "batching", Batching.for_device("cuda", torch.float32))
    monkeypatch.setattr(builtin_pipe.vae, "decode", decode_at_most(1))
    monkeypatch.setattr(builtin_pipe.unet, "forward", counting_unet)
    images = builtin_pipe.generate(prompts, seeds=seeds, **kwargs)
    assert unet_calls == [6, 6]  # two steps of one CFG batch, never run again
    assert decoded_rows == [3, 2, 1, 1, 1]  # all, then halves, then one row at a time
    for got, want in zip(images, expected):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1

    monkeypatch.setattr(builtin_pipe.vae, "decode", decode_at_most(0))
    with pytest.raises(torch.OutOfMemoryError):  # even one row does not fit: the caller decides
        builtin_pipe.generate(prompts[:1], seeds=seeds[:1], **kwargs)
