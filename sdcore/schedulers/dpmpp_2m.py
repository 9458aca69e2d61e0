"""DPM-Solver++(2M) (Lu et al. 2022): second-order multistep solver of the diffusion ODE in
log-SNR time, on data (x0) predictions. `dpmpp_2m_karras` spaces its sigmas as Karras et al. do."""
import numpy as np
import torch

from sdcore.schedulers.base import SD15, Scheduler, karras_sigmas, sigma_to_t, train_sigmas


class DPMSolverPP2M(Scheduler):
    name = "dpmpp_2m"
    defaults = {
        **SD15,
        "timestep_spacing": "linspace",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "sigma_min": None,  # Karras range; None = the training range
        "sigma_max": None,
    }
    choices = {"solver_type": ("midpoint", "heun"), "final_sigmas_type": ("zero", "sigma_min")}
    unsupported = {
        "thresholding": False,
        "lambda_min_clipped": float("-inf"),
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "rescale_betas_zero_snr": False,
    }
    pinned = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}

    def __init__(self, **config):
        # DEIS and UniPC configs name their own solvers here; diffusers falls back to midpoint for them.
        if config.get("solver_type") in ("logrho", "bh1", "bh2"):
            config["solver_type"] = "midpoint"
        super().__init__(**config)

    def _schedule(self, n: int) -> None:
        c = self.config
        train = train_sigmas(self.alphas_cumprod)
        # linspace and leading space n + 1 points and drop the last (timestep 0).
        spaced = self._spaced(n) if c["timestep_spacing"] == "trailing" else self._spaced(n + 1)[:-1]
        timesteps = np.round(spaced)
        if c["use_karras_sigmas"]:
            sigma_max = train[-1].item() if c["sigma_max"] is None else c["sigma_max"]
            sigma_min = train[0].item() if c["sigma_min"] is None else c["sigma_min"]
            sigmas = karras_sigmas(sigma_max, sigma_min, n)
            timesteps = sigma_to_t(sigmas, np.log(train))
            if c["beta_schedule"] != "squaredcos_cap_v2":  # the reference truncates instead for cosine schedules
                timesteps = np.round(timesteps)
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        last = train[0] if c["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.append(sigmas, last).astype(np.float32))  # [n + 1]
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64))
        self._x0_history = [None, None]  # data predictions of the previous and the current step

    def _alpha_sigma_lambda(self, i: int):
        """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of the i-th sigma (x_t = alpha_t x0 + sigma_t eps)."""
        alpha = 1 / (self.sigmas[i] ** 2 + 1) ** 0.5
        sigma = self.sigmas[i] * alpha
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def step(self, model_output, t, x, generator=None):
        c = self.config
        i = self._current(t)
        n = len(self.timesteps)
        # The last step goes to sigma 0 (lambda = inf), where only the first-order update is finite.
        final_first_order = i == n - 1 and (
            c["euler_at_final"] or (c["lower_order_final"] and n < 15) or c["final_sigmas_type"] == "zero"
        )
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(i)
        kind = c["prediction_type"]
        if kind == "epsilon":
            x0 = (x - sigma_s * model_output) / alpha_s
        elif kind == "sample":
            x0 = model_output
        else:
            x0 = alpha_s * x - sigma_s * model_output
        self._x0_history = [self._x0_history[-1], x0]

        x = x.to(torch.float32)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        h = lambda_t - lambda_s
        # First-order update (DDIM in log-SNR time); the 2M step corrects it with the slope of x0 over the last step.
        prev = sigma_t / sigma_s * x - alpha_t * (torch.exp(-h) - 1.0) * x0
        if self._x0_history[0] is not None and not final_first_order:
            h_prev = lambda_s - self._alpha_sigma_lambda(i - 1)[2]
            d1 = 1.0 / (h_prev / h) * (x0 - self._x0_history[0])
            if c["solver_type"] == "midpoint":
                prev = prev - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            else:
                prev = prev + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * d1
        self._index += 1
        return prev.to(x0.dtype)

    def add_noise(self, x0, noise, t):
        sigma = self._sigma_at(t, x0)
        alpha = 1 / (sigma ** 2 + 1) ** 0.5
        return alpha * x0 + sigma * alpha * noise


class DPMSolverPP2MKarras(DPMSolverPP2M):
    name = "dpmpp_2m_karras"
    pinned = {**DPMSolverPP2M.pinned, "use_karras_sigmas": True}
