import json

import pytest
import torch

from reference import TINY_UNET, reference_unet, sd15_config
from sdcore import cpu
from sdcore import configs
from sdcore.cpu import CPUKernels
from sdcore.errors import UnsupportedModelError
from sdcore.unet import UNet, UNetConfig


def _ours_like(reference, config: dict) -> UNet:
    unet = UNet(configs.unet_config(config)).eval()
    unet.load_state_dict(reference.state_dict(), strict=True)
    return unet


def _inputs(hw: tuple[int, int], batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *hw, generator=gen)
    context = torch.randn(batch, 77, TINY_UNET["cross_attention_dim"], generator=gen)
    return sample, context


@pytest.fixture(scope="module")
def reference():
    return reference_unet(TINY_UNET)


@pytest.fixture(scope="module")
def ours(reference):
    return _ours_like(reference, TINY_UNET)


@pytest.fixture(scope="module")
def sd15_on_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        reference = UNet2DConditionModel(**{k: v for k, v in sd15_config("unet").items() if not k.startswith("_")})
        ours = UNet(configs.unet_config(sd15_config("unet")))
    return reference, ours


@torch.no_grad()
@pytest.mark.parametrize("hw", [(8, 8), (9, 13), (5, 7)])
def test_matches_reference_with_per_row_timesteps(reference, ours, hw):
    sample, context = _inputs(hw)
    timesteps = torch.tensor([1, 999])
    expected = reference(sample, timesteps, context).sample
    got = ours(sample, timesteps, context)
    assert got.shape == sample.shape
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-4
    # Each row really used its own timestep.
    assert (ours(sample, torch.tensor([999, 999]), context) - got)[0].abs().max() > 1e-2


@torch.no_grad()
def test_matches_reference_through_winograd_convolutions(reference):
    # The tiny model's channels are below Winograd's minimum. Lowered, the 3x3 convolutions of the top
    # level (2 x 16 x 24 positions) run Winograd's, in four bands of four rows.
    ours = cpu.accelerate(_ours_like(reference, TINY_UNET), CPUKernels(winograd_min_channels=0, winograd_band_positions=200))
    sample, context = _inputs((16, 24), seed=6)
    timesteps = torch.tensor([10, 900])
    got = ours(sample, timesteps, context)
    assert sum(m._from_weight is not None for m in ours.modules() if isinstance(m, cpu.FastConv3x3)) >= 8
    assert (got - reference(sample, timesteps, context).sample).abs().max().item() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("timestep", [0, 500, 999, 261.5])
def test_scalar_timesteps_broadcast_like_reference(reference, ours, timestep):
    sample, context = _inputs((8, 8), seed=1)
    expected = reference(sample, timestep, context).sample
    as_row = torch.full((2,), timestep, dtype=torch.float32 if isinstance(timestep, float) else torch.long)
    for t in (timestep, torch.tensor(timestep), as_row):
        assert (ours(sample, t, context) - expected).abs().max().item() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("overrides", [
    {"flip_sin_to_cos": False, "freq_shift": 1},
    {"downsample_padding": 0},
    {"layers_per_block": 1, "attention_head_dim": 4, "norm_eps": 1e-6},
    {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
])
def test_config_fields_are_honoured(overrides):
    config = {**TINY_UNET, **overrides}
    reference = reference_unet(config, seed=5)
    ours = _ours_like(reference, config)
    sample, context = _inputs((12, 17), seed=2)
    timesteps = torch.tensor([3, 700])
    assert (ours(sample, timesteps, context) - reference(sample, timesteps, context).sample).abs().max().item() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_in_that_dtype(ours, dtype):
    sample, context = _inputs((6, 6), seed=3)
    full = ours(sample, 999, context)
    ours_half = UNet(ours.config).eval().to(dtype)
    ours_half.load_state_dict(ours.state_dict())
    ref_half = reference_unet(TINY_UNET).to(dtype)
    got = ours_half(sample.to(dtype), 999, context.to(dtype))
    expected = ref_half(sample.to(dtype), 999, context.to(dtype)).sample
    assert got.dtype == dtype
    scale = full.abs().max().item()
    assert (got.float() - full).abs().max().item() <= 0.05 * scale  # bf16 keeps ~3 significant digits
    # The time features are computed in float32 and cast, as in the reference, so the two agree closely.
    assert (got.float() - expected.float()).abs().max().item() <= 0.01 * scale


@torch.no_grad()
def test_meta_build_then_assign_load(reference):
    with torch.device("meta"):
        unet = UNet(configs.unet_config(TINY_UNET))
    assert list(unet.buffers()) == []
    unet.load_state_dict(reference.state_dict(), strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in unet.parameters())
    sample, context = _inputs((9, 13), seed=4)
    expected = reference(sample, 42, context).sample
    assert (unet.eval()(sample, 42, context) - expected).abs().max().item() <= 1e-4


def test_sd15_keys_and_shapes_equal_reference(sd15_on_meta):
    reference, ours = sd15_on_meta
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected
    assert len(got) == 686
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    assert got["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == (320, 320)
    assert got["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert got["mid_block.attentions.0.proj_in.weight"] == (1280, 1280, 1, 1)
    assert got["up_blocks.0.upsamplers.0.conv.weight"] == (1280, 1280, 3, 3)
    assert got["up_blocks.3.resnets.2.conv_shortcut.weight"] == (320, 640, 1, 1)


def test_from_diffusers_reads_published_and_saved_configs(sd15_on_meta, tmp_path):
    assert configs.unet_config(sd15_config("unet")) == UNetConfig()
    reference, _ = sd15_on_meta
    reference.save_config(tmp_path)  # exactly what save_pretrained writes next to the weights
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_attention_heads"] is None and "addition_embed_type" in saved
    assert configs.unet_config(saved) == UNetConfig()
    assert configs.unet_config(TINY_UNET).block_out_channels == (32, 64, 64, 64)
    assert configs.unet_config({}) == UNetConfig()


SD2_CHANGES = {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True}
SDXL_CHANGES = {
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


@pytest.mark.parametrize("changes, family", [(SD2_CHANGES, "Stable Diffusion 2.x"), (SDXL_CHANGES, "SDXL")])
def test_other_families_are_refused(changes, family):
    with pytest.raises(UnsupportedModelError, match=f"looks like {family}.*supports SD 1.x only"):
        configs.unet_config({**sd15_config("unet"), **changes})


@pytest.mark.parametrize("changes, named", [
    ({"act_fn": "gelu"}, "act_fn"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"mid_block_scale_factor": 1.5}, "mid_block_scale_factor"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"upcast_attention": True}, "upcast_attention"),
    ({"only_cross_attention": [True, False, False, False]}, "only_cross_attention"),
    ({"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"time_cond_proj_dim": 256}, "LCM"),
    ({"in_channels": 8}, "InstructPix2Pix"),
    ({"in_channels": 9, "out_channels": 9}, "9 input / 9 output channels"),
    ({"mid_block_type": None}, "mid_block_type"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}, "SimpleCrossAttnDownBlock2D"),
    ({"_class_name": "UNet2DModel"}, "UNet2DModel"),
])
def test_unimplemented_options_are_refused(changes, named):
    with pytest.raises(UnsupportedModelError, match=named):
        configs.unet_config({**sd15_config("unet"), **changes})
