"""sdcore.allocator: freed activations stay in the process, so later steps do not fault them in again."""
import json
import subprocess
import sys

from sdcore import allocator

# A "step" makes two 64 MiB activations from an input and frees them; glibc memory-maps blocks that
# large by default (its adaptive threshold stops at 32 MiB), so every step faults them in afresh.
# Prints the allocator's report and the page faults of each of 12 steps.
STEPS = """
import json, resource, sys
import torch
from sdcore import allocator
report = allocator.keep_freed_memory() if sys.argv[1] == "keep" else allocator.DEFAULT
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2**20)
per_step = []
for _ in range(12):
    before = faults()
    y = x * 2
    z = y + 1
    del y, z
    per_step.append(faults() - before)
print(json.dumps([report, per_step]))
"""
PAGES = 64 * 2**20 // 4096  # of one activation


def steps(mode: str) -> tuple[str, list[int]]:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120, check=True)
    return tuple(json.loads(done.stdout))


def test_freed_activations_are_reused_instead_of_faulted_in_again():
    report, kept = steps("keep")
    default_report, default = steps("default")
    assert report == allocator.KEPT and default_report == allocator.DEFAULT
    assert sum(default[6:]) >= 6 * 2 * PAGES  # both activations of every step, afresh
    # The heap takes a few steps to grow to the steps' pattern; after that, nothing more.
    assert sum(kept[6:]) <= PAGES
