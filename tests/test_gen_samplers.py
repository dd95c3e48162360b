"""Samplers against diffusers (the schedulers kohya's scripts run) and against an analytic denoiser.

Golden values: tests/fixtures/gen_golden/samplers.json, made by running diffusers' schedulers with
kohya's configurations (its `_source` says which); only the values are stored.
"""

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from library.errors import UserError
from library.generation import samplers
from library.generation.samplers import sample

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "gen_golden" / "samplers.json").read_text())
PRESET = {"gen": "generator", "train": "training"}
NAMES = list(samplers._SAMPLERS)


def _recording_model(calls):
    def model(x_in, t):
        calls.append(t)
        return np.zeros_like(x_in)
    return model


@pytest.mark.parametrize("rec", [r for r in GOLDEN["schedules"] if "error" not in r],
                         ids=lambda r: f"{r['sampler']}-{r['preset']}-{r['steps']}")
def test_visits_diffusers_timesteps(rec):
    """The model is called at exactly the timesteps diffusers' scheduler hands the UNet."""
    calls = []
    sample(rec["sampler"], _recording_model(calls), np.zeros((1, 2)), rec["steps"],
           np.random.default_rng(0), preset=PRESET[rec["preset"]])
    # 0.02: diffusers computes dpm_2_a's sigma_down = sqrt(s_next^2 - s_up^2) in float32, which
    # cancels badly near sigma_min (one case is off by 0.0096); real timesteps are >= 1 apart.
    np.testing.assert_allclose(calls, rec["timesteps"], atol=0.02, rtol=0)
    if rec["sampler"] in ("lms", "euler", "euler_a", "dpmsolver", "dpmsolver++", "dpmsingle"):
        _, sigmas = samplers.schedule(rec["sampler"], rec["steps"])
        np.testing.assert_allclose(sigmas, rec["sigmas"], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("rec", [r for r in GOLDEN["schedules"] if "error" in r],
                         ids=lambda r: f"{r['sampler']}-{r['preset']}-{r['steps']}")
def test_rejects_step_counts_diffusers_cannot_run(rec):
    with pytest.raises(UserError, match="steps"):
        samplers.schedule(rec["sampler"], rec["steps"])


W = np.random.default_rng(GOLDEN["toy_weight_seed"]).standard_normal((1, 4, 4, 4)).astype(np.float32)


def toy(x_in, t):
    """The golden script's toy prediction: nonlinear in x, varying with t."""
    return 0.5 * np.tanh(x_in) + 0.3 * x_in * np.cos(t / 250.0) + 0.2 * W * np.sin(t / 100.0 + 0.5)


@pytest.mark.parametrize("rec", GOLDEN["trajectories"],
                         ids=lambda r: f"{r['sampler']}-{r['preset']}-{r['steps']}-{r['prediction']}-eta{r['eta']}")
def test_trajectory_matches_diffusers(rec):
    """Same noise, same toy model: final latents equal diffusers' within float32 rounding."""
    rng = np.random.default_rng(rec["seed"])
    noise = rng.standard_normal(W.shape).astype(np.float32)
    out = sample(rec["sampler"], toy, noise, rec["steps"], rng, prediction_type=rec["prediction"],
                 preset=PRESET[rec["preset"]], eta=rec["eta"])
    np.testing.assert_allclose(out.ravel(), rec["final"], atol=1e-4, rtol=0)


# --- convergence on an analytic denoiser -------------------------------------------------------
# Data: every dimension i.i.d. N(MU, S^2) (S = 1, like SDXL's scaled latents). Then
# E[x0 | x0 + sigma*eps = x] = MU + S^2/(S^2+sigma^2) (x - MU) is the ideal denoiser, and an exact
# sampler returns N(MU, S^2). The start is drawn from the exact marginal at sigma_max (not the usual
# N(0, sigma_max^2), whose mean is off by MU), so that only the sampler is measured; deterministic
# samplers get stratified normal quantiles, so their mean and variance carry no Monte-Carlo error:
# what is left is discretisation error, which the test also requires to shrink from 50 to 200 steps.
MU, S, N, STEPS = 0.3, 1.0, 16384, 50

# Tolerance on |mean - MU| and |var / S^2 - 1| at 50 steps; measured errors in the comments.
# The mean is exact for every deterministic sampler (the dynamics are linear with the right fixed
# point), so 1e-3 only absorbs float32 rounding. The variance error is each sampler's discretisation
# error on kohya's schedule; the tolerance is about 1.5x the measured one. The ancestral samplers add
# Monte-Carlo error from the injected noise: 3 standard errors at N = 16384 are 0.024 on the mean.
TOLERANCE = {
    # name: (mean, var)      measured var error, and why it is that size
    "ddim": (1e-3, 0.08),         # -0.054: first order; the 0.18 -> 0.03 -> 0 tail is coarse
    "euler": (1e-3, 0.08),        # -0.056: first order (DDIM and Euler differ only in the grid)
    "euler_a": (0.025, 0.20),     # -0.130: first order, and the noise split doubles the error
    "lms": (1e-3, 0.002),         # -0.0002: 4th-order multistep
    "pndm": (1e-3, 0.003),        # -0.0011: 4th-order multistep after Runge-Kutta warm-up
    "heun": (1e-3, 0.003),        # +0.0008: 2nd order
    "dpm_2": (1e-3, 0.01),        # +0.005: 2nd order
    "dpm_2_a": (0.025, 0.04),     # -0.007: 2nd order + Monte Carlo
    "dpmsolver": (1e-3, 0.03),    # +0.017: 2nd-order multistep, first-order first step
    "dpmsolver++": (1e-3, 0.03),  # -0.015: same, and a first-order last step down to 0
    "dpmsingle": (1e-3, 0.04),    # -0.025: 2nd order every other step only
}


def analytic_model(prediction_type="epsilon"):
    def model(x_in, t):
        sigma = float(samplers.sigma_at(t))
        x = x_in.astype(np.float64) * math.sqrt(1 + sigma ** 2)
        x0 = MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)
        eps = (x - x0) / sigma
        if prediction_type == "v_prediction":
            return (eps - sigma * x0) / math.sqrt(1 + sigma ** 2)
        return eps
    return model


def exact_start(name, steps):
    """Standard-normal-like input that sample() scales into x_T ~ N(MU, S^2 + sigma_max^2)."""
    _, sigmas = samplers.schedule(name, steps)
    s0 = float(sigmas[0])
    init = s0 if samplers._SAMPLERS[name]["sigma_space_init"] else math.sqrt(1 + s0 ** 2)
    z = np.array([NormalDist().inv_cdf((i + 0.5) / N) for i in range(N)])
    z = (z - z.mean()) / z.std()
    return (MU + math.sqrt(S ** 2 + s0 ** 2) * z) / init, float(sigmas[-1])


def run_analytic(name, steps, seed=0, prediction_type="epsilon"):
    """Sampled output and its (mean, variance) error against the exact answer."""
    noise, s_end = exact_start(name, steps)
    out = sample(name, analytic_model(prediction_type), noise[None], steps, np.random.default_rng(seed),
                 prediction_type=prediction_type)
    # PNDM and dpmsolver stop at sigma_min: exactly N(MU, S^2 + s_end^2) / sqrt(1 + s_end^2) there.
    mean_ref = MU / math.sqrt(1 + s_end ** 2)
    var_ref = (S ** 2 + s_end ** 2) / (1 + s_end ** 2)
    return out, abs(out.mean() - mean_ref), abs(out.var() / var_ref - 1)


@pytest.mark.parametrize("name", NAMES)
def test_converges_to_the_data_distribution(name):
    mean_tol, var_tol = TOLERANCE[name]
    _, mean_err, var_err = run_analytic(name, STEPS)
    assert mean_err < mean_tol and var_err < var_tol, (mean_err, var_err)
    if not samplers.draws_noise(name):
        assert run_analytic(name, 4 * STEPS)[2] < var_err


@pytest.mark.parametrize("name", ["euler", "dpmsolver++", "dpm_2_a"])
def test_v_prediction_converges_like_epsilon(name):
    """The same ideal denoiser, asked for v instead of eps, gives the same samples."""
    eps = run_analytic(name, STEPS, seed=1)[0]
    v = run_analytic(name, STEPS, seed=1, prediction_type="v_prediction")[0]
    np.testing.assert_allclose(v, eps, atol=1e-5)


# --- randomness, batches, errors ----------------------------------------------------------------

@pytest.mark.parametrize("name,eta", [("euler_a", 0.0), ("dpm_2_a", 0.0), ("ddim", 0.7)])
def test_same_seed_same_result_other_seed_differs(name, eta):
    noise = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    run = lambda seed: sample(name, toy_b, noise, 8, np.random.default_rng(seed), eta=eta)
    np.testing.assert_array_equal(run(1), run(1))
    assert np.abs(run(1) - run(2)).max() > 1e-3


def toy_b(x_in, t):
    return 0.5 * np.tanh(x_in) + 0.1 * np.cos(t / 250.0)


def test_per_row_generators_make_images_independent_of_batch_position():
    noises = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    pair = sample("euler_a", toy_b, noises, 6, [np.random.default_rng(10), np.random.default_rng(11)])
    alone = sample("euler_a", toy_b, noises[1:], 6, [np.random.default_rng(11)])
    np.testing.assert_allclose(pair[1:], alone, atol=1e-6)


def test_k_aliases_are_the_same_samplers():
    noise = np.random.default_rng(4).standard_normal((1, 4, 4, 4)).astype(np.float32)
    for alias, name in samplers._ALIASES.items():
        a = sample(alias, toy_b, noise, 5, np.random.default_rng(0))
        b = sample(name, toy_b, noise, 5, np.random.default_rng(0))
        np.testing.assert_array_equal(a, b)
    assert set(samplers.SAMPLER_NAMES) == {
        "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
        "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"}


def test_errors_name_the_problem():
    noise = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(UserError, match="unknown sampler 'ddpm'"):
        sample("ddpm", toy_b, noise, 10)
    with pytest.raises(UserError, match="eta applies to the ddim sampler only"):
        sample("euler", toy_b, noise, 10, eta=0.5)
    with pytest.raises(UserError, match="prediction type"):
        sample("euler", toy_b, noise, 10, prediction_type="sample")
    with pytest.raises(UserError, match="preset"):
        sample("euler", toy_b, noise, 10, preset="comfy")
    with pytest.raises(UserError, match="between 1 and 1000 steps"):
        sample("euler", toy_b, noise, 0)
    with pytest.raises(UserError, match="too many"):
        sample("ddim", toy_b, noise, 1000)
    with pytest.raises(ValueError, match="pass rng"):
        sample("euler_a", toy_b, noise, 10)
