"""Building blocks shared by the UNet and the VAE (and, for `Linear`, the text encoder).

Parameter names follow the published diffusers checkpoints (`to_q`, `to_out.0`, `conv_shortcut`, …)
so that a diffusers folder loads with no renaming at all; the single-file layout is mapped onto
these names in `weights.py`.
"""
import weakref
from collections.abc import Callable

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
    """x @ weight^T + bias; `weight` may be `pack`ed where `_use_onednn(x)`."""
    if _use_onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# Conv3x3 runs Winograd's algorithm where both sides have at least WINOGRAD_MIN_CHANNELS channels: its
# transforms cost per channel what its products save per pair of channels, so with fewer they cost more than
# they save. On maps of more than SMALL_MAP_POSITIONS positions (height x width) that is enough; on smaller
# ones, where a call's fixed cost weighs more, the kernel must also have WINOGRAD_SMALL_MAP_MIN_KERNEL numbers
# or more (640 -> 1280 channels and up: SD's two deepest levels), and the map at least WINOGRAD_MIN_POSITIONS
# (4x4: one 2x2 tile per image saves nothing for two images, and costs the kernel's memory). What Winograd
# does not take there (a stride of 2, an odd side, the smallest maps) runs as a matmul if its kernel has at
# least MATMUL_MIN_KERNEL numbers (32 MiB in float32). Winograd goes through a map in bands of about
# WINOGRAD_BAND_POSITIONS positions, which keeps the transformed tiles in the caches between the transforms
# and the matmuls. The choice goes by one image's map, never by the batch: the algorithms round differently,
# and an image must come out the same in any batch.
SMALL_MAP_POSITIONS = 128
MATMUL_MIN_KERNEL = 1 << 23
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_SMALL_MAP_MIN_KERNEL = 1 << 22
WINOGRAD_MIN_POSITIONS = 16
WINOGRAD_BAND_POSITIONS = 2048


class Conv3x3(nn.Conv2d):
    """A 3x3 convolution that runs as Winograd's F(2x2, 3x3) or as im2col + matmul where that is faster.

    Winograd's algorithm does 2.25x fewer multiplications, as 16 matmuls with a transformed kernel made on
    first use and kept (16/9 the kernel's size): on the UNet's maps of a few hundred channels or more and on
    the VAE decoder's 256- and 512-channel ones. On the CPU, oneDNN's direct convolution also re-lays out the
    whole kernel on every call, which on the UNet's small deepest maps, with kernels of 1280-2560 channels
    (56-113 MiB), costs more than the arithmetic; Winograd's matmuls, and the im2col matmul where Winograd
    does not apply (the stride-2 downsampling), read their kernels as stored. BENCHMARKS.md, "Levers".
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, padding: int = 1):
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=padding)
        # What forward made from the weight: (a weak reference to the weight, that weight's (version, address),
        # {make: made}), dropped when the weight changes. Keyed by `make` so that make bench's lever can switch
        # between packed and plain kernels without remaking them inside its timed runs.
        self._from_weight: tuple[weakref.ref, tuple, dict] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        (s,), (p,) = set(self.stride), set(self.padding)
        Ho, Wo = (H + 2 * p - 3) // s + 1, (W + 2 * p - 3) // s + 1
        positions = Ho * Wo
        # Under torch.compile, inductor's freezing lays the direct convolution's kernel out once, which
        # is the cost the matmul avoids; its oneDNN matmul takes only frozen weights as the right-hand
        # side, and dynamo cannot trace Winograd's writes into strided views (a version without them,
        # compiled, ran no faster than the compiled direct convolution: BENCHMARKS.md, "Levers").
        if not _use_onednn(x) or torch.compiler.is_compiling():
            return super().forward(x)
        small_map, kernel_numbers = positions <= SMALL_MAP_POSITIONS, self.weight.numel()
        tiles_the_map = (s, p) == (1, 1) and H % 2 == W % 2 == 0  # Winograd's 2x2 output blocks
        if (tiles_the_map and min(self.in_channels, self.out_channels) >= WINOGRAD_MIN_CHANNELS
                and positions >= WINOGRAD_MIN_POSITIONS
                and (not small_map or kernel_numbers >= WINOGRAD_SMALL_MAP_MIN_KERNEL)):
            kernel = self.from_weight(packed_winograd_kernel if PACK_WINOGRAD_KERNELS else winograd_transform_kernel)
            return winograd_conv3x3(x, kernel, self.bias)
        if small_map and kernel_numbers >= MATMUL_MIN_KERNEL:
            cols = F.unfold(x, 3, padding=p, stride=s)  # [B, C*9, Ho*Wo], the 3x3 neighbourhoods as columns
            # kernel [out, C*9] @ cols: an image's output comes out as [out, Ho*Wo], in NCHW order,
            # and the columns are read as unfold lays them out (`linear` takes its weight's transpose).
            kernel = self.weight.reshape(self.out_channels, -1)
            out = torch.stack([linear(kernel, image_cols.t(), None) for image_cols in cols])
            if self.bias is not None:
                out += self.bias[:, None]
            return out.view(B, -1, Ho, Wo)
        return super().forward(x)

    def from_weight(self, make: Callable[[torch.Tensor], object]):
        """make(self.weight), made on first use and kept until the weight is replaced or written to in place."""
        w = self.weight
        # Weights made under torch.inference_mode keep no version counter: only inference mode can
        # write to them in place, and load_state_dict's writes drop what was made (_load_from_state_dict).
        state = (None if w.is_inference() else w._version, w.data_ptr())
        if self._from_weight is None or self._from_weight[0]() is not w or self._from_weight[1] != state:
            self._from_weight = (weakref.ref(w), state, {})
        made = self._from_weight[2]
        if make not in made:
            made[make] = make(w)
        return made[make]

    def _apply(self, fn, recurse=True):
        # A conversion may give the weight new storage at the address of the old (a round trip through
        # half precision does), which the check above could not tell from the old.
        self._from_weight = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._from_weight = None
        super()._load_from_state_dict(*args, **kwargs)


# Winograd's F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
# Each 2x2 block of outputs comes from the 4x4 input tile d around it as A^T [(G g G^T) * (B^T d B)] A,
# with * elementwise: 16 products per pair of channels instead of 36. Summed over input channels,
# the 16 elementwise products become 16 matmuls. B^T and A^T hold only 0 and +-1, so the input and
# output transforms are additions; G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].


def winograd_transform_kernel(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T of each 3x3 kernel: [out, in, 3, 3] -> [16, out, in]."""
    weight = weight.detach()
    n_out, n_in = weight.shape[:2]
    u = weight.new_empty(16, n_out, n_in)
    # About 1 MiB of the weight at a time, so that the temporaries stay in the caches instead of being whole
    # copies of a kernel of up to 113 MiB: this runs once per convolution, but inside an actor's first image
    # (bench/levers.md, "Winograd's algorithm on the UNet's smallest maps").
    per_slice = max(1, (1 << 18) // (9 * n_in))  # output channels
    for first in range(0, n_out, per_slice):
        g = weight[first : first + per_slice].permute(2, 3, 0, 1)  # [3 rows, 3 columns, per_slice, in]
        t = _kernel_transform(_kernel_transform(g).transpose(0, 1))  # [4 columns, 4 rows, per_slice, in]
        u[:, first : first + per_slice].view(4, 4, -1, n_in).copy_(t.transpose(0, 1))
    return u


# oneDNN's matmul copies a plain [out, in] weight into its own blocked layout as it goes, at every call;
# a weight given to it already in that layout skips the copy: the same products in the same order
# (but for a single row, which it computes with another kernel from a plain weight), 5-15 % faster per
# matmul at 77-512 rows (Winograd's bands give about 500). Winograd's kernels are made once anyway, so
# they are kept packed, in place of the plain ones. Linear layers would gain as much, but a packed copy
# beside every weight costs 1.3 GiB for SD v1.5 (bench/levers.md).
PACK_WINOGRAD_KERNELS = hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A float32 [out, in] weight laid out for oneDNN's matmul, for `linear` on the CPU."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_winograd_kernel(weight: torch.Tensor) -> list[torch.Tensor]:
    """winograd_transform_kernel's 16 [out, in] matrices, each packed."""
    return [pack(k) for k in winograd_transform_kernel(weight)]


def _kernel_transform(g: torch.Tensor) -> torch.Tensor:
    """G g along g's first dimension (3 long, the result 4 long)."""
    outer = g[0] + g[2]
    return torch.stack([g[0], (outer + g[1]) * 0.5, (outer - g[1]) * 0.5, g[2]])


def winograd_conv3x3(x: torch.Tensor, kernel: torch.Tensor | list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3 convolution, stride 1, padding 1, of x [N, C, H, W] (H and W even) with a transformed kernel
    (`winograd_transform_kernel`'s [16, out, in] or `packed_winograd_kernel`'s list)."""
    N, _, H, W = x.shape
    # The work runs channels-last whatever x's layout: every addition of the transforms then goes over
    # contiguous channel vectors, and every matmul reads its tiles as rows. That made the VAE's convolutions
    # 20-30 % faster; on the UNet's NCHW maps converting x and the output costs about what it saves.
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()  # [N, H+2, W+2, C]
    out = x.new_empty(N, H, W, kernel[0].shape[0])
    rows = max(2, WINOGRAD_BAND_POSITIONS // (N * W) // 2 * 2)  # output rows per band, even: whole tiles
    for top in range(0, H, rows):
        bottom = min(H, top + rows)
        _winograd_band(padded[:, top : bottom + 2], kernel, bias, out[:, top:bottom])
    out = out.permute(0, 3, 1, 2)  # [N, out, H, W], channels-last
    # The output keeps the input's layout, as F.conv2d's does (the VAE decodes channels-last).
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out if channels_last else out.contiguous()


def _winograd_band(d: torch.Tensor, kernel: torch.Tensor | list[torch.Tensor], bias: torch.Tensor | None,
                   out: torch.Tensor) -> None:
    """The convolution of the padded rows d [N, h+2, W+2, C] (h and W even) into out [N, h, W, out]."""
    N, h, W, C = d.shape[0], d.shape[1] - 2, d.shape[2] - 2, d.shape[3]
    Th, Tw = h // 2, W // 2  # tiles down and across
    # B^T d B, first along each tile's 4 columns (for every padded row), then along its 4 rows.
    by_cols = d.new_empty(4, N, h + 2, Tw, C)
    _input_transform(d.unfold(2, 4, 2), by_cols)
    tiles = d.new_empty(16, N, Th, Tw, C)  # entry (4i + j) of every tile's B^T d B
    for j in range(4):
        _input_transform(by_cols[j].unfold(1, 4, 2), tiles[j::4])
    # The 16 matmuls, [tiles, C] @ [C, out]. A^T m A adds entry (1, 1) into all four outputs of a tile,
    # once each, so the bias goes into that product alone.
    n_out = kernel[0].shape[0]
    m = [linear(tiles[k].view(-1, C), kernel[k], bias if k == 5 else None).view(N, Th, Tw, n_out) for k in range(16)]
    # A^T m A: along the columns, then the rows, into the outputs' even and odd rows and columns.
    out_cols = d.new_empty(2, 4, N, Th, Tw, n_out)
    for i in range(4):
        _output_transform(m[4 * i : 4 * i + 4], out_cols[:, i])
    for j in range(2):
        _output_transform(out_cols[j], [out[:, i::2, j::2] for i in range(2)])


def _input_transform(d: torch.Tensor, out) -> None:
    """B^T d along d's last dimension (4 long) into the four tensors of `out`."""
    torch.sub(d[..., 0], d[..., 2], out=out[0])
    torch.add(d[..., 1], d[..., 2], out=out[1])
    torch.sub(d[..., 2], d[..., 1], out=out[2])
    torch.sub(d[..., 1], d[..., 3], out=out[3])


def _output_transform(m, out) -> None:
    """A^T m over the four tensors of `m` into the two tensors of `out`."""
    torch.add(m[0] + m[1], m[2], out=out[0])
    torch.sub(m[1] - m[2], m[3], out=out[1])


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
