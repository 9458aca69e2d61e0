"""Text to image, image to image and inpainting: the loaded components and the denoising loop around them.

Reproducibility rule: every row owns a CPU `torch.Generator` seeded with its seed. It draws the
row's VAE samples and initial latents and then that row's stochastic step noise, in the reference
pipeline's order, so an image depends only on its own row — not on batch size or neighbours. On
the CPU its bytes do not depend on them either (`sdcore.batching`).

One mode per call: text to image (no init images), image to image (init images: each is encoded,
noised to the timestep its strength starts at, and denoised from there, as diffusers'
StableDiffusionImg2ImgPipeline does) or inpainting (init images and masks, as its
StableDiffusionInpaintPipeline does): a 9-channel inpainting UNet sees the mask and the masked
image's latents beside the latents; a plain UNet denoises everything and the known region is put
back, noised to the next timestep, after every step.
"""
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sdcore import cpu, schedulers
from sdcore.batching import Batching
from sdcore.errors import CompileUnavailableError, NonFiniteOutputError
from sdcore.schedulers.base import randn, to_device

OUTPUTS = ("pil", "np", "latent")


def first_step(steps: int, strength: float) -> int:
    """The first of `steps` timesteps that image to image and inpainting denoise, as diffusers' get_timesteps;
    ValueError when `strength` leaves none."""
    begin = steps - min(int(steps * strength), steps)
    if begin == steps:
        raise ValueError(f"strength {strength} of {steps} steps leaves no step to denoise "
                         f"(it needs strength x steps >= 1)")
    return begin


@dataclass
class Prepared:
    """What `generate` makes before denoising, made ahead by `Pipeline.prepare` for the rows in `key`."""

    key: tuple  # (prompts, seeds, negative prompts, guidance scales, height, width, strength)
    generators: list[torch.Generator]  # each row's, past its starting noise: they draw its step noise next
    context: torch.Tensor  # [B, 77, D] the prompts' encodings
    uncond_context: torch.Tensor | None  # [B, 77, D] the negative prompts', when a row is guided
    noise: torch.Tensor  # [B, 4, h, w] float32 starting noise, before the scheduler's scaling
    init_latents: torch.Tensor | None = None  # [B, 4, h, w] the init images' latents, where the mode uses them
    mask: torch.Tensor | None = None  # [B, 1, h, w] inpainting: 1 = repaint, 0 = keep
    masked_image_latents: torch.Tensor | None = None  # [B, 4, h, w] what the 9-channel UNet sees of the kept region
    images: tuple = (None, None)  # (init images, masks) they were made from: the caller's arrays


@dataclass
class Pipeline:
    tokenizer: object  # sdcore.tokenizer.Tokenizer
    text_encoder: nn.Module  # sdcore.clip.CLIPTextEncoder
    unet: nn.Module  # sdcore.unet.UNet
    vae: nn.Module  # sdcore.vae.AutoencoderKL
    scheduler_config: dict  # the model's scheduler_config.json (SD v1.5's values when it has none)
    source: str  # what load_pipeline was given
    fingerprint: str  # identifies the weights: same string <=> same model
    device: torch.device
    dtype: torch.dtype
    _compiled_unet: Callable | None = field(default=None, init=False, repr=False)  # see compile()
    _cuda_graphs: bool = field(default=False, init=False, repr=False)  # the compiled UNet replays CUDA graphs
    _vae_decoder_fp32: nn.Module | None = field(default=None, init=False, repr=False)  # see _float32_decoder()
    # compile() on the CPU freezes the UNet's weights into its code, unless they change (sdcore.lora.Adapters).
    freeze_compiled_weights: bool = field(default=True, init=False)
    # Rows per UNet and VAE call: set from the device here and by compile(); a caller that changes the
    # torch thread count sets it again (sdcore.batching).
    batching: Batching = field(default=None, init=False)

    def __post_init__(self):
        self.batching = Batching.for_device(self.device, self.dtype)
        if self.device.type == "cpu":
            # Every CPU dtype: the kernels take float32 inputs only (a half-precision pipeline's float32
            # retry of its decoder included), and the decoder runs channels-last in any dtype.
            cpu.accelerate(self)

    @staticmethod
    def _in_chunks(fn: Callable[..., torch.Tensor], rows: int, *batches: torch.Tensor) -> torch.Tensor:
        """fn over the row-aligned tensors `batches`, `rows` rows at a time."""
        return torch.cat([fn(*(b[i : i + rows] for b in batches)) for i in range(0, len(batches[0]), rows)])

    def compile(self, mode: str | None = None) -> None:
        """Run the UNet through torch.compile from now on, in `predict_noise` and so in `generate`
        (`mode`: torch.compile's, e.g. "reduce-overhead" for CUDA graphs). `self.unet` stays eager.

        Each new input shape (batch, height, width) is compiled when first met, which takes minutes for
        SD v1.5 on a few CPU cores; every later step of that shape is faster. On the CPU the weights are
        frozen into the compiled code (inductor's `freezing`), so that its matmul and convolution kernels
        get them pre-packed instead of re-laid out at every call; not when `freeze_compiled_weights` is
        off, as `sdcore.lora.Adapters` sets it to merge adapters between calls. Images differ from the
        eager ones in the low bits only, as on another device.

        Raises CompileUnavailableError at once where torch.compile cannot build code (no C++ compiler
        on a CPU machine, no Triton beside a GPU), rather than at the first step of every batch.
        """
        if self._compiled_unet is not None:
            return
        probe = torch.compile(lambda x: x * 2 + 1, dynamic=False)
        try:
            probe(torch.ones(8, device=self.device, dtype=self.dtype))
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CompileUnavailableError(
                f"--compile: torch.compile cannot build code for {self.device.type} on this machine ({reason}); "
                "install what it names (a C++ compiler and the Python headers on a CPU machine, Triton beside a GPU) "
                "or run without --compile") from None
        from torch._inductor import list_mode_options

        # With CUDA graphs the compiled UNet returns tensors that its next call overwrites.
        self._cuda_graphs = self.device.type == "cuda" and bool(list_mode_options(mode or "default").get("triton.cudagraphs"))
        self._compiled_unet = torch.compile(self.unet, mode=mode, dynamic=False)
        self.batching = Batching.for_device(self.device, self.dtype, compiled=True)

    @property
    def compiled(self) -> bool:
        return self._compiled_unet is not None

    @property
    def inpainting_unet(self) -> bool:
        """The UNet takes the mask and the masked image's latents beside the latents (9 input channels)."""
        return self.unet.config.in_channels == 9

    def predict_noise(self, x: torch.Tensor, t: int | float | torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet's output [B, 4, h, w] for its input x [B, 4 or 9, h, w] at timestep t (one for all rows),
        compiled if compile() was called."""
        # A [B] tensor made on the device: a compiled UNet then sees an input rather than a new
        # constant (and a recompile) at every step, and a GPU does not wait for a host copy.
        timesteps = torch.full((len(x),), float(t), dtype=torch.float32, device=self.device)
        if self._compiled_unet is None:
            return self.unet(x, timesteps, context)
        if self._cuda_graphs:
            # Schedulers keep outputs across steps (PNDM, DPM++ 2M), so they get a copy of the graph's.
            torch.compiler.cudagraph_mark_step_begin()
            return self._compiled_unet(x, timesteps, context).clone()
        if self.device.type != "cpu":
            return self._compiled_unet(x, timesteps, context)
        from torch._inductor import config as inductor_config

        # Read while compiling, so it has to be set around the call (torch.compile's options do not reach it).
        with inductor_config.patch(freezing=self.freeze_compiled_weights):
            return self._compiled_unet(x, timesteps, context)

    def make_scheduler(self, name: str, overrides: dict | None = None):
        """The named algorithm configured from the model's scheduler config plus `overrides`."""
        return schedulers.make(name, **{**self.scheduler_config, **(overrides or {})})

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts)).to(self.device)
        # A prompt is 77 rows of every matmul, so its encoding is the same in any batch.
        return self.text_encoder(ids)  # [B, 77, D]

    def _row_key(self, prompts, seeds, negative_prompts, guidance_scale, height: int, width: int,
                 init_images, mask_images, strength: float) -> tuple:
        """generate's rows, checked, as `Prepared.key`: a scalar guidance scale is given to every row. The
        images are checked but not part of it (see _same_images)."""
        prompts, seeds = tuple(prompts), tuple(int(s) for s in seeds)
        negative_prompts = ("",) * len(prompts) if negative_prompts is None else tuple(negative_prompts)
        per_row = isinstance(guidance_scale, Sequence)
        guidance = tuple(float(g) for g in guidance_scale) if per_row else (float(guidance_scale),) * len(prompts)
        if not prompts or not len(seeds) == len(negative_prompts) == len(guidance) == len(prompts):
            raise ValueError("generate needs one seed (and one negative prompt and guidance scale, if given per row) "
                             "per prompt, and at least one prompt")
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
        return prompts, seeds, negative_prompts, guidance, height, width, self._image_strength(
            len(prompts), height, width, init_images, mask_images, strength)

    def _image_strength(self, rows: int, height: int, width: int, init_images, mask_images,
                        strength: float) -> float | None:
        """A call's images checked, and its strength; None for text to image."""
        if mask_images is not None and init_images is None:
            raise ValueError("mask images need init images: inpainting repaints part of an init image")
        if self.inpainting_unet and mask_images is None:
            raise ValueError("this model has an inpainting UNet (9 input channels): every row needs an init image "
                             "and a mask image")
        if init_images is None:
            return None
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        for what, images, shape in (("init image", init_images, (height, width, 3)), ("mask image", mask_images, (height, width))):
            if images is None:
                continue
            if len(images) != rows:
                raise ValueError(f"generate needs one {what} per prompt, got {len(images)} for {rows} prompts")
            for i, image in enumerate(images):
                if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != shape:
                    got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
                    raise ValueError(f"{what} {i} must be a uint8 array of shape {shape} (the call's height x width"
                                     f"{' x RGB' if len(shape) == 3 else ''}), got {got}")
        return float(strength)

    @staticmethod
    def _same_images(prepared: tuple, given: tuple) -> bool:
        """Whether (init images, masks) a call was prepared from are those it is given: the very arrays, as a
        caller preparing ahead passes them again, or equal ones; compared, not hashed, on the hot path."""
        for made_from, now in zip(prepared, given):
            if (made_from is None) != (now is None):
                return False
            if now is not None and not all(a is b or np.array_equal(a, b) for a, b in zip(made_from, now)):
                return False
        return True


    @torch.inference_mode()
    def prepare(self, prompts: Sequence[str], *, seeds: Sequence[int], negative_prompts: Sequence[str] | None = None,
                guidance_scale: float | Sequence[float] = 7.5, height: int = 512, width: int = 512,
                init_images: Sequence[np.ndarray] | None = None, mask_images: Sequence[np.ndarray] | None = None,
                strength: float = 0.8) -> Prepared:
        """The prompts' encodings, the init images' latents and each row's starting noise, for a `generate`
        call of the same rows. Made ahead (from `generate`'s `before_wait`), a GPU has the next batch's
        text and image encoding queued behind this batch's decoding, and the host has drawn its noise,
        before it waits for the images."""
        key = self._row_key(prompts, seeds, negative_prompts, guidance_scale, height, width, init_images, mask_images,
                            strength)
        prompts, seeds, negative_prompts, guidance, height, width = key[:6]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        context = self.encode_prompts(prompts)
        uncond_context = self.encode_prompts(negative_prompts) if any(g > 1.0 for g in guidance) else None
        latent_shape = (len(prompts), self.vae.config.latent_channels, height // 8, width // 8)
        pixels = None if init_images is None else self._pixels(init_images)
        # Each generator's draws in the reference's order: the init image's VAE sample (not made for a
        # 9-channel UNet at full strength, which starts from noise alone), the starting noise, then the
        # masked image's VAE sample (drawn for a plain UNet too, which does not use it).
        init_latents = None
        if pixels is not None and not (self.inpainting_unet and strength == 1.0):
            init_latents = self._encode(pixels, generators)
        noise = randn(latent_shape, generators, self.device, torch.float32)
        mask = masked_image_latents = None
        if mask_images is not None:
            repaint = to_device(torch.from_numpy(np.stack(mask_images)) >= 128, self.device)[:, None]  # [B, 1, H, W]
            mask = F.interpolate(repaint.float(), size=latent_shape[2:])  # nearest, as the reference
            if self.inpainting_unet:
                masked_image_latents = self._encode(pixels * ~repaint, generators)
            else:
                randn(latent_shape, generators, self.device, torch.float32)
        images = tuple(None if x is None else tuple(x) for x in (init_images, mask_images))
        return Prepared(key, generators, context, uncond_context, noise, init_latents, mask, masked_image_latents,
                        images)

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 [H, W, 3] images → [B, 3, H, W] float32 in [-1, 1] on the device, as the reference scales them."""
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        return to_device(2 * pixels - 1, self.device)

    def _encode(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """pixels [B, 3, H, W] → latents [B, 4, H/8, W/8] (scaled), each row sampled from the VAE's
        posterior with its own generator, as the reference samples it."""
        vae_dtype = next(self.vae.parameters()).dtype
        moments = self._in_chunks(lambda x: torch.cat(self.vae.encode(x), dim=1), self.batching.vae_rows or len(pixels),
                                  pixels.to(vae_dtype))
        mean, logvar = moments.float().chunk(2, dim=1)
        sample = randn(mean.shape, generators, mean.device, torch.float32)
        return self.vae.config.scaling_factor * (mean + torch.exp(0.5 * logvar) * sample)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        negative_prompts: Sequence[str] | None = None,
        steps: int = 50,
        guidance_scale: float | Sequence[float] = 7.5,
        height: int = 512,
        width: int = 512,
        scheduler: str = "ddpm",
        scheduler_config: dict | None = None,
        output: str = "pil",
        progress: Callable[[int, int], None] | None = None,
        prepared: Prepared | None = None,
        before_wait: Callable[[], None] | None = None,
        init_images: Sequence[np.ndarray] | None = None,
        mask_images: Sequence[np.ndarray] | None = None,
        strength: float = 0.8,
    ) -> list:
        """One image per prompt; `progress(step, total)` is called after every denoising step.

        `init_images` (uint8 [height, width, 3], one per row) make it image to image: each is noised to
        the timestep `strength` (0 < s <= 1, one for all rows) starts at, and the last
        int(steps * strength) steps are denoised. `mask_images` too (uint8 [height, width], >= 128 =
        repaint) make it inpainting; a model with an inpainting UNet needs both.

        `guidance_scale` is one for all rows or one per row. A row with guidance above 1 gets
        classifier-free guidance; a row with 1 or less takes the conditional prediction alone, as it
        would without guidance, even in a batch with guided rows.

        `prepared`: `prepare`'s result for these very rows, used instead of encoding and drawing them
        again. `before_wait` is called once all the work is queued, before the host waits for the
        images (the time to prepare the next call)."""
        key = self._row_key(prompts, seeds, negative_prompts, guidance_scale, height, width, init_images, mask_images,
                            strength)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        begin = 0 if init_images is None else first_step(steps, strength)
        if prepared is None:
            prepared = self.prepare(prompts, seeds=seeds, negative_prompts=negative_prompts, guidance_scale=guidance_scale,
                                    height=height, width=width, init_images=init_images, mask_images=mask_images,
                                    strength=strength)
        elif prepared.key != key or not self._same_images(prepared.images, (init_images, mask_images)):
            raise ValueError("generate was given inputs prepared for other rows")
        prompts, guidance = key[0], key[3]

        sched = self.make_scheduler(scheduler, scheduler_config)
        sched.set_timesteps(steps)
        timesteps = sched.timesteps
        if init_images is not None:
            sched.set_begin_index(begin)
            timesteps = timesteps[begin:]
        generators, context, uncond_context = prepared.generators, prepared.context, prepared.uncond_context
        use_cfg = uncond_context is not None

        # The latents and the scheduler's state stay float32 in every dtype: half precision would round
        # away the small updates of late steps. Only the UNet sees the pipeline's dtype.
        latents = self._start_latents(sched, prepared, timesteps[:1], strength)

        def unet_noise(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self.predict_noise(x.to(self.dtype), t, context).float()

        def guided_noise(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor):
            # One UNet batch for both passes, unconditional rows first as the reference orders them.
            noise_uncond, noise_cond = unet_noise(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
            # uncond + 1 * (cond - uncond) is not cond to the last bit: unguided rows take cond itself.
            return torch.where(scale > 1.0, noise_uncond + scale * (noise_cond - noise_uncond), noise_cond)

        scales = to_device(torch.tensor(guidance, dtype=torch.float32).view(-1, 1, 1, 1), self.device)  # [B, 1, 1, 1]
        # Rows through CFG's batch, and rows through the UNet on their own (see Batching.unguided_apart).
        cfg_rows = [i for i, g in enumerate(guidance) if use_cfg and (g > 1.0 or not self.batching.unguided_apart)]
        plain_rows = [i for i in range(len(prompts)) if i not in cfg_rows]
        # A group of every row is taken whole, not copied out row by row.
        groups = [(guided, slice(None) if len(rows) == len(prompts) else torch.tensor(rows, device=self.device))
                  for guided, rows in ((True, cfg_rows), (False, plain_rows)) if rows]
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            model_input = self._unet_input(sched, latents, t, prepared)
            noise = torch.empty_like(latents)
            for guided, rows in groups:
                if guided:
                    fn, inputs = (lambda x, *rest: guided_noise(x, t, *rest)), (model_input, scales, context, uncond_context)
                else:
                    fn, inputs = (lambda x, cond: unet_noise(x, t, cond)), (model_input, context)
                inputs = [x[rows] for x in inputs]
                noise[rows] = self._in_chunks(fn, self.batching.unet_rows(guided) or len(inputs[0]), *inputs)
            latents = sched.step(noise, t, latents, generator=generators)
            if prepared.mask is not None and not self.inpainting_unet:
                latents = self._keep_known(sched, latents, prepared, timesteps[i + 1 : i + 2])
            if progress is not None:
                progress(i + 1, total)

        if output == "latent":
            if before_wait is not None:
                before_wait()
            images = list(latents)
            bad = [i for i, x in enumerate(images) if not torch.isfinite(x).all()]
        else:
            images, bad = self._decode(latents, before_wait)
            if output == "pil":
                from PIL import Image

                images = [None if x is None else Image.fromarray(x) for x in images]
        if bad:
            raise NonFiniteOutputError(bad, [None if i in bad else x for i, x in enumerate(images)])
        return images

    @staticmethod
    def _start_latents(sched, prepared: Prepared, first_t: torch.Tensor, strength: float) -> torch.Tensor:
        """The latents the walk starts from: the init latents noised to the first timestep, or (text to
        image, and inpainting at full strength, as the reference) noise alone."""
        if prepared.init_latents is None or (prepared.mask is not None and strength == 1.0):
            return prepared.noise * sched.init_noise_sigma
        return sched.add_noise(prepared.init_latents, prepared.noise, first_t)

    def _unet_input(self, sched, latents: torch.Tensor, t: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """What the UNet sees at timestep t: the scaled latents, then, for an inpainting UNet, the mask
        and the masked image's latents (unscaled), [B, 4 or 9, h, w]."""
        model_input = sched.scale_model_input(latents, t)
        if not self.inpainting_unet:
            return model_input
        return torch.cat([model_input, prepared.mask, prepared.masked_image_latents], dim=1)

    @staticmethod
    def _keep_known(sched, latents: torch.Tensor, prepared: Prepared, next_t: torch.Tensor) -> torch.Tensor:
        """Inpainting with a plain UNet: the kept region put back after a step, noised to the next
        timestep (clean after the last step), as the reference blends it."""
        known = prepared.init_latents
        if len(next_t):
            known = sched.add_noise(known, prepared.noise, next_t)
        return (1 - prepared.mask) * known + prepared.mask * latents

    def _decode(self, latents: torch.Tensor, before_wait: Callable[[], None] | None = None) -> tuple[list, list[int]]:
        """Latents → uint8 [H, W, 3] arrays; None for rows whose latents are non-finite or whose pixels
        stay non-finite even in float32."""
        scale = self.vae.config.scaling_factor
        vae_dtype = next(self.vae.parameters()).dtype
        arrays, finite = self._to_host(self._decode_fitting(self.vae.decode, latents.to(vae_dtype) / scale),
                                       before_wait)
        lost = [i for i, ok in enumerate(finite) if not ok]
        if lost and vae_dtype != torch.float32:
            # Half precision can overflow in the decoder; redo those rows in float32, unless their latents
            # were already non-finite.
            redo = [i for i, ok in zip(lost, torch.isfinite(latents[lost]).flatten(1).all(dim=1).tolist()) if ok]
            if redo:
                fixed, fixed_finite = self._to_host(self._decode_fitting(self._float32_decoder(), latents[redo] / scale))
                arrays[redo] = fixed
                for i, ok in zip(redo, fixed_finite):
                    finite[i] = ok
        bad = [i for i, ok in enumerate(finite) if not ok]
        return [None if i in bad else np.ascontiguousarray(a) for i, a in enumerate(arrays)], bad

    @staticmethod
    def _to_host(pixels: torch.Tensor, before_wait: Callable[[], None] | None = None) -> tuple[np.ndarray, list[bool]]:
        """Decoded pixels [B, 3, H, W] in [-1, 1] → uint8 [B, H, W, 3] on the host, and whether each row was
        finite. Both are computed on the device; from a GPU they come into pinned memory, behind its queued
        work, and the host waits once for both, after `before_wait`."""
        finite = torch.isfinite(pixels).flatten(1).all(dim=1)
        images = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        if pixels.device.type != "cuda":
            if before_wait is not None:
                before_wait()
            return images.numpy(), finite.tolist()
        host_images = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True).copy_(images, non_blocking=True)
        host_finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True).copy_(finite, non_blocking=True)
        if before_wait is not None:
            before_wait()
        torch.cuda.current_stream(pixels.device).synchronize()
        return host_images.numpy(), host_finite.tolist()

    def _float32_decoder(self) -> nn.Module:
        """A float32 copy of the VAE's decoding half, made on first need and kept: the half-precision
        VAE stays as it is, and later overflows cost no conversion."""
        if self._vae_decoder_fp32 is None:
            self._vae_decoder_fp32 = nn.Sequential(copy.deepcopy(self.vae.post_quant_conv),
                                                   copy.deepcopy(self.vae.decoder)).float()
        return self._vae_decoder_fp32

    def _decode_fitting(self, decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """decode(z) [B, 4, h, w] → [B, 3, 8h, 8w], in ever smaller groups of rows while the device runs
        out of memory: the decoder needs far more memory per row than the UNet (at large sizes, more than
        a whole batch of denoising), and the denoised latents are too costly to lose to it."""
        rows = self.batching.vae_rows or len(z)
        while True:
            try:
                return self._in_chunks(decode, rows, z)
            except torch.OutOfMemoryError:
                if rows == 1:
                    raise
                rows = (rows + 1) // 2
                if z.device.type == "cuda":
                    torch.cuda.empty_cache()
