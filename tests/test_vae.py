import json

import pytest
import torch

from reference import TINY_VAE, reference_vae, sd15_config
from sdcore import cpu
from sdcore import configs
from sdcore.cpu import CPUKernels
from sdcore.errors import UnsupportedModelError
from sdcore.vae import AutoencoderKL, VAEConfig


@pytest.fixture(scope="module")
def reference():
    return reference_vae(TINY_VAE)


def _ours_like(reference) -> AutoencoderKL:
    vae = AutoencoderKL(configs.vae_config(TINY_VAE)).eval()
    vae.load_state_dict(reference.state_dict(), strict=True)
    return vae


@pytest.fixture(scope="module")
def ours(reference):
    return _ours_like(reference)


@torch.no_grad()
@pytest.mark.parametrize("latent_hw", [(8, 8), (6, 10)])
def test_decode_matches_reference(reference, ours, latent_hw):
    z = torch.randn(2, 4, *latent_hw, generator=torch.Generator().manual_seed(1))
    expected = reference.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 8 * latent_hw[0], 8 * latent_hw[1])
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero images
    assert (got - expected).abs().max().item() <= 1e-3


@torch.no_grad()
def test_decode_matches_reference_through_winograd_convolutions(reference):
    # The tiny decoder's channels are below Winograd's minimum. Lowered, its 3x3 convolutions on maps of
    # over 128 positions run Winograd's on the channels-last maps the decoder works in, in bands of a few rows.
    kernels = CPUKernels(winograd_min_channels=0, winograd_band_positions=300)
    ours = cpu.accelerate(_ours_like(reference), kernels)  # its own: the module's shared decoder stays plain
    z = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(2))
    got = ours.decode(z)
    assert sum(m._from_weight is not None for m in ours.modules() if isinstance(m, cpu.FastConv3x3)) >= 6
    assert (got - reference.decode(z).sample).abs().max().item() <= 1e-3


@torch.no_grad()
def test_encode_matches_reference(reference, ours):
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    dist = reference.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 4, 6)
    torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_encode_clamps_logvar_like_reference(reference, ours):
    # Push the log-variance half of quant_conv far out of range in both models (then restore).
    bias_ref, bias_ours = reference.quant_conv.bias, ours.quant_conv.bias
    saved = bias_ours.clone()
    x = torch.zeros(1, 3, 16, 16)
    try:
        for shift in (1e4, -1e4):
            for bias in (bias_ref, bias_ours):
                bias.copy_(saved)
                bias[4:] += shift
            _, logvar = ours.encode(x)
            torch.testing.assert_close(logvar, reference.encode(x).latent_dist.logvar)
            assert logvar.unique().tolist() == [20.0 if shift > 0 else -30.0]
    finally:
        bias_ref.copy_(saved)
        bias_ours.copy_(saved)


@torch.no_grad()
def test_meta_build_then_assign_load(reference):
    with torch.device("meta"):
        vae = AutoencoderKL(configs.vae_config(TINY_VAE))
    assert list(vae.buffers()) == []
    vae.load_state_dict(reference.state_dict(), strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in vae.parameters())
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert (vae.decode(z) - reference.decode(z).sample).abs().max().item() <= 1e-3


def _reference_on_meta(config: dict):
    from diffusers import AutoencoderKL as RefAutoencoderKL

    with torch.device("meta"):
        return RefAutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})


def test_sd15_keys_and_shapes():
    published = sd15_config("vae")
    with torch.device("meta"):
        vae = AutoencoderKL(configs.vae_config(published))
    expected = {k: tuple(v.shape) for k, v in _reference_on_meta(published).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == expected
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_config_parsing(tmp_path):
    published = sd15_config("vae")
    assert "scaling_factor" not in published
    assert configs.vae_config(published) == VAEConfig()
    assert configs.vae_config({}) == VAEConfig()
    # What today's save_pretrained writes for the same model.
    _reference_on_meta(published).save_config(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert configs.vae_config(saved) == VAEConfig()

    # SDXL's VAE is the same architecture with another scaling factor.
    sdxl = {**published, "scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024}
    assert configs.vae_config(sdxl) == VAEConfig(scaling_factor=0.13025)

    sd3 = {**published, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
           "use_quant_conv": False, "use_post_quant_conv": False}
    with pytest.raises(UnsupportedModelError, match=r"Stable Diffusion 3 / Flux.*SD 1\.x"):
        configs.vae_config(sd3)
    with pytest.raises(UnsupportedModelError, match="quant_conv"):
        configs.vae_config({**published, "use_quant_conv": False})
    with pytest.raises(UnsupportedModelError, match="AutoencoderTiny"):
        configs.vae_config({"_class_name": "AutoencoderTiny"})
    with pytest.raises(UnsupportedModelError, match="down_block_types"):
        configs.vae_config({**published, "down_block_types": ["DownEncoderBlock2D"] * 3})
