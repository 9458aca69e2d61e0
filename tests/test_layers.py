"""The CPU kernels of sdcore.cpu compute what plain PyTorch computes, and `accelerate` swaps them in and out.

The tiny reference models never reach these convolutions on their own (the matmul's kernels must be
>= 32 MiB, Winograd's channels >= 256), so they are checked here directly with the limits lowered,
at the edges of where they run; test_unet runs Winograd inside a whole network against the oracle.
"""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sdcore
from sdcore import cpu, layers
from sdcore.cpu import CPUKernels

ANY_CHANNELS = CPUKernels(winograd_min_channels=0)  # Winograd for the small test convolutions


def conv3x3(in_channels: int, out_channels: int, kernels: CPUKernels = ANY_CHANNELS, stride: int = 1,
            padding: int = 1) -> cpu.FastConv3x3:
    return cpu.accelerate(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=padding), kernels)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 24, 4, 4), (1, 24, 5, 7), (3, 24, 2, 3)])
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (2, 0)])
def test_matmul_convolution_matches_conv2d(shape, stride, padding):
    conv = conv3x3(24, 40, CPUKernels(matmul_min_kernel=0), stride=stride, padding=padding)
    x = torch.randn(shape)
    if padding == 0:
        x = F.pad(x, (0, 1, 0, 1))  # as the VAE's Downsample does
    expected = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
    got = conv(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_matmul_convolution_takes_channels_last_weights():
    conv = conv3x3(24, 40, CPUKernels(matmul_min_kernel=0)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 24, 4, 4)
    assert (conv(x) - F.conv2d(x, conv.weight, conv.bias, padding=1)).abs().max().item() <= 1e-5


def _took_winograd(conv: cpu.FastConv3x3) -> bool:
    return conv._from_weight is not None and cpu.packed_winograd_kernel in conv._from_weight[2]


def _float64_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, stride=conv.stride, padding=conv.padding)


@torch.no_grad()
@pytest.mark.parametrize("shape", [
    (2, 24, 16, 16), (1, 24, 8, 34), (3, 24, 10, 14), (1, 24, 32, 64),
    (2, 24, 40, 40),  # bands of 24 output rows and then of 16
    (1, 24, 2, 300),  # one band of the only two rows
])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_convolution_matches_conv2d(shape, bias):
    conv = conv3x3(24, 40)
    if not bias:
        conv.bias = None
    x = torch.randn(shape)
    exact = _float64_conv(conv, x)
    direct_error = (F.conv2d(x, conv.weight, conv.bias, padding=1) - exact).abs().max().item()
    got = conv(x)
    assert _took_winograd(conv)
    assert got.shape == exact.shape and got.dtype == x.dtype
    # Within a few roundings of float32, as the direct convolution is.
    assert (got - exact).abs().max().item() <= 4 * direct_error + 1e-6


@torch.no_grad()
def test_winograd_convolution_in_bands_of_two_rows():
    conv = conv3x3(16, 8, replace(ANY_CHANNELS, winograd_band_positions=1))
    x = torch.randn(2, 16, 18, 10)
    assert (conv(x) - _float64_conv(conv, x)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_winograd_convolution_keeps_channels_last():
    conv = conv3x3(16, 8)
    x = torch.randn(1, 16, 24, 24).contiguous(memory_format=torch.channels_last)
    got = conv(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got - _float64_conv(conv, x)).abs().max().item() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("shape, stride, channels", [
    ((2, 8, 16, 16), 2, 0),  # stride 2
    ((2, 8, 15, 16), 1, 0),  # an odd side: the 2x2 output blocks would not tile it
    ((1, 8, 8, 8), 1, 0),  # 64 positions and a kernel far below winograd_small_map_min_kernel: too little work
    ((2, 8, 16, 16), 1, 9),  # 8 channels where Winograd needs 9
])
def test_convolution_falls_back_to_conv2d(shape, stride, channels):
    conv = conv3x3(8, 8, CPUKernels(winograd_min_channels=channels), stride=stride)
    x = torch.randn(shape)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1))
    assert conv._from_weight is None


@torch.no_grad()
@pytest.mark.parametrize("side, algorithm", [(2, "matmul"), (3, "matmul"), (4, "winograd"), (16, "winograd")])
@pytest.mark.usefixtures("few_threads")
def test_a_full_size_convolution_computes_each_image_alike_in_any_batch(side, algorithm):
    # One of SD v1.5's 1280-channel kernels, big enough for Winograd on small even maps and for the matmul
    # on an odd one or one of a single 2x2 tile. The algorithm goes by the image's map, so 8 images (4 rows'
    # CFG batches) come out as 2 at a time, to the bit.
    conv = conv3x3(1280, 1280, CPUKernels())
    x = torch.randn(8, 1280, side, side)
    whole = conv(x)
    assert _took_winograd(conv) == (algorithm == "winograd")
    assert torch.equal(whole, torch.cat([conv(pair) for pair in x.split(2)]))


@torch.no_grad()
@pytest.mark.parametrize("side", [2, 4, 8, 16])
def test_winograd_takes_small_maps_only_with_large_kernels(side):
    conv = conv3x3(8, 8, replace(ANY_CHANNELS, winograd_small_map_min_kernel=577))  # 576 numbers
    x = torch.randn(2, 8, side, side)
    small_map = side * side <= ANY_CHANNELS.small_map_positions
    conv(x)
    assert _took_winograd(conv) == (not small_map)
    assert cpu.accelerate(conv, replace(ANY_CHANNELS, winograd_small_map_min_kernel=576)) is conv
    assert (conv(x) - _float64_conv(conv, x)).abs().max().item() <= 1e-5
    # One 2x2 tile per image (side 2) is below winograd_min_positions whatever the kernel.
    assert _took_winograd(conv) == (side * side >= ANY_CHANNELS.winograd_min_positions)


@torch.no_grad()
def test_large_maps_fall_back_even_where_the_matmul_takes_any_kernel():
    conv = conv3x3(8, 8, CPUKernels(matmul_min_kernel=0))
    x = torch.randn(2, 8, 40, 40)  # 3200 positions, beyond the matmul's limit; 8 channels, too few for Winograd
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


@torch.no_grad()
def test_winograd_kernel_follows_the_weight():
    conv = conv3x3(8, 8)
    x = torch.randn(2, 8, 16, 16)
    conv(x)
    first = conv.from_weight(cpu.packed_winograd_kernel)
    assert conv.from_weight(cpu.packed_winograd_kernel) is first  # kept between calls
    conv.load_state_dict({"weight": torch.randn(8, 8, 3, 3), "bias": torch.zeros(8)})  # copied in place
    assert (conv(x) - _float64_conv(conv, x)).abs().max().item() <= 1e-5
    conv.weight = torch.nn.Parameter(torch.randn(8, 8, 3, 3))  # replaced
    assert (conv(x) - _float64_conv(conv, x)).abs().max().item() <= 1e-5
    conv.half().float()  # new storage, rounded to half precision, maybe at the old one's address
    assert conv._from_weight is None
    assert (conv(x) - _float64_conv(conv, x)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_packed_winograd_kernel_gives_the_plain_kernels_result():
    conv = conv3x3(16, 24)
    x = torch.randn(2, 16, 16, 12)
    plain = cpu.winograd_conv3x3(x, cpu.winograd_transform_kernel(conv.weight), conv.bias)
    assert torch.equal(conv(x), plain)
    assert _took_winograd(conv)
    # Unpacked kernels, switched to without remaking the packed ones.
    cpu.accelerate(conv, replace(ANY_CHANNELS, pack_winograd_kernels=False))
    assert torch.equal(conv(x), plain)
    assert list(conv._from_weight[2]) == [cpu.packed_winograd_kernel, cpu.winograd_transform_kernel]


def test_winograd_kernel_follows_weights_made_in_inference_mode():
    # Tensors made under inference mode keep no version counter (reading it raises).
    x = torch.randn(2, 8, 16, 16)
    with torch.inference_mode():
        conv = conv3x3(8, 8)
        assert conv.weight.is_inference()
        assert (conv(x) - _float64_conv(conv, x)).abs().max().item() <= 1e-5
        assert _took_winograd(conv)
        conv.load_state_dict({"weight": torch.randn(8, 8, 3, 3), "bias": torch.zeros(8)})  # copied in place
        assert (conv(x) - _float64_conv(conv, x)).abs().max().item() <= 1e-5


def test_convolution_with_autograd_runs_conv2d():
    conv = conv3x3(8, 8)
    x = torch.randn(2, 8, 16, 16)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv._from_weight is None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 48), (1, 48)])
def test_linear_matches_f_linear_with_and_without_grad(bias, shape):
    lin = cpu.accelerate(nn.Linear(48, 20, bias=bias))
    assert isinstance(lin, cpu.OneDNNLinear)
    x = torch.randn(shape)
    expected = F.linear(x, lin.weight, lin.bias)
    with torch.no_grad():
        assert (lin(x) - expected).abs().max().item() <= 1e-5
    # With autograd on, the plain op runs, so training still works.
    lin(x).sum().backward()
    assert lin.weight.grad is not None


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 48), (2, 77, 48), (1, 2, 48)])
def test_packed_weight_gives_the_plain_weights_product(shape):
    # Packing only saves oneDNN a copy: the same products in the same order, to the bit
    # (for a single row oneDNN takes another kernel with a plain weight).
    w, b, x = torch.randn(20, 48), torch.randn(20), torch.randn(shape)
    assert torch.equal(cpu.linear(x, cpu.pack(w), b), cpu.linear(x, w, b))


@torch.no_grad()
def test_accelerate_swaps_modules_in_place_and_back_sharing_the_weights():
    pipe = sdcore.load_pipeline("builtin:tiny")  # CPU float32: accelerated by its constructor
    modules = [pipe.text_encoder, pipe.unet, pipe.vae]
    params = [dict(m.named_parameters()) for m in modules]
    kinds = {type(m) for module in modules for m in module.modules()}
    assert {cpu.OneDNNLinear, cpu.FastConv3x3, cpu.ChannelsLastDecoder} <= kinds and nn.Linear not in kinds
    z = torch.randn(1, 4, 8, 8)
    fast = pipe.vae.decode(z)
    cpu.accelerate(pipe, None)
    kinds = {type(m) for module in modules for m in module.modules()}
    assert not kinds & {cpu.OneDNNLinear, cpu.FastConv3x3, cpu.ChannelsLastDecoder}
    for before, module in zip(params, modules):  # the same tensors, not copies
        assert all(before[k] is p for k, p in module.named_parameters())
    plain = pipe.vae.decode(z)
    assert (plain - fast).abs().max().item() <= 1e-4
    # Only the switched-on kernels go in.
    cpu.accelerate(pipe, CPUKernels(onednn_linear=False, decoder_channels_last=False))
    kinds = {type(m) for module in modules for m in module.modules()}
    assert cpu.FastConv3x3 in kinds and not kinds & {cpu.OneDNNLinear, cpu.ChannelsLastDecoder}
    cpu.accelerate(pipe)
    assert torch.equal(pipe.vae.decode(z), fast)


@torch.no_grad()
@pytest.mark.parametrize("queries", [1, 3, 4, 16])
@pytest.mark.usefixtures("few_threads")
def test_attention_computes_each_sample_alike_in_any_batch(queries):
    # Queries of 1-3 positions: the UNet's deepest map in images of 64-192 pixels a side, where
    # PyTorch's flash attention would give a sample another result in another place of its batch.
    attn = cpu.accelerate(layers.Attention(64, heads=4, head_dim=16, context_dim=48))
    x, context = torch.randn(6, queries, 64), torch.randn(6, 77, 48)
    whole = attn(x, context)
    assert torch.equal(whole, torch.cat([attn(x[i : i + 2], context[i : i + 2]) for i in range(0, 6, 2)]))
    q, k, v = (t.view(6, -1, 4, 16).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
    reference = attn.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(6, queries, 64))
    assert (whole - reference).abs().max().item() <= 1e-6
