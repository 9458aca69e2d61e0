"""PLMS (Liu et al. 2022, pseudo linear multistep): the PNDM variant without Runge-Kutta warm-up,
SD v1.5's own scheduler. Adams-Bashforth on the model's noise predictions, up to fourth order."""
import numpy as np
import torch

from sdcore.schedulers.base import SD15, Scheduler


class PNDM(Scheduler):
    name = "pndm"
    defaults = {**SD15, "timestep_spacing": "leading", "set_alpha_to_one": False}
    choices = {"prediction_type": ("epsilon", "v_prediction")}
    pinned = {"skip_prk_steps": True}  # the Runge-Kutta warm-up (skip_prk_steps false) is not implemented

    def _schedule(self, n: int) -> None:
        timesteps = self._integer_timesteps(n)
        # The second timestep is visited twice: the first step is improved Euler, which needs a second
        # model evaluation at the point it stepped to before the multistep formula has any history.
        self.timesteps = torch.from_numpy(np.concatenate([timesteps[:1], timesteps[1:2], timesteps[1:]]))
        self._history = []  # model outputs of the last (up to) four distinct timesteps
        self._start = None  # the sample the improved Euler step restarts from
        self._count = 0

    def step(self, model_output, t, x, generator=None):
        jump = self.config["num_train_timesteps"] // self.num_inference_steps
        prev_t = t - jump
        if self._count == 1:
            # Second evaluation: redo the first step from its start with the averaged slope.
            prev_t, t = t, t + jump
            eps = (model_output + self._history[-1]) / 2
            x, self._start = self._start, None
        else:
            self._history = self._history[-3:] + [model_output]
            e = self._history
            if len(e) == 1:
                eps = model_output
                self._start = x
            elif len(e) == 2:
                eps = (3 * e[-1] - e[-2]) / 2
            elif len(e) == 3:
                eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
            else:
                eps = 1 / 24 * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self._count += 1
        return self._prev_sample(x, t, prev_t, eps)

    def _prev_sample(self, x, t, prev_t, model_output):
        """x at prev_t from x at t along the DDIM (eta 0) path for the given noise prediction (eq. 11 of the paper)."""
        alpha_prod, alpha_prod_prev = self._alpha_prod(t), self._alpha_prod(prev_t)
        beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = alpha_prod ** 0.5 * model_output + beta_prod ** 0.5 * x
        denominator = alpha_prod * beta_prod_prev ** 0.5 + (alpha_prod * beta_prod * alpha_prod_prev) ** 0.5
        return (alpha_prod_prev / alpha_prod) ** 0.5 * x - (alpha_prod_prev - alpha_prod) * model_output / denominator
