"""DDIM (Song et al. 2020): deterministic at eta=0, adds DDPM-like noise scaled by eta."""
import torch

from sdcore.schedulers.base import SD15, Scheduler, randn, split_prediction


class DDIM(Scheduler):
    name = "ddim"
    defaults = {
        **SD15,
        "timestep_spacing": "leading",
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": False,
        "eta": 0.0,  # diffusers takes it as an argument of step(); here it is a setting
    }
    unsupported = {"thresholding": False, "rescale_betas_zero_snr": False}

    def _schedule(self, n: int) -> None:
        self.timesteps = torch.from_numpy(self._integer_timesteps(n))

    def step(self, model_output, t, x, generator=None):
        c = self.config
        # The reference always jumps T // n back, even where the spacing makes the real gap differ
        # (trailing, linspace); that is part of what the reference computes, so it is kept.
        prev_t = t - c["num_train_timesteps"] // self.num_inference_steps
        alpha_prod, alpha_prod_prev = self._alpha_prod(t), self._alpha_prod(prev_t)
        beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev

        x0, eps = split_prediction(c["prediction_type"], model_output, x, alpha_prod)
        if c["clip_sample"]:
            x0 = x0.clamp(-c["clip_sample_range"], c["clip_sample_range"])

        variance = (beta_prod_prev / beta_prod) * (1 - alpha_prod / alpha_prod_prev)
        std = c["eta"] * variance ** 0.5
        prev = alpha_prod_prev ** 0.5 * x0 + (1 - alpha_prod_prev - std ** 2) ** 0.5 * eps
        if c["eta"] > 0:
            prev = prev + std * randn(model_output.shape, generator, model_output.device, model_output.dtype)
        return prev
