"""A/B of sdcore's CPU speed levers: the loaded modules with and without each, in one process.

A lever switched off gives back exactly the code before it: the plain PyTorch forward of the
layer's base class (F.linear), or a size limit of sdcore.layers set so that the lever never applies
(the convolution then runs oneDNN's direct F.conv2d).
"""
import math
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn as nn

from bench.timing import interleaved, median
from sdcore import layers


@contextmanager
def _base_forward(module: nn.Module, cls: type, base: type) -> Iterator[None]:
    """Within the block, `module`'s submodules of class `cls` run `base`'s forward."""
    patched = [m for m in module.modules() if isinstance(m, cls)]
    for m in patched:
        m.forward = types.MethodType(base.forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


@contextmanager
def _limit(name: str, value) -> Iterator[None]:
    """Within the block, sdcore.layers.<name> is `value`."""
    saved = getattr(layers, name)
    setattr(layers, name, value)
    try:
        yield
    finally:
        setattr(layers, name, saved)


# name -> (what it is, the sdcore class it lives in, a context manager that switches it off in a module)
LEVERS = {
    "onednn_linear": ("linear layers through oneDNN's matmul instead of F.linear (MKL)", layers.Linear,
                      lambda module: _base_forward(module, layers.Linear, nn.Linear)),
    "small_conv_matmul": ("3x3 convs with large kernels on small maps that Winograd does not take (stride 2, "
                          "odd sides) as im2col + matmul instead of oneDNN's direct conv", layers.Conv3x3,
                          lambda module: _limit("MATMUL_MIN_KERNEL", math.inf)),
    "winograd_conv": (f"3x3 convs of {layers.WINOGRAD_MIN_CHANNELS} channels or more (on maps of "
                      f"{layers.SMALL_MAP_POSITIONS} positions or fewer, from {layers.WINOGRAD_MIN_POSITIONS} "
                      f"and with kernels of {layers.WINOGRAD_SMALL_MAP_MIN_KERNEL / 2**20:.0f} M numbers or more) "
                      "as Winograd's F(2x2, 3x3) instead of oneDNN's direct conv or, on small maps, the im2col matmul",
                      layers.Conv3x3,
                      lambda module: _limit("WINOGRAD_MIN_CHANNELS", math.inf)),
    "packed_winograd_kernels": ("Winograd's transformed kernels kept laid out for oneDNN's matmul instead of re-laid "
                                "out at every call", layers.Conv3x3, lambda module: _limit("PACK_WINOGRAD_KERNELS", False)),
}


def measure(modules: dict[str, tuple[nn.Module, Callable[[], object]]], reps: int, log) -> list[dict]:
    """For each workload (`name -> (module, call)`): all levers on, each lever it has off alone, all off."""
    rows = []
    for workload, (module, call) in modules.items():
        present = [lever for lever, (_, cls, _) in LEVERS.items() if any(isinstance(m, cls) for m in module.modules())]
        variants = {"all levers": call}
        for lever in present:
            variants[f"without {lever}"] = _without(module, [lever], call)
        if len(present) > 1:
            variants["without any"] = _without(module, present, call)
        log(f"levers: {workload}")
        with torch.inference_mode():
            times = interleaved(variants, reps, log=log)
        best = median(times["all levers"])
        for name, ts in times.items():
            rows.append({"workload": workload, "variant": name, "median_s": median(ts), "runs_s": ts,
                         "slowdown_vs_all": median(ts) / best})
    return rows


def _without(module: nn.Module, levers: list[str], call: Callable[[], object]) -> Callable[[], object]:
    def run():
        with ExitStack() as stack:
            for lever in levers:
                stack.enter_context(LEVERS[lever][2](module))
            return call()
    return run
