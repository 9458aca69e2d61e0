"""DDPM (Ho et al. 2020): ancestral sampling, one posterior step per timestep, any number of steps."""
import torch

from sdcore.schedulers.base import SD15, Scheduler, randn, split_prediction


class DDPM(Scheduler):
    name = "ddpm"
    defaults = {
        **SD15,
        "timestep_spacing": "leading",
        "variance_type": "fixed_small",
        "clip_sample": False,
        "clip_sample_range": 1.0,
    }
    # None is what DPM-Solver configs store; like diffusers, it then behaves as fixed_small.
    choices = {"variance_type": ("fixed_small", "fixed_small_log", "fixed_large", None)}
    unsupported = {"thresholding": False, "rescale_betas_zero_snr": False}

    def _schedule(self, n: int) -> None:
        self.timesteps = torch.from_numpy(self._integer_timesteps(n))

    def step(self, model_output, t, x, generator=None):
        c = self.config
        i = self._position(t)
        # With fewer steps than training timesteps the posterior spans the whole jump to the next timestep.
        alpha_prod = self._alpha_prod(t)
        alpha_prod_prev = self._alpha_prod(self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1)
        beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev
        alpha = alpha_prod / alpha_prod_prev
        beta = 1 - alpha

        x0, _ = split_prediction(c["prediction_type"], model_output, x, alpha_prod)
        if c["clip_sample"]:
            x0 = x0.clamp(-c["clip_sample_range"], c["clip_sample_range"])
        # Posterior mean, eq. (7) of the paper.
        prev = (alpha_prod_prev ** 0.5 * beta) / beta_prod * x0 + alpha ** 0.5 * beta_prod_prev / beta_prod * x

        # No noise on a step from timestep 0. With leading spacing the last step starts at timestep 1 and
        # draws noise of std ~1e-10, as the reference does.
        if t > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            # Clamped because the log variants take its log.
            variance = torch.clamp(beta_prod_prev / beta_prod * beta, min=1e-20)
            if c["variance_type"] == "fixed_small_log":
                prev = prev + torch.exp(0.5 * torch.log(variance)) * noise
            elif c["variance_type"] == "fixed_large":
                prev = prev + beta ** 0.5 * noise
            else:
                prev = prev + variance ** 0.5 * noise
        return prev
