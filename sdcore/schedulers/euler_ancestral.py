"""Euler ancestral: an Euler step down to a lower sigma, then fresh noise back up to the next sigma
(the k-diffusion `sample_euler_ancestral` split with eta = 1)."""
import torch

from sdcore.schedulers.base import randn
from sdcore.schedulers.euler import Euler


class EulerAncestral(Euler):
    name = "euler_a"
    choices = {"prediction_type": ("epsilon", "v_prediction")}
    unsupported = {"rescale_betas_zero_snr": False}
    pinned = {"use_karras_sigmas": False, "sigma_min": None, "sigma_max": None, "final_sigmas_type": "zero"}

    def step(self, model_output, t, x, generator=None):
        i = self._current(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.to(torch.float32)
        # Split the move to sigma_next into a deterministic part (down to sigma_down) and new noise
        # (sigma_up) with sigma_down² + sigma_up² = sigma_next².
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        derivative = (x - self._x0(model_output, x, sigma)) / sigma
        prev = x + derivative * (sigma_down - sigma)
        # Drawn on every step, the last one (sigma_up = 0) included, to consume the generator like the reference.
        noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        self._index += 1
        return (prev + noise * sigma_up).to(model_output.dtype)
