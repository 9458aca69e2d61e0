"""A/B of sdcore's CPU kernels (sdcore.cpu): the loaded modules with and without each, in one process.

A lever switched off is a `CPUKernels` with that switch off, swapped in with `sdcore.cpu.accelerate`:
the linear layers become plain nn.Linear, a convolution that the switch no longer lets take a fast
path runs oneDNN's direct F.conv2d. Convolutions keep the kernels they made, so no timed run remakes them.
"""
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn as nn

from bench.timing import interleaved, median
from sdcore import cpu
from sdcore.cpu import CPUKernels

ON = CPUKernels()

# name -> (what it is, the sdcore.cpu class it lives in, the CPUKernels switch that turns it off)
LEVERS = {
    "onednn_linear": ("linear layers through oneDNN's matmul instead of F.linear (MKL)", cpu.OneDNNLinear,
                      "onednn_linear"),
    "small_conv_matmul": ("3x3 convs with large kernels on small maps that Winograd does not take (stride 2, "
                          "odd sides) as im2col + matmul instead of oneDNN's direct conv", cpu.FastConv3x3,
                          "small_conv_matmul"),
    "winograd_conv": (f"3x3 convs of {ON.winograd_min_channels} channels or more (on maps of "
                      f"{ON.small_map_positions} positions or fewer, from {ON.winograd_min_positions} "
                      f"and with kernels of {ON.winograd_small_map_min_kernel / 2**20:.0f} M numbers or more) "
                      "as Winograd's F(2x2, 3x3) instead of oneDNN's direct conv or, on small maps, the im2col matmul",
                      cpu.FastConv3x3, "winograd"),
    "packed_winograd_kernels": ("Winograd's transformed kernels kept laid out for oneDNN's matmul instead of re-laid "
                                "out at every call", cpu.FastConv3x3, "pack_winograd_kernels"),
}


def measure(modules: dict[str, tuple[nn.Module, Callable[[], object]]], reps: int, log,
            kernels: CPUKernels = ON) -> list[dict]:
    """For each workload (`name -> (module, call)`, the module accelerated with `kernels`): all levers on,
    each lever it has off alone, all off."""
    rows = []
    for workload, (module, call) in modules.items():
        present = [lever for lever, (_, cls, _) in LEVERS.items() if any(isinstance(m, cls) for m in module.modules())]
        variants = {"all levers": call}
        for lever in present:
            variants[f"without {lever}"] = _without(module, [lever], call, kernels)
        if len(present) > 1:
            variants["without any"] = _without(module, present, call, kernels)
        log(f"levers: {workload}")
        with torch.inference_mode():
            times = interleaved(variants, reps, log=log)
        best = median(times["all levers"])
        for name, ts in times.items():
            rows.append({"workload": workload, "variant": name, "median_s": median(ts), "runs_s": ts,
                         "slowdown_vs_all": median(ts) / best})
    return rows


def _without(module: nn.Module, levers: list[str], call: Callable[[], object], kernels: CPUKernels
             ) -> Callable[[], object]:
    fewer = replace(kernels, **{LEVERS[lever][2]: False for lever in levers})

    def run():
        cpu.accelerate(module, fewer)
        try:
            return call()
        finally:
            cpu.accelerate(module, kernels)
    return run
