"""The KL autoencoder of Stable Diffusion 1.x: 8x down/up-sampling between pixels and 4-channel latents.

Parameter names and shapes are those of diffusers' `AutoencoderKL` for the same config.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdcore.layers import Attention, Downsample, ResnetBlock, Upsample, group_norm


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    norm_eps: float = 1e-6  # fixed in the reference, never in its config files


class SpatialSelfAttention(Attention):
    """Single-head self-attention over all H*W positions of a feature map, with its own norm and residual."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__(channels, heads=1, head_dim=channels, bias=True)
        self.group_norm = group_norm(channels, groups, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # [B, HW, C]
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, eps)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


def _resnets(in_channels: int, out_channels: int, n: int, groups: int, eps: float) -> nn.ModuleList:
    return nn.ModuleList(
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, eps) for i in range(n)
    )


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, n: int, groups: int, eps: float, downsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, n, groups, eps)
        # padding=0: pad bottom/right only, as the VAE was trained.
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, n: int, groups: int, eps: float, upsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, n, groups, eps)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, eps, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], groups, eps)
        self.conv_norm_out = group_norm(ch[-1], groups, eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, eps = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, eps)
        # One resnet more per level than the encoder.
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, eps, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = group_norm(ch[-1], groups, eps)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, 3, H, W] in [-1, 1], H and W multiples of 8 -> mean, logvar: [B, 4, H/8, W/8]
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        # The reference clamps so that exp(logvar) stays finite; callers sample mean + exp(logvar/2) * noise.
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # z: latents / scaling_factor, [B, 4, h, w] -> image [B, 3, 8h, 8w], roughly in [-1, 1]
        return self.decoder(self.post_quant_conv(z))
