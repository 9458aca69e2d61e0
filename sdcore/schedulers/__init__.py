"""Noise schedulers by name: `make("dpmpp_2m", **scheduler_config)`.

Each takes the keys of a diffusers scheduler_config.json and, at its defaults, equals the diffusers
class built from SD v1.5's published config: ddpm DDPMScheduler, ddim DDIMScheduler, pndm
PNDMScheduler (PLMS), euler EulerDiscreteScheduler, euler_a EulerAncestralDiscreteScheduler,
dpmpp_2m / dpmpp_2m_karras DPMSolverMultistepScheduler (dpmsolver++, order 2, Karras sigmas or not),
lms LMSDiscreteScheduler.
"""
from sdcore.schedulers.base import Scheduler
from sdcore.schedulers.ddim import DDIM
from sdcore.schedulers.ddpm import DDPM
from sdcore.schedulers.dpmpp_2m import DPMSolverPP2M, DPMSolverPP2MKarras
from sdcore.schedulers.euler import Euler
from sdcore.schedulers.euler_ancestral import EulerAncestral
from sdcore.schedulers.lms import LMS
from sdcore.schedulers.pndm import PNDM

SCHEDULERS = {
    cls.name: cls for cls in (DDPM, DDIM, PNDM, Euler, EulerAncestral, DPMSolverPP2M, DPMSolverPP2MKarras, LMS)
}
NAMES = tuple(SCHEDULERS)


def make(name: str, /, **config) -> Scheduler:
    """The scheduler called `name`, configured by scheduler_config.json keys (others' keys are ignored)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known schedulers: {', '.join(NAMES)}")
    return SCHEDULERS[name](**config)
