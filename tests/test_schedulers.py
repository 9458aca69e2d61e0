"""Schedulers against the diffusers classes, configured the same way (SD v1.5's published config plus
overrides): whole trajectories driven by a synthetic model must match step for step."""
import inspect
import json

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from reference import sd15_config
from sdcore import schedulers

diffusers.utils.logging.set_verbosity_error()
# diffusers mixes numpy 2 and tensors in ways numpy warns about, thousands of times.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
REFERENCE = {
    "ddpm": (diffusers.DDPMScheduler, {}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, DPMPP),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {**DPMPP, "use_karras_sigmas": True}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
}
NAMES = list(REFERENCE)
PREDICTIONS = {name: ("epsilon", "v_prediction", "sample") for name in NAMES}
PREDICTIONS["pndm"] = PREDICTIONS["euler_a"] = ("epsilon", "v_prediction")  # what the reference supports
SPACINGS = ("leading", "trailing", "linspace")
SHAPE = (2, 4, 5, 6)
TOL = 1e-5


def reference(name: str, **overrides):
    cls, extra = REFERENCE[name]
    return cls.from_config({**sd15_config("scheduler"), **extra, **overrides})


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for the UNet: depends on the sample and the timestep, row by row."""
    phase = torch.linspace(0, 6, x[0].numel()).view(x.shape[1:])
    return (0.1 * x + torch.sin(float(t) / 50 + phase)).to(x.dtype)


def generators(kind: str | None, rows: int = SHAPE[0]):
    if kind == "single":
        return torch.Generator().manual_seed(7)
    if kind == "list":
        return [torch.Generator().manual_seed(7 + i) for i in range(rows)]
    return None


def generator_states(g):
    return [s.get_state() for s in (g if isinstance(g, list) else [g] if g is not None else [])]


def trajectory_parity(
    name, steps, overrides=None, gen="list", eta=0.0, shape=SHAPE, dtype=torch.float32, tol=TOL, rel_tol=0.0
):
    """Run ours and the reference side by side; check timesteps, input scaling and every sample
    (to within tol, or rel_tol times the sample's largest magnitude if that is more)."""
    overrides = overrides or {}
    ours = schedulers.make(name, **overrides, **({"eta": eta} if name == "ddim" else {}))
    ref = reference(name, **overrides)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert type(ours.init_noise_sigma) is type(ref.init_noise_sigma)
    assert abs(float(ours.init_noise_sigma) - float(ref.init_noise_sigma)) <= 1e-6

    step_params = inspect.signature(ref.step).parameters
    g_ours, g_ref = generators(gen, shape[0]), generators(gen, shape[0])
    ref_kwargs = {"generator": g_ref} if "generator" in step_params else {}
    if name == "ddim":
        ref_kwargs["eta"] = eta
    def assert_close(ours_, ref_, what):
        diff = (ours_.float() - ref_.float()).abs().max().item()
        assert diff <= max(tol, rel_tol * ref_.float().abs().max().item()), f"{what}: max abs diff {diff}"

    start = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    x_ours, x_ref = start * ours.init_noise_sigma, start * ref.init_noise_sigma
    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):
        in_ours, in_ref = ours.scale_model_input(x_ours, t_ours), ref.scale_model_input(x_ref, t_ref)
        assert_close(in_ours, in_ref, f"scale_model_input at step {i} (t={t_ref.item()})")
        x_ours = ours.step(fake_model(in_ours, t_ours), t_ours, x_ours, generator=g_ours)
        x_ref = ref.step(fake_model(in_ref, t_ref), t_ref, x_ref, **ref_kwargs).prev_sample
        assert x_ours.dtype == x_ref.dtype
        assert_close(x_ours, x_ref, f"step {i} (t={t_ref.item()})")
    assert torch.isfinite(x_ours).all()
    # Both consumed their generators identically (same draws, same shapes).
    assert all(torch.equal(a, b) for a, b in zip(generator_states(g_ours), generator_states(g_ref)))
    return x_ours


MAIN = [
    (name, steps, spacing, prediction)
    for name in NAMES
    for steps in (1, 2, 7, 20, 50)
    for spacing in SPACINGS
    for prediction in PREDICTIONS[name]
]


@pytest.mark.parametrize("name,steps,spacing,prediction", MAIN)
def test_trajectory_matches_reference(name, steps, spacing, prediction):
    trajectory_parity(name, steps, {"timestep_spacing": spacing, "prediction_type": prediction})


@pytest.mark.parametrize("gen", ["single", "list"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_with_eta(steps, spacing, gen):
    trajectory_parity("ddim", steps, {"timestep_spacing": spacing}, gen=gen, eta=0.7)


@pytest.mark.parametrize("gen", ["single", "list", None])
@pytest.mark.parametrize("name", ["ddpm", "euler_a"])
def test_stochastic_generator_forms(name, gen):
    trajectory_parity(name, 20, gen=gen, tol=TOL if gen else float("inf"))  # None: unseeded, shapes only


@pytest.mark.parametrize("variance_type", ["fixed_small_log", "fixed_large", None])
@pytest.mark.parametrize("steps", [7, 50])
def test_ddpm_variance_types(steps, variance_type):
    trajectory_parity("ddpm", steps, {"variance_type": variance_type})


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddpm_all_1000_steps(spacing):
    trajectory_parity("ddpm", 1000, {"timestep_spacing": spacing}, shape=(2, 1, 2, 2))


def test_ddpm_1000_leading_steps_ends_at_the_last_training_step():
    # diffusers' leading spacing with SD v1.5's steps_offset=1 asks for timestep 1000 and fails;
    # ours shifts the schedule down to 999..0, which is diffusers with steps_offset=0.
    ref = reference("ddpm")
    ref.set_timesteps(1000)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(IndexError):
        ref.step(x, ref.timesteps[0], x)
    ours = schedulers.make("ddpm")
    ours.set_timesteps(1000)
    assert torch.equal(ours.timesteps, torch.arange(999, -1, -1))
    ref = reference("ddpm", steps_offset=0)
    ref.set_timesteps(1000)
    g_ours, g_ref = generators("list", 1), generators("list", 1)
    x_ours = x_ref = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps:
        x_ours = ours.step(fake_model(x_ours, t), t, x_ours, generator=g_ours)
        x_ref = ref.step(fake_model(x_ref, t), t, x_ref, generator=g_ref).prev_sample
    assert (x_ours - x_ref).abs().max() <= TOL


OPTIONS = [
    ("ddpm", {"clip_sample": True, "clip_sample_range": 1.5}),
    ("ddim", {"clip_sample": True}),
    ("ddim", {"set_alpha_to_one": True}),
    ("pndm", {"set_alpha_to_one": True}),
    ("ddim", {"timestep_spacing": "leading", "steps_offset": 0}),
    ("pndm", {"timestep_spacing": "leading", "steps_offset": 0}),
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"use_karras_sigmas": True, "timestep_spacing": "leading", "sigma_min": 0.1, "sigma_max": 10.0}),
    ("euler", {"final_sigmas_type": "sigma_min"}),
    ("lms", {"use_karras_sigmas": True}),
    ("dpmpp_2m_karras", {"sigma_min": 0.1, "sigma_max": 10.0}),
    ("dpmpp_2m", {"solver_type": "heun"}),
    ("dpmpp_2m", {"lower_order_final": False}),
    ("dpmpp_2m", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpmpp_2m_karras", {"final_sigmas_type": "sigma_min"}),
] + [
    (name, betas)
    for name in NAMES
    for betas in (
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"trained_betas": np.linspace(0.001, 0.03, 1000).tolist()},
    )
    # Karras sigmas on the cosine schedule repeat the first timestep; diffusers then runs off the end of
    # its sigmas (IndexError), and so do we.
    if not (name == "dpmpp_2m_karras" and betas.get("beta_schedule") == "squaredcos_cap_v2")
]


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("name,overrides", OPTIONS)
def test_options_match_reference(name, overrides, steps):
    # These beta schedules reach sigma 150 to 20000, where float32 spacing exceeds 1e-5; LMS's exact
    # coefficients then differ from the reference's float32 quadrature in the last bit.
    rel_tol = 1e-6 if name == "lms" and ("beta_schedule" in overrides or "trained_betas" in overrides) else 0.0
    trajectory_parity(name, steps, overrides, rel_tol=rel_tol)


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_matches_reference(name):
    trajectory_parity(name, 10, dtype=torch.float16, tol=0.0)


# Step counts for the schedule-only comparison: small ones, rounding ties, trailing overshoots, the ends.
SCHEDULE_STEPS = [*range(1, 31), 48, 61, 96, 100, 103, 250, 333, 500, 501, 976, 999, 1000]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", NAMES)
def test_schedules_match_reference(name, spacing):
    for n in SCHEDULE_STEPS:
        ours, ref = schedulers.make(name, timestep_spacing=spacing), reference(name, timestep_spacing=spacing)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        expected = ref.timesteps
        if len(ref.timesteps) == len(ours.timesteps) + 1:
            # diffusers' np.arange overshoots to one extra step at timestep -1; ours stops at n steps.
            assert spacing == "trailing" and len(np.arange(1000, 0, -1000 / n)) > n and ref.timesteps[-1] == -1
            expected = expected[:-1]
        elif spacing == "leading" and n == 1000 and name in ("ddpm", "ddim", "pndm"):
            expected = expected - 1  # see test_ddpm_1000_leading_steps_ends_at_the_last_training_step
        assert ours.timesteps.dtype == ref.timesteps.dtype, n
        assert torch.equal(ours.timesteps, expected), n
        if hasattr(ours, "sigmas"):
            k = len(ours.sigmas) - 1  # the trailing overshoot changes only the reference's final sigma
            assert torch.allclose(ours.sigmas[:k], ref.sigmas[:k], rtol=1e-6, atol=0), n
        assert abs(float(ours.init_noise_sigma) - float(ref.init_noise_sigma)) <= 1e-6, n


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_matches_reference(name):
    ours, ref = schedulers.make(name), reference(name)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = ref.timesteps[[2, 11]]
    assert (ours.add_noise(x0, noise, t) - ref.add_noise(x0, noise, t)).abs().max() <= TOL
    one = ref.add_noise(x0, noise, ref.timesteps[5:6])
    assert (ours.add_noise(x0, noise, ours.timesteps[5]) - one).abs().max() <= TOL


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("begin", [0, 4, 9])
def test_walk_started_part_way_matches_reference(name, begin):
    """As image to image and inpainting use it: noise a clean sample to timesteps[begin], walk the rest,
    and after every step noise the clean sample again to the next timestep (the known region's blend)."""
    ours, ref = schedulers.make(name), reference(name)
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    g_ours, g_ref = generators("list"), generators("list")
    ref_kwargs = {"generator": g_ref} if "generator" in inspect.signature(ref.step).parameters else {}
    for sched in (ours, ref):
        sched.set_timesteps(10)
    ours.set_begin_index(begin)
    if hasattr(ref, "set_begin_index"):  # as the reference pipelines call it (DDPM, DDIM, PNDM go by t)
        ref.set_begin_index(begin)
    timesteps = ref.timesteps[begin:]
    x_ours, x_ref = ours.add_noise(x0, noise, timesteps[:1]), ref.add_noise(x0, noise, timesteps[:1])
    assert (x_ours - x_ref).abs().max() <= TOL
    for i, t in enumerate(timesteps):
        x_ours = ours.step(fake_model(ours.scale_model_input(x_ours, t), t), t, x_ours, generator=g_ours)
        x_ref = ref.step(fake_model(ref.scale_model_input(x_ref, t), t), t, x_ref, **ref_kwargs).prev_sample
        assert (x_ours - x_ref).abs().max() <= TOL, f"step {i}"
        if i + 1 < len(timesteps):
            next_t = timesteps[i + 1 : i + 2]
            assert (ours.add_noise(x0, noise, next_t) - ref.add_noise(x0, noise, next_t)).abs().max() <= TOL, i
    assert all(torch.equal(a, b) for a, b in zip(generator_states(g_ours), generator_states(g_ref)))


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler_a"])
def test_rows_do_not_depend_on_their_batch(name):
    """With one generator per row, a row's trajectory is the same alone or in a batch."""
    def run(rows):
        sched = schedulers.make(name, eta=0.5)
        sched.set_timesteps(12)
        gens = generators("list", 3)[:rows]
        x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))[:rows] * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x, generator=gens)
        return x

    batch = run(3)
    assert torch.equal(run(1)[0], batch[0])
    assert torch.equal(run(2), batch[:2])


@pytest.mark.parametrize("name", ["pndm", "dpmpp_2m", "lms", "euler"])
def test_set_timesteps_resets_history(name):
    sched = schedulers.make(name)
    outputs = []
    for steps in (9, 4, 9):
        sched.set_timesteps(steps)
        x = torch.ones(1, 4, 2, 2) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x)
        outputs.append(x)
    assert torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_sd15_as_diffusers_reads_it(name):
    ours, ref = schedulers.make(name), reference(name)
    shared = [k for k in ours.config if k in ref.config]
    assert len(shared) >= 7
    assert {k: ours.config[k] for k in shared} == {k: ref.config[k] for k in shared}


@pytest.mark.parametrize("name", NAMES)
def test_config_is_json_and_round_trips(name):
    sched = schedulers.make(name, timestep_spacing="trailing", trained_betas=np.linspace(0.001, 0.02, 1000))
    config = json.loads(json.dumps(sched.config))
    assert config["name"] == name
    assert schedulers.make(config["name"], **config).config == sched.config


# DPMSolverSDEScheduler needs torchsde, which is not installed; its keys are in KNOWN_KEYS all the same.
@pytest.mark.parametrize("source", [e.name for e in KarrasDiffusionSchedulers if e.name != "DPMSolverSDEScheduler"])
def test_accepts_any_sd_scheduler_config(source):
    """A model folder may ship any SD-compatible scheduler's config, as save_pretrained writes it (all keys)."""
    config = dict(getattr(diffusers, source).from_config(sd15_config("scheduler")).config)
    for name in NAMES:
        schedulers.make(name, **config).set_timesteps(3)
    if source in ("DEISMultistepScheduler", "UniPCMultistepScheduler"):  # solver_type logrho / bh2
        assert schedulers.make("dpmpp_2m", **config).config["solver_type"] == "midpoint"


def test_names():
    assert schedulers.NAMES == ("ddpm", "ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms")


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="'dpm_2m'.*ddpm, ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lms"):
        schedulers.make("dpm_2m")


def test_unknown_key_is_named_with_the_known_keys():
    with pytest.raises(ValueError, match="'beta_strat'.*beta_start") as err:
        schedulers.make("ddim", beta_strat=0.001)
    assert "set_alpha_to_one" in str(err.value) and "eta" in str(err.value)


def test_other_algorithms_keys_and_private_keys_are_ignored():
    a = schedulers.make("ddim", skip_prk_steps=True, variance_type="fixed_large", _class_name="PNDMScheduler")
    assert a.config == schedulers.make("ddim").config
    assert schedulers.make("euler", eta=0.3).config == schedulers.make("euler").config


def test_name_pins_the_algorithm():
    assert schedulers.make("dpmpp_2m", use_karras_sigmas=True).config["use_karras_sigmas"] is False
    assert schedulers.make("dpmpp_2m_karras", use_karras_sigmas=False).config["use_karras_sigmas"] is True
    assert schedulers.make("pndm", skip_prk_steps=False).config["skip_prk_steps"] is True


@pytest.mark.parametrize("name,overrides", [
    ("ddim", {"thresholding": True}),
    ("euler", {"rescale_betas_zero_snr": True}),
    ("dpmpp_2m", {"use_lu_lambdas": True}),
    ("pndm", {"prediction_type": "sample"}),
    ("euler_a", {"prediction_type": "sample"}),
    ("ddim", {"timestep_spacing": "uniform"}),
    ("ddpm", {"beta_schedule": "sigmoid"}),
    ("ddpm", {"variance_type": "learned"}),
])
def test_unsupported_values_raise(name, overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        schedulers.make(name, **overrides)


@pytest.mark.parametrize("steps", [0, 1001])
def test_step_count_out_of_range(steps):
    with pytest.raises(ValueError, match="between 1 and 1000"):
        schedulers.make("ddpm").set_timesteps(steps)
