"""The work in each benchmark figure, counted, and what this machine's cores can do at most.

FLOPs are counted by running sdcore's SD v1.5 modules on the `meta` device under torch's
FlopCounterMode (matmuls, convolutions and attention; elementwise work is left out), so a figure's
time turns into the rate it achieved. The CPU's ceiling is measured, not looked up: a large
float32 matmul through oneDNN, the kernel both libraries' convolutions and sdcore's linear layers use.
"""
import functools
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

TOKENS = 77


@functools.cache
def _modules():
    from sdcore.clip import CLIPTextConfig, CLIPTextEncoder
    from sdcore.unet import UNet, UNetConfig
    from sdcore.vae import AutoencoderKL, VAEConfig

    with torch.device("meta"):
        return UNet(UNetConfig()), AutoencoderKL(VAEConfig()), CLIPTextEncoder(CLIPTextConfig())


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.device("meta"):
        fn()
    return counter.get_total_flops()


@functools.cache
def unet_row(size: int) -> int:
    """One UNet call on one latent of a size x size image (a CFG step is two of these)."""
    unet, _, _ = _modules()
    side = size // 8
    return _count(lambda: unet(torch.empty(1, 4, side, side), torch.tensor(500.0), torch.empty(1, TOKENS, 768)))


@functools.cache
def vae_decode(size: int) -> int:
    _, vae, _ = _modules()
    return _count(lambda: vae.decode(torch.empty(1, 4, size // 8, size // 8)))


@functools.cache
def text_encode() -> int:
    """One prompt through the text encoder."""
    _, _, text = _modules()
    return _count(lambda: text(torch.zeros(1, TOKENS, dtype=torch.long)))


def image(size: int, steps: int) -> int:
    """One CFG image: prompt and negative prompt encoded, 2 x steps UNet rows, one decode."""
    return 2 * text_encode() + 2 * steps * unet_row(size) + vae_decode(size)


def cpu_matmul_peak(n: int = 3072, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` n x n x n float32 matmuls (sdcore's linear: oneDNN where it has
    it), on torch's threads."""
    from sdcore.cpu import linear

    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch.inference_mode():
        linear(a, b, None)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            linear(a, b, None)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
