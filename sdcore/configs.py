"""diffusers / transformers config.json -> sdcore's config dataclasses, refusing other model families.

Anything in a config that would change the computation but is not implemented by sdcore's modules
is refused with an UnsupportedModelError, never ignored.
"""
from sdcore.clip import CLIPTextConfig
from sdcore.errors import UnsupportedModelError
from sdcore.unet import CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP, UNetConfig
from sdcore.vae import VAEConfig


def unet_config(d: dict) -> UNetConfig:
    """Read a diffusers `unet/config.json` (the 2022 release's file or today's `save_pretrained`)."""
    def refuse(why: str):
        raise UnsupportedModelError(f"UNet config {why}; sdbatch supports SD 1.x only")

    if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        refuse(f"is a {d['_class_name']}, not a UNet2DConditionModel")

    # Released as `attention_head_dim`, but it has always been the number of heads (diffusers issue 2011).
    heads = _uniform(d.get("attention_head_dim", UNetConfig.heads))
    per_level_heads = isinstance(heads, (list, tuple))
    layers = _uniform(d.get("transformer_layers_per_block", 1))

    sdxl = [clue for clue, present in (
        (f"addition_embed_type {d.get('addition_embed_type')!r}", d.get("addition_embed_type") is not None),
        (f"transformer_layers_per_block {layers} (one per level)", isinstance(layers, (list, tuple))),
        ("cross_attention_dim 2048", d.get("cross_attention_dim") == 2048),
    ) if present]
    if sdxl:
        refuse(f"looks like SDXL ({', '.join(sdxl)})")
    sd2 = [clue for clue, present in (
        ("cross_attention_dim 1024", d.get("cross_attention_dim") == 1024),
        (f"attention_head_dim {heads} (one per level)", per_level_heads),
        ("use_linear_projection true", d.get("use_linear_projection", False)),
    ) if present]
    if sd2:
        refuse(f"looks like Stable Diffusion 2.x ({', '.join(sd2)})")
    if d.get("time_cond_proj_dim") is not None:
        refuse("looks like a latent consistency (LCM) UNet (time_cond_proj_dim is set)")
    channels = (d.get("in_channels", 4), d.get("out_channels", 4))
    if channels not in ((4, 4), (9, 4)):
        refuse(f"has {channels[0]} input / {channels[1]} output channels "
               "(SD 1.x: 4 / 4, or 9 / 4 for inpainting; 8 inputs is InstructPix2Pix)")
    for key, value in d.items():
        if key in _MUST_BE and _uniform(value) not in _MUST_BE[key]:
            refuse(f"sets {key} = {value!r}, which sdbatch does not implement (SD 1.x: {_MUST_BE[key][0]!r})")
    if d.get("norm_num_groups", UNetConfig.norm_num_groups) is None:
        refuse("has no group norms (norm_num_groups null)")

    fields = {k: v for k, v in d.items() if k in UNetConfig.__dataclass_fields__ and k != "heads"}
    cfg = UNetConfig(**fields, heads=heads)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        setattr(cfg, key, tuple(getattr(cfg, key)))
    levels = len(cfg.block_out_channels)
    if len(cfg.down_block_types) != levels or len(cfg.up_block_types) != levels:
        refuse(f"has {len(cfg.down_block_types)} down / {len(cfg.up_block_types)} up blocks for {levels} levels")
    allowed_types = {"down_block_types": (CROSS_ATTN_DOWN, PLAIN_DOWN), "up_block_types": (CROSS_ATTN_UP, PLAIN_UP)}
    for key, allowed in allowed_types.items():
        unknown = [t for t in getattr(cfg, key) if t not in allowed]
        if unknown:
            refuse(f"has {key} {unknown} (SD 1.x uses only {allowed})")
    if d.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        refuse(f"has mid_block_type {d['mid_block_type']!r} (SD 1.x: 'UNetMidBlock2DCrossAttn')")
    return cfg


# Keys of diffusers' UNet config that change the computation, and the values implemented here (SD 1.x's first).
# Keys in neither this nor UNetConfig (sample_size, dropout, `_`-keys, ...) do not affect inference.
_MUST_BE = {
    "transformer_layers_per_block": (1,),
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "mid_block_scale_factor": (1,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "upcast_attention": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "num_attention_heads": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_time_embed_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}


def _uniform(value):
    """A per-level list that repeats one value means that value (e.g. only_cross_attention [False] * 4)."""
    if isinstance(value, (list, tuple)) and len(set(value)) == 1:
        return value[0]
    return value


def vae_config(d: dict) -> VAEConfig:
    """Read a diffusers `vae/config.json` (the 2022 release's file or today's `save_pretrained`).

    SDXL's VAE has this exact architecture (only its scaling factor differs) and is accepted.
    """
    def refuse(why: str):
        raise UnsupportedModelError(f"VAE config {why}; sdbatch supports the SD 1.x AutoencoderKL only")

    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        refuse(f"is a {d['_class_name']}, not an AutoencoderKL")
    latent = d.get("latent_channels", 4)
    if latent == 16:
        refuse("looks like Stable Diffusion 3 / Flux (16 latent channels)")
    if latent != 4:
        refuse(f"has {latent} latent channels (SD 1.x: 4)")
    if d.get("shift_factor") is not None or d.get("latents_mean") is not None or d.get("latents_std") is not None:
        refuse("normalises latents with a shift or per-channel mean/std (SD3/Flux/Playground style)")
    if not d.get("use_quant_conv", True) or not d.get("use_post_quant_conv", True):
        refuse("has no quant_conv / post_quant_conv (SD3/Flux style)")
    if not d.get("mid_block_add_attention", True):
        refuse("has no mid-block attention")
    if d.get("act_fn", "silu") != "silu":
        refuse(f"uses act_fn {d['act_fn']!r} (SD 1.x: 'silu')")
    cfg = VAEConfig(**{k: v for k, v in d.items() if k in VAEConfig.__dataclass_fields__ and k != "norm_eps"})
    cfg.block_out_channels = tuple(cfg.block_out_channels)
    levels = len(cfg.block_out_channels)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = d.get(key, [kind] * levels)
        if list(types) != [kind] * levels:
            refuse(f"has {key} {types} (SD 1.x: {levels} x {kind!r})")
    return cfg


def clip_config(d: dict) -> CLIPTextConfig:
    """Read a transformers `text_encoder/config.json` (the 2022 release's file or today's `save_pretrained`)."""
    act = d.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        hidden = d.get("hidden_size")
        family = {
            1024: "Stable Diffusion 2.x (OpenCLIP ViT-H/14 text encoder)",
            1280: "SDXL's second text encoder (OpenCLIP ViT-bigG/14)",
        }.get(hidden, "a text encoder other than CLIP ViT-L/14")
        raise UnsupportedModelError(
            f"text encoder config looks like {family}: hidden_act {act!r}, hidden_size {hidden}; "
            "sdbatch supports SD 1.x only (CLIP ViT-L/14 with quick_gelu)"
        )
    # bos/eos/pad ids, projection_dim, dropout, dtype etc. do not shape the model and are ignored
    # (the release's bos/eos ids 0/2 are wrong anyway; the tokenizer owns the special ids).
    return CLIPTextConfig(**{k: v for k, v in d.items() if k in CLIPTextConfig.__dataclass_fields__})


# The reader of each component's config file, by component folder name.
READERS = {"unet": unet_config, "vae": vae_config, "text_encoder": clip_config}
