"""A/B of sdcore's CPU speed levers: the loaded modules with and without each, in one process.

A lever is switched off on the very modules under test by giving them back the plain PyTorch
forward of their base class (F.linear, F.conv2d), so "off" is exactly the code before the lever.
"""
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn as nn

from bench.timing import interleaved, median
from sdcore.layers import Conv3x3, Linear

# name -> (what it is, the sdcore class it lives in, the plain base class whose forward it replaces)
LEVERS = {
    "onednn_linear": ("linear layers through oneDNN's matmul instead of F.linear (MKL)", Linear, nn.Linear),
    "small_conv_matmul": ("3x3 convs on small maps as im2col + matmul instead of oneDNN's direct conv",
                          Conv3x3, nn.Conv2d),
}


@contextmanager
def off(module: nn.Module, lever: str) -> Iterator[None]:
    """Within the block, `module`'s submodules run without `lever`."""
    _, cls, base = LEVERS[lever]
    patched = [m for m in module.modules() if isinstance(m, cls)]
    for m in patched:
        m.forward = types.MethodType(base.forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


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
                stack.enter_context(off(module, lever))
            return call()
    return run
