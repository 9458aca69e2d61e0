"""Euler (Karras et al. 2022, Algorithm 2 without churn): the probability-flow ODE in sigma space,
x_sigma = x0 + sigma * noise, integrated with one Euler step per timestep."""
import numpy as np
import torch

from sdcore.schedulers.base import SD15, Scheduler, karras_sigmas, sigma_to_t, train_sigmas


class Euler(Scheduler):
    name = "euler"
    defaults = {
        **SD15,
        "timestep_spacing": "linspace",
        "use_karras_sigmas": False,
        "sigma_min": None,  # Karras range; None = the ends of the spaced schedule
        "sigma_max": None,
        "final_sigmas_type": "zero",
    }
    choices = {"final_sigmas_type": ("zero", "sigma_min")}
    unsupported = {
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "rescale_betas_zero_snr": False,
    }

    def _schedule(self, n: int) -> None:
        c = self.config
        train = train_sigmas(self.alphas_cumprod)
        # Fractional timesteps (linspace) are kept as they are; the model gets them as float32.
        timesteps = self._spaced(n).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
        if c["use_karras_sigmas"]:
            sigma_max = sigmas[0].item() if c["sigma_max"] is None else c["sigma_max"]
            sigma_min = sigmas[-1].item() if c["sigma_min"] is None else c["sigma_min"]
            sigmas = karras_sigmas(sigma_max, sigma_min, n)
            timesteps = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
        last = train[0] if c["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.append(sigmas, last).astype(np.float32))  # [n + 1]
        self.timesteps = torch.from_numpy(timesteps)

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        sigma_max = self.sigmas.max()
        # With leading spacing the reference scales by the input scaling's sqrt(sigma² + 1) instead.
        return sigma_max if self.config["timestep_spacing"] != "leading" else (sigma_max ** 2 + 1) ** 0.5

    def scale_model_input(self, x, t):
        # The model was trained on sqrt(ᾱ) x0 + sqrt(1 - ᾱ) noise, which is x_sigma / sqrt(sigma² + 1).
        sigma = self.sigmas[self._current(t)]
        return x / (sigma ** 2 + 1) ** 0.5

    def _x0(self, model_output, x, sigma):
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return x - sigma * model_output
        if kind == "sample":
            return model_output
        return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)

    def step(self, model_output, t, x, generator=None):
        i = self._current(t)
        sigma = self.sigmas[i]
        x = x.to(torch.float32)
        derivative = (x - self._x0(model_output, x, sigma)) / sigma
        prev = x + derivative * (self.sigmas[i + 1] - sigma)
        self._index += 1
        return prev.to(model_output.dtype)

    def add_noise(self, x0, noise, t):
        return x0 + noise * self._sigma_at(t, x0)
