"""Building blocks shared by the UNet and the VAE (and, for `Linear`, the text encoder).

Parameter names follow the published diffusers checkpoints (`to_q`, `to_out.0`, `conv_shortcut`, …)
so that a diffusers folder loads with no renaming at all; the single-file layout is mapped onto
these names in `weights.py`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int, groups: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=eps, affine=True)


# On the CPU, F.linear runs MKL's float32 GEMM, which takes an AVX2 code path on AMD processors;
# oneDNN's matmul (the kernel PyTorch's own CPU compiler emits for linear layers) uses AVX-512 there
# and ran linear layers 2-3x faster on this project's machines (BENCHMARKS.md, "Levers"). Same
# products, summed in another order: results differ by float rounding only. Inference only: the
# op has no backward.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(x: torch.Tensor) -> bool:
    return _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _use_onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# Conv3x3 switches to the matmul for at most this many positions (batch x height x width) and
# kernels of at least this many numbers (32 MiB in float32).
MATMUL_MAX_POSITIONS = 256
MATMUL_MIN_KERNEL = 1 << 23


class Conv3x3(nn.Conv2d):
    """A 3x3 convolution that runs as im2col + matmul where that is faster.

    On the CPU, oneDNN's direct convolution re-lays out the whole kernel on every call. Once a kernel
    outgrows the caches (the UNet's 1280-2560-channel ones, 56-113 MiB) that copy costs more than
    the arithmetic on a few hundred positions, as at the UNet's two deepest levels; a matmul reads
    the kernel as it is stored. Measured here: 1.6-5x faster per conv there, slower elsewhere.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, padding: int = 1):
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        (s,), (p,) = set(self.stride), set(self.padding)
        Ho, Wo = (H + 2 * p - 3) // s + 1, (W + 2 * p - 3) // s + 1
        if not (_use_onednn(x) and B * Ho * Wo <= MATMUL_MAX_POSITIONS and self.weight.numel() >= MATMUL_MIN_KERNEL):
            return super().forward(x)
        cols = F.unfold(x, 3, padding=p, stride=s).transpose(1, 2)  # [B, Ho*Wo, C*9], the 3x3 neighbourhoods
        out = linear(cols, self.weight.reshape(self.out_channels, -1), self.bias)  # [B, Ho*Wo, out]
        return out.transpose(1, 2).reshape(B, -1, Ho, Wo)


class Attention(nn.Module):
    """Multi-head attention of a query sequence over itself or over a context sequence."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(context_dim, inner, bias=bias)
        self.to_v = Linear(context_dim, inner, bias=bias)
        # A list (not a bare Linear) because the checkpoints name this weight `to_out.0.weight`.
        self.to_out = nn.ModuleList([Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, N, query_dim], context: [B, M, context_dim] (defaults to x)
        context = x if context is None else context
        B, N, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        out = out.transpose(1, 2).reshape(B, N, -1)
        return self.to_out[0](out)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional time-embedding shift, plus a (1x1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, temb_channels: int | None = None):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = group_norm(out_channels, groups, eps)
        self.conv2 = Conv3x3(out_channels, out_channels)
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
        self.conv = Conv3x3(channels, channels, stride=2, padding=padding)

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
        self.conv = Conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
