"""The denoising UNet of Stable Diffusion 1.x: predicts the noise in a latent, given the timestep and the text.

Parameter names and shapes are those of diffusers' `UNet2DConditionModel` for the same config, so a
diffusers folder loads without renaming.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdcore.layers import Attention, Downsample, ResnetBlock, Upsample, group_norm

CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    layers_per_block: int = 2
    heads: int = 8  # the same count at every level; head width = channels // heads
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    downsample_padding: int = 1


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: [B] -> [B, dim] in float32.

    Computed in the same order as the reference, so the features agree to the last bit even at t=999.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GEGLU(nn.Module):
    """Linear to twice the width, then one half gated by the GELU of the other."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Keyed "0" and "2" because the checkpoints name these `net.0.proj` and `net.2` (`net.1` was dropout).
        self.net = nn.ModuleDict({"0": GEGLU(dim, mult * dim), "2": nn.Linear(mult * dim, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["2"](self.net["0"](x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, and feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, HW, dim], context: [B, 77, context_dim]
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A transformer block over the H*W positions of a feature map, between 1x1 convs, as a residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups, eps=1e-6)  # fixed in the reference, unlike the resnets' eps
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)
        h = self.transformer_blocks[0](h, context)
        # A channels-last view, no copy: the 1x1 conv takes it as it is and the residual add restores NCHW.
        h = h.view(B, H, W, C).permute(0, 3, 1, 2)
        return x + self.proj_out(h)


class DownBlock(nn.Module):
    """Resnets (each followed by a spatial transformer if `attention`), then an optional stride-2 conv.

    Returns the output and every intermediate state, which the up path takes as skip connections.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig, temb_dim: int, attention: bool,
                 downsample: bool):
        super().__init__()
        n, groups, eps = cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, eps, temb_dim) for i in range(n)
        )
        self.attentions = nn.ModuleList(
            SpatialTransformer(out_channels, cfg.heads, cfg.cross_attention_dim, groups) for _ in range(n)
        ) if attention else None
        self.downsamplers = nn.ModuleList([Downsample(out_channels, cfg.downsample_padding)]) if downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    """Resnets over [x, skip] concatenations (each followed by a spatial transformer if `attention`),
    then an optional 2x upsampling."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: list[int], cfg: UNetConfig, temb_dim: int,
                 attention: bool, upsample: bool):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock((in_channels if i == 0 else out_channels) + skip, out_channels, groups, eps, temb_dim)
            for i, skip in enumerate(skip_channels)
        )
        self.attentions = nn.ModuleList(
            SpatialTransformer(out_channels, cfg.heads, cfg.cross_attention_dim, groups) for _ in skip_channels
        ) if attention else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        """Consumes (pops) its skip connections from the end of `skips`."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            # Upsample to the next skip's size rather than 2x: a stride-2 conv rounded odd sides up.
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: UNetConfig, temb_dim: int):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, eps, temb_dim) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialTransformer(channels, cfg.heads, cfg.cross_attention_dim, groups)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        temb_dim = 4 * ch[0]
        self.time_embedding = TimestepMLP(ch[0], temb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        # Channels of every state the down path hands to the up path, in order.
        skip_channels = [ch[0]]
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            downsample = i < len(ch) - 1
            self.down_blocks.append(
                DownBlock(ch[max(i - 1, 0)], ch[i], cfg, temb_dim, kind == CROSS_ATTN_DOWN, downsample))
            skip_channels += [ch[i]] * (cfg.layers_per_block + downsample)

        self.mid_block = MidBlock(ch[-1], cfg, temb_dim)

        rch = ch[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            # Each up block takes its down twin's resnet outputs plus the state below them (the twin's input).
            skips = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
            upsample = i < len(ch) - 1
            self.up_blocks.append(
                UpBlock(rch[max(i - 1, 0)], rch[i], skips, cfg, temb_dim, kind == CROSS_ATTN_UP, upsample))

        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: int | float | torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        # sample: [B, 4, h, w] (any h, w), timestep: a number or a 0-d / [B] tensor, context: [B, 77, D]
        B = sample.shape[0]
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 0 and timestep.device.type == "cpu":
            # Schedulers keep their timesteps on the host. Copying one to a GPU would wait for the GPU's
            # queue to drain at every step; filling a tensor there with the number does not.
            timestep = timestep.item()
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(sample.device).expand(B)
        else:
            t = torch.full((B,), timestep, dtype=torch.float32, device=sample.device)  # no host-to-device copy
        cfg = self.config
        t_features = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(t_features.to(sample.dtype))

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, context)
            skips += states
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            x = block(x, skips, temb, context)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
