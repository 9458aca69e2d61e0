"""What every noise scheduler shares: settings, the training noise schedule, timestep spacing, noise.

Settings use the keys of a diffusers `scheduler/scheduler_config.json`, and the defaults are what
diffusers ends up with when it builds each algorithm from SD v1.5's published file. Schedules
(timesteps, sigmas) are computed in numpy float64 exactly as the reference computes them: integer
timesteps come from rounding, and a different rounding tie would change the image. Stepping is
plain tensor arithmetic, in the reference's order of operations, so trajectories match it.
"""
import math
import operator

import numpy as np
import torch

# Keys that a scheduler config of any diffusers class usable with SD may hold. An algorithm reads its
# own keys and ignores the others, so one model's config (whatever its class) configures every algorithm.
KNOWN_KEYS = frozenset({
    "algorithm_type", "beta_end", "beta_schedule", "beta_start", "clip_sample", "clip_sample_range",
    "disable_corrector", "dynamic_thresholding_ratio", "eta", "euler_at_final", "final_sigmas_type",
    "flow_shift", "interpolation_type", "lambda_min_clipped", "lower_order_final", "name",
    "noise_sampler_seed", "num_train_timesteps", "predict_x0", "prediction_type",
    "rescale_betas_zero_snr", "rho", "sample_max_value", "set_alpha_to_one", "shift_terminal",
    "sigma_data", "sigma_max", "sigma_min", "sigma_schedule", "skip_prk_steps", "solver_order",
    "solver_p", "solver_type", "steps_offset", "thresholding", "time_shift_type", "timestep_spacing",
    "timestep_type", "trained_betas", "use_beta_sigmas", "use_dynamic_shifting",
    "use_exponential_sigmas", "use_flow_sigmas", "use_karras_sigmas", "use_lu_lambdas", "variance_type",
})

# SD v1.5's scheduler_config.json; each algorithm adds its own keys.
SD15 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
}


class Scheduler:
    """Base of the algorithms. Use: set_timesteps(n), then for t in timesteps: scale_model_input, model, step.
    To start part-way: set_timesteps(n), set_begin_index(k), add_noise at timesteps[k], then walk timesteps[k:]."""

    name: str
    defaults: dict  # the settings this algorithm reads -> SD v1.5 values
    choices: dict = {}  # setting -> allowed values, on top of CHOICES
    unsupported: dict = {}  # reference features not implemented here -> the one value accepted
    pinned: dict = {}  # settings fixed by the algorithm's name; values given for them are ignored
    init_noise_sigma: float | torch.Tensor = 1.0

    def __init__(self, **config):
        cfg = dict(self.defaults)
        for key, value in config.items():
            if key.startswith("_") or key in self.pinned:
                continue
            if key in cfg:
                cfg[key] = value
            elif key in self.unsupported:
                if value != self.unsupported[key]:
                    raise ValueError(f"{self.name}: {key}={value!r} is not supported (only {self.unsupported[key]!r})")
            elif key not in KNOWN_KEYS:
                known = ", ".join(sorted(cfg))
                raise ValueError(f"{self.name}: unknown scheduler setting {key!r}; known settings: {known}")
        cfg.update(self.pinned)
        for key, allowed in {**CHOICES, **self.choices}.items():
            if cfg.get(key) not in allowed:
                raise ValueError(f"{self.name}: {key} must be one of {allowed}, got {cfg.get(key)!r}")
        if cfg["trained_betas"] is not None:
            cfg["trained_betas"] = [float(b) for b in cfg["trained_betas"]]
        self.config = {"name": self.name, **cfg}
        self.alphas_cumprod = torch.cumprod(1.0 - self._betas(), dim=0)  # [T] float32
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._index: int | None = None  # position in timesteps, for algorithms that walk them in order
        self._begin_index: int | None = None  # see set_begin_index

    def _betas(self) -> torch.Tensor:
        c = self.config
        T = c["num_train_timesteps"]
        if c["trained_betas"] is not None:
            return torch.tensor(c["trained_betas"], dtype=torch.float32)
        if c["beta_schedule"] == "linear":
            return torch.linspace(c["beta_start"], c["beta_end"], T, dtype=torch.float32)
        if c["beta_schedule"] == "scaled_linear":
            return torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
        # squaredcos_cap_v2: the cosine schedule of improved DDPM, each beta capped at 0.999.
        alpha_bar = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        return torch.tensor([min(1 - alpha_bar[i + 1] / alpha_bar[i], 0.999) for i in range(T)], dtype=torch.float32)

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = operator.index(num_inference_steps)
        T = self.config["num_train_timesteps"]
        if not 1 <= n <= T:
            raise ValueError(f"{self.name}: the number of steps must be between 1 and {T}, got {n}")
        self.num_inference_steps = n
        self._index = self._begin_index = None
        self._schedule(n)

    def set_begin_index(self, begin: int) -> None:
        """Start the walk part-way, at timesteps[begin] (image to image, inpainting). From then on
        step() and the sigma-based add_noise() take the position of the step in progress, not t's, as
        the reference does once its begin index is set."""
        self._index = self._begin_index = operator.index(begin)

    def _schedule(self, n: int) -> None:
        """Set self.timesteps (and whatever else the algorithm keeps) for n steps; reset its history."""
        raise NotImplementedError

    def _spaced(self, n: int) -> np.ndarray:
        """n timesteps, descending, spread over the training range as `timestep_spacing` says."""
        T = self.config["num_train_timesteps"]
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            return np.linspace(0, T - 1, n)[::-1]
        if spacing == "leading":
            return (np.arange(n) * (T // n))[::-1] + self.config["steps_offset"]
        # trailing: np.arange's accumulated float step decides the rounding ties, so it is kept; for
        # some n (61, 103, ...) it overshoots to n + 1 values ending in timestep -1, which diffusers
        # keeps and we drop.
        return np.round(np.arange(T, 0, -T / n))[:n] - 1

    def _integer_timesteps(self, n: int) -> np.ndarray:
        """Timesteps that index alphas_cumprod (DDPM, DDIM, PNDM), int64, descending."""
        timesteps = np.round(self._spaced(n)).astype(np.int64)
        # Leading spacing plus steps_offset runs one past the last training step when n == T (diffusers
        # then fails with an IndexError); shift the schedule down so that it starts there instead.
        return timesteps - max(0, timesteps[0] - (self.config["num_train_timesteps"] - 1))

    def _position(self, t: int | torch.Tensor) -> int:
        """Index of timestep t; when t appears twice, the second (diffusers' convention)."""
        hits = (self.timesteps == torch.as_tensor(t).cpu()).nonzero().flatten().tolist()
        if not hits:
            raise ValueError(f"{self.name}: timestep {t} is not one of this schedule's timesteps")
        return hits[1] if len(hits) > 1 else hits[0]

    def _current(self, t: int | torch.Tensor) -> int:
        """Index of the step in progress: found from t on the first call, then advanced by step()."""
        if self._index is None:
            self._index = self._position(t)
        return self._index

    def _alpha_prod(self, t: int | torch.Tensor) -> torch.Tensor:
        """ᾱ at timestep t; before the first training step 1, or ᾱ of step 0 when set_alpha_to_one is false."""
        if t >= 0:
            return self.alphas_cumprod[t]
        return torch.tensor(1.0) if self.config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]

    def _sigma_at(self, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """self.sigmas (of the algorithms that keep them) at timestep(s) t, as [B, 1, ...] in like's dtype;
        after set_begin_index, the sigma of the step in progress for every t."""
        sigmas = self.sigmas.to(like.device, like.dtype)
        ts = torch.as_tensor(t).reshape(-1)
        positions = [self._position(s) for s in ts] if self._begin_index is None else [self._index] * len(ts)
        return sigmas[positions].view(-1, *[1] * (like.ndim - 1))

    def scale_model_input(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        return x

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x0 noised to timestep t (one per row, or one for all): sqrt(ᾱ) x0 + sqrt(1 - ᾱ) noise."""
        alpha_prod = self.alphas_cumprod.to(x0.device, x0.dtype)[torch.as_tensor(t, device=x0.device).reshape(-1)]
        alpha_prod = alpha_prod.view(-1, *[1] * (x0.ndim - 1))
        return alpha_prod ** 0.5 * x0 + (1 - alpha_prod) ** 0.5 * noise


def split_prediction(kind: str, model_output: torch.Tensor, x: torch.Tensor, alpha_prod: torch.Tensor):
    """(predicted x0, predicted noise) from a model output of the given prediction type at ᾱ = alpha_prod."""
    beta_prod = 1 - alpha_prod
    if kind == "epsilon":
        return (x - beta_prod ** 0.5 * model_output) / alpha_prod ** 0.5, model_output
    if kind == "sample":
        return model_output, (x - alpha_prod ** 0.5 * model_output) / beta_prod ** 0.5
    x0 = alpha_prod ** 0.5 * x - beta_prod ** 0.5 * model_output  # v_prediction
    return x0, alpha_prod ** 0.5 * model_output + beta_prod ** 0.5 * x


def randn(shape: torch.Size, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise drawn the way diffusers' randn_tensor draws it, so a seeded generator gives the
    reference's noise: with a list of generators row i ([1, ...]) comes from generator i; a generator
    draws on its own device (a CPU generator gives the same numbers whatever device runs the model)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        else:
            rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
            return to_device(torch.cat(rows), device)
    draw_device = device if generator is None else generator.device
    return to_device(torch.randn(shape, generator=generator, device=draw_device, dtype=dtype), device)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x moved to device. A GPU gets it from pinned memory, queued behind its work: a copy from ordinary
    (pageable) host memory would make the host wait for the GPU's queue to drain, once a step for noise."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """Noise-to-signal ratio sqrt((1 - ᾱ) / ᾱ) of every training timestep, ascending (float32)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def karras_sigmas(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/7) (Karras et al. 2022)."""
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by linear interpolation in log sigma."""
    log_sigmas = np.log(np.maximum(sigmas, 1e-10))
    T = len(log_train_sigmas)
    low = np.clip(np.searchsorted(log_train_sigmas, log_sigmas, side="right") - 1, 0, T - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigmas) / (lo - hi), 0, 1)  # lo - hi stays float32 like the reference's
    return (1 - w) * low + w * (low + 1)
