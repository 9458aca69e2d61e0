"""One set of random SD v1.5 weights on disk, in both layouts, written once and reused.

The weights are `sdcore.builtin.random_weights` drawn for SD v1.5's configs (the dataclass defaults
of sdcore's modules), so every run of the benchmark measures the same numbers. diffusers writes the
folder itself (`save_pretrained`), so its own loader reads exactly what it expects; the single
file is the same tensors under their original (LDM) names, from `sdcore.weights.single_file_names`.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

from sdcore import builtin, weights

REPO = Path(__file__).resolve().parents[1]
# bench/results/ is ignored by git.
DEFAULT_CACHE = REPO / "bench" / "results" / "sd15-random"
FOLDER, SINGLE_FILE, DONE = "diffusers", "sd15-random.safetensors", "complete.json"
# Bump when the weights or the layout written here change, so old caches are rewritten.
VERSION = 2


def sd15_configs() -> dict:
    """SD v1.5's configs as sdcore's dataclasses (their defaults are SD v1.5's values)."""
    return {c: weights.MODULES[c][1]() for c in weights.COMPONENTS}


def diffusers_configs(cfgs: dict) -> dict:
    """The same configs in diffusers' / transformers' constructor arguments."""
    u, v, t = cfgs["unet"], cfgs["vae"], cfgs["text_encoder"]
    unet = dict(
        sample_size=64, in_channels=u.in_channels, out_channels=u.out_channels,
        block_out_channels=list(u.block_out_channels), down_block_types=list(u.down_block_types),
        up_block_types=list(u.up_block_types), layers_per_block=u.layers_per_block, attention_head_dim=u.heads,
        cross_attention_dim=u.cross_attention_dim, norm_num_groups=u.norm_num_groups, norm_eps=u.norm_eps,
        flip_sin_to_cos=u.flip_sin_to_cos, freq_shift=u.freq_shift, downsample_padding=u.downsample_padding,
    )
    levels = len(v.block_out_channels)
    vae = dict(
        sample_size=512, in_channels=v.in_channels, out_channels=v.out_channels,
        block_out_channels=list(v.block_out_channels), layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups, scaling_factor=v.scaling_factor,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
    )
    text = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
        hidden_act="quick_gelu", projection_dim=768,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text}


def ensure_weights(cache: Path = DEFAULT_CACHE, log=print) -> tuple[Path, Path]:
    """(diffusers folder, single .safetensors file) of the benchmark's weights, written if missing."""
    cache = Path(cache)
    folder, single = cache / FOLDER, cache / SINGLE_FILE
    done = cache / DONE
    if done.is_file() and json.loads(done.read_text()).get("version") == VERSION and single.is_file():
        return folder, single
    cache.mkdir(parents=True, exist_ok=True)
    log(f"writing random SD v1.5 weights to {cache} (once; about a minute and 9 GB of disk)")
    cfgs = sd15_configs()
    tensors = builtin.random_weights(cfgs)
    _write_diffusers_folder(folder, cfgs, tensors)
    _write_single_file(single, cfgs, tensors)
    done.write_text(json.dumps({"version": VERSION}))
    return folder, single


def _write_diffusers_folder(folder: Path, cfgs: dict, tensors: dict) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(REPO / "tests"))
    from reference import write_clip_vocab_folder

    kwargs = diffusers_configs(cfgs)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**kwargs["unet"])
        vae = AutoencoderKL(**kwargs["vae"])
    # The tensors become the parameters (assign): the model is never held twice.
    unet.load_state_dict(tensors["unet"], strict=True, assign=True)
    vae.load_state_dict(tensors["vae"], strict=True, assign=True)
    text = CLIPTextModel(CLIPTextConfig(**kwargs["text_encoder"]))
    # transformers 5 names the parameters without the `text_model.` that older versions (and files) have.
    prefix = "text_model." if any(k.startswith("text_model.") for k in text.state_dict()) else ""
    text.load_state_dict({prefix + k: v for k, v in tensors["text_encoder"].items()}, strict=True)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_vocab_folder(vocab), local_files_only=True,
                                                  model_max_length=77)
    scheduler = PNDMScheduler.from_config(weights.SD15_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    # Published SD 1.x folders also carry the slow tokenizer's files, which sdcore reads.
    write_clip_vocab_folder(folder / "tokenizer")


def _write_single_file(path: Path, cfgs: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    state = {}
    for original, (component, ours) in weights.single_file_names(**cfgs).items():
        t = tensors[component][ours]
        if component == "vae" and t.ndim == 2:
            t = t[:, :, None, None]  # the original VAE attention is 1x1 convs
        state[original] = t.contiguous()
    tmp = path.with_suffix(".partial")
    save_file(state, tmp)
    tmp.rename(path)


def load_reference(folder: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """diffusers' StableDiffusionPipeline over `folder`, with the DDIM scheduler the benchmark uses."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    ref = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False, local_files_only=True).to(device)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref
