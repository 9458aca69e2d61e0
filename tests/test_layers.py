"""The CPU fast paths in sdcore.layers compute what plain PyTorch computes.

The tiny reference models never reach the matmul convolution (its kernels must be >= 32 MiB), so
it is checked here directly, with the size limits lowered.
"""
import pytest
import torch
import torch.nn.functional as F

from sdcore import layers


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 24, 4, 4), (1, 24, 5, 7), (3, 24, 2, 3)])
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (2, 0)])
def test_matmul_convolution_matches_conv2d(monkeypatch, shape, stride, padding):
    monkeypatch.setattr(layers, "MATMUL_MIN_KERNEL", 0)
    conv = layers.Conv3x3(24, 40, stride=stride, padding=padding)
    x = torch.randn(shape)
    if padding == 0:
        x = F.pad(x, (0, 1, 0, 1))  # as the VAE's Downsample does
    expected = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
    got = conv(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_convolution_falls_back_on_large_maps(monkeypatch):
    monkeypatch.setattr(layers, "MATMUL_MIN_KERNEL", 0)
    conv = layers.Conv3x3(8, 8)
    x = torch.randn(2, 8, 16, 16)  # 512 positions: more than the matmul path takes
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_with_and_without_grad(bias):
    lin = layers.Linear(48, 20, bias=bias)
    x = torch.randn(3, 5, 48)
    expected = F.linear(x, lin.weight, lin.bias)
    with torch.no_grad():
        assert (lin(x) - expected).abs().max().item() <= 1e-5
    # With autograd on, the plain op runs, so training still works.
    lin(x).sum().backward()
    assert lin.weight.grad is not None
