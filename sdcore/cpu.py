"""CPU inference kernels, swapped into an already-built model by `accelerate`.

The model files are plain PyTorch. On the CPU, in float32 and without autograd, these modules take
over from nn.Linear and 3x3 nn.Conv2d: linear layers through oneDNN's matmul, and 3x3 convolutions
as Winograd's F(2x2, 3x3) or as im2col + matmul where those beat oneDNN's direct convolution; the
VAE decoder runs channels-last. Each computes what the module it replaces computes, rounded
differently. Anything else (half precision, autograd, another device, torch.compile) runs the plain
module's code. `CPUKernels` holds the switches and limits; BENCHMARKS.md measures what each is
worth.
"""
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdcore.vae import Decoder

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_CAN_PACK = hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@dataclass(frozen=True)
class CPUKernels:
    """Which kernels `accelerate` puts in, and where the convolutions use which algorithm.

    A 3x3 convolution runs Winograd's algorithm where both sides have at least `winograd_min_channels`
    channels (with fewer, its transforms cost more than its products save), on maps of more than
    `small_map_positions` positions; on smaller ones only for kernels of `winograd_small_map_min_kernel`
    numbers or more and maps of `winograd_min_positions` or more. What Winograd does not take on a small map
    (a stride of 2, an odd side) runs as a matmul if its kernel has `matmul_min_kernel` numbers or more.
    The choice goes by one image's map, never by the batch: the algorithms round differently, and an image
    must come out the same in any batch.
    """

    onednn_linear: bool = True
    winograd: bool = True
    small_conv_matmul: bool = True
    # Keep Winograd's transformed kernels in oneDNN's blocked layout, which saves it a copy per call.
    pack_winograd_kernels: bool = _CAN_PACK
    decoder_channels_last: bool = True
    small_map_positions: int = 128
    matmul_min_kernel: float = 1 << 23
    winograd_min_channels: float = 256
    winograd_small_map_min_kernel: float = 1 << 22
    winograd_min_positions: int = 16
    # Winograd goes through a map in bands of about this many positions, which keeps the transformed
    # tiles in the caches between the transforms and the matmuls.
    winograd_band_positions: int = 2048

    @property
    def enabled(self) -> bool:
        return self.onednn_linear or self.winograd or self.small_conv_matmul or self.decoder_channels_last


def accelerate(target, kernels: CPUKernels | None = CPUKernels()):
    """Swap the CPU kernels into `target` in place: a Pipeline (its text encoder, UNet and VAE), a module, or
    modules. `kernels=None`, or kernels with every switch off, puts plain nn.Linear / nn.Conv2d back. The
    weights are shared, never copied.

    Modules that already run these kernels keep what they made from their weights and take the new
    `kernels`. Returns `target`, or for a bare Linear or Conv2d its replacement.
    """
    if isinstance(target, nn.Module):
        _accelerate_tree(target, kernels)
        return _replacement(target, kernels)
    modules = [target.text_encoder, target.unet, target.vae] if hasattr(target, "unet") else list(target)
    for module in modules:
        _accelerate_tree(module, kernels)
    return target


def _accelerate_tree(root: nn.Module, kernels: CPUKernels | None) -> None:
    if kernels is not None and not kernels.enabled:
        kernels = None
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child, kernels)
            if new is not child:
                setattr(parent, name, new)


def _replacement(m: nn.Module, kernels: CPUKernels | None) -> nn.Module:
    on = kernels is not None and kernels.enabled and ONEDNN
    if type(m) in (nn.Linear, OneDNNLinear):
        want = OneDNNLinear if on and kernels.onednn_linear else nn.Linear
        return m if type(m) is want else _take_over(want, m, m.in_features, m.out_features)
    if type(m) in (nn.Conv2d, FastConv3x3) and _is_3x3(m):
        # Convolutions keep their class (and what they made) while any kernel is on; their own switches
        # take effect in forward.
        if on:
            if type(m) is FastConv3x3:
                m.kernels = kernels
                return m
            new = _take_over(FastConv3x3, m, m.in_channels, m.out_channels, 3, stride=m.stride, padding=m.padding)
            new.kernels = kernels
            return new
        if type(m) is FastConv3x3:
            return _take_over(nn.Conv2d, m, m.in_channels, m.out_channels, 3, stride=m.stride, padding=m.padding)
    if isinstance(m, Decoder):
        # The decoder's class changes, not its modules: nothing to rebuild.
        m.__class__ = ChannelsLastDecoder if on and kernels.decoder_channels_last else Decoder
    return m


def _is_3x3(m: nn.Conv2d) -> bool:
    return (m.kernel_size == (3, 3) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and len(set(m.stride)) == 1 and isinstance(m.padding, tuple) and len(set(m.padding)) == 1)


def _take_over(cls: type, old: nn.Module, *args, **kwargs) -> nn.Module:
    """A `cls` built on the meta device (no memory, no init) that adopts `old`'s parameters."""
    with torch.device("meta"):
        new = cls(*args, bias=old.bias is not None, **kwargs)
    new.weight, new.bias = old.weight, old.bias
    return new.train(old.training)


def _use_onednn(x: torch.Tensor) -> bool:
    return ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias through oneDNN's matmul where `_use_onednn(x)`; `weight` may be `pack`ed there."""
    if _use_onednn(x):
        # oneDNN's matmul takes the AVX-512 path on AMD processors, where MKL's (F.linear's) takes AVX2.
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A float32 [out, in] weight laid out for oneDNN's matmul, for `linear` on the CPU."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


class OneDNNLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile, inductor picks the matmul (and packs frozen weights) itself; its lowering of
        # oneDNN's op would need the weights frozen, which merged adapters rule out (sdcore.lora).
        if torch.compiler.is_compiling():
            return super().forward(x)
        return linear(x, self.weight, self.bias)


class ChannelsLastDecoder(Decoder):
    """The VAE decoder on channels-last maps, where oneDNN's convolutions run faster; NCHW output."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z.contiguous(memory_format=torch.channels_last)).contiguous()


class FastConv3x3(nn.Conv2d):
    """A 3x3 convolution that runs as Winograd's F(2x2, 3x3) or as im2col + matmul where that is faster.

    Winograd's algorithm does 2.25x fewer multiplications, as 16 matmuls with a transformed kernel made on
    first use and kept (16/9 the kernel's size). oneDNN's direct convolution also re-lays out the whole
    kernel on every call, which on small maps with large kernels costs more than the arithmetic; Winograd's
    matmuls, and the im2col matmul where Winograd does not apply, read their kernels as stored.
    """

    kernels: CPUKernels = CPUKernels()
    # What forward made from the weight: (a weak reference to the weight, that weight's (version, address),
    # {make: made}), dropped when the weight changes. Keyed by `make` so that switching
    # `pack_winograd_kernels` does not remake the other kernel.
    _from_weight: tuple[weakref.ref, tuple, dict] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] -> [B, out, Ho, Wo]
        k = self.kernels
        B, _, H, W = x.shape
        s, p = self.stride[0], self.padding[0]
        Ho, Wo = (H + 2 * p - 3) // s + 1, (W + 2 * p - 3) // s + 1
        positions = Ho * Wo
        # Under torch.compile, inductor lays the direct convolution's kernel out once; dynamo cannot
        # trace Winograd's writes into strided views.
        if not _use_onednn(x) or torch.compiler.is_compiling():
            return super().forward(x)
        small_map, kernel_numbers = positions <= k.small_map_positions, self.weight.numel()
        tiles_the_map = (s, p) == (1, 1) and H % 2 == W % 2 == 0  # Winograd's 2x2 output blocks
        if (k.winograd and tiles_the_map and min(self.in_channels, self.out_channels) >= k.winograd_min_channels
                and positions >= k.winograd_min_positions
                and (not small_map or kernel_numbers >= k.winograd_small_map_min_kernel)):
            kernel = self.from_weight(packed_winograd_kernel if k.pack_winograd_kernels else winograd_transform_kernel)
            return winograd_conv3x3(x, kernel, self.bias, k.winograd_band_positions)
        if k.small_conv_matmul and small_map and kernel_numbers >= k.matmul_min_kernel:
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

    def made_bytes(self) -> int:
        """Bytes of what this convolution made from its weight so far (Winograd's kernels)."""
        if self._from_weight is None:
            return 0
        values = self._from_weight[2].values()
        tensors = [t for value in values for t in (value if isinstance(value, list) else [value])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _apply(self, fn, recurse=True):
        # A conversion may give the weight new storage at the address of the old (a round trip through
        # half precision does), which the check above could not tell from the old.
        self._from_weight = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._from_weight = None
        super()._load_from_state_dict(*args, **kwargs)


def made_kernel_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of what the FastConv3x3 convolutions in `modules` made from their weights so far."""
    return sum(m.made_bytes() for module in modules for m in module.modules() if isinstance(m, FastConv3x3))


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
    # About 1 MiB of the weight at a time, so that the temporaries stay in the caches instead of being
    # whole copies of a large kernel.
    per_slice = max(1, (1 << 18) // (9 * n_in))  # output channels
    for first in range(0, n_out, per_slice):
        g = weight[first : first + per_slice].permute(2, 3, 0, 1)  # [3 rows, 3 columns, per_slice, in]
        t = _kernel_transform(_kernel_transform(g).transpose(0, 1))  # [4 columns, 4 rows, per_slice, in]
        u[:, first : first + per_slice].view(4, 4, -1, n_in).copy_(t.transpose(0, 1))
    return u


def packed_winograd_kernel(weight: torch.Tensor) -> list[torch.Tensor]:
    """winograd_transform_kernel's 16 [out, in] matrices, each packed."""
    return [pack(k) for k in winograd_transform_kernel(weight)]


def _kernel_transform(g: torch.Tensor) -> torch.Tensor:
    """G g along g's first dimension (3 long, the result 4 long)."""
    outer = g[0] + g[2]
    return torch.stack([g[0], (outer + g[1]) * 0.5, (outer - g[1]) * 0.5, g[2]])


def winograd_conv3x3(x: torch.Tensor, kernel: torch.Tensor | list[torch.Tensor], bias: torch.Tensor | None,
                     band_positions: int = CPUKernels.winograd_band_positions) -> torch.Tensor:
    """A 3x3 convolution, stride 1, padding 1, of x [N, C, H, W] (H and W even) with a transformed kernel
    (`winograd_transform_kernel`'s [16, out, in] or `packed_winograd_kernel`'s list)."""
    N, _, H, W = x.shape
    # The work runs channels-last whatever x's layout: every addition of the transforms then goes over
    # contiguous channel vectors, and every matmul reads its tiles as rows.
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()  # [N, H+2, W+2, C]
    out = x.new_empty(N, H, W, kernel[0].shape[0])
    rows = max(2, band_positions // (N * W) // 2 * 2)  # output rows per band, even: whole tiles
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
