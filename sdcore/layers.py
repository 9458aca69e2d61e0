"""Building blocks shared by the UNet and the VAE.

Parameter names follow the published diffusers checkpoints (`to_q`, `to_out.0`, `conv_shortcut`, …)
so that a diffusers folder loads with no renaming at all; the single-file layout is mapped onto
these names in `weights.py`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int, groups: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=eps, affine=True)


# For float32 queries shorter than this, PyTorch's CPU attention kernel (flash attention) gives a sample a
# result that depends on its place in the batch, so on the rows beside it (a 1x1-3x1 map at the UNet's
# deepest level, in images of 64-192 pixels a side).
FLASH_MIN_QUERY = 4


class Attention(nn.Module):
    """Multi-head attention of a query sequence over itself or over a context sequence."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        # A list (not a bare Linear) because the checkpoints name this weight `to_out.0.weight`.
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, N, query_dim], context: [B, M, context_dim] (defaults to x)
        context = x if context is None else context
        B, N, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        if N < FLASH_MIN_QUERY and q.device.type == "cpu" and q.dtype == torch.float32:
            # Plain products, which treat every sample alike in any batch. Half precision keeps the kernel,
            # whose rounding the tests hold to the reference's.
            out = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        out = out.transpose(1, 2).reshape(B, N, -1)
        return self.to_out[0](out)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional time-embedding shift, plus a (1x1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, temb_channels: int | None = None):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = group_norm(out_channels, groups, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The VAE pads only bottom/right (asymmetric, padding=0); the UNet pads 1 all round."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv.

    `size` lets the UNet match an odd-sized skip connection (latent sides that are not multiples of 8).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
