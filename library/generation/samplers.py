"""kohya's samplers as short k-diffusion-style functions over SDXL's discrete DDPM schedule.

Everything here is plain numpy on the host: a latent is small, and the expensive part, the UNet,
is the `model` callable the caller passes in (compiled elsewhere).

Conventions (the k-diffusion ones):
- the state `x` lives in "sigma space", x = x0 + sigma * eps, with sigma_t = sqrt((1 - abar_t) / abar_t)
  of the training schedule (scaled_linear betas 0.00085..0.012, 1000 steps);
- the UNet sees x / sqrt(1 + sigma^2), which is the usual DDPM latent sqrt(abar) x0 + sqrt(1 - abar) eps,
  together with the timestep t that diffusers' scheduler would pass for that sigma (a float for the
  Karras-style schedulers, an integer for DDIM, PNDM and DPM-Solver);
- `model(x_in, t)` returns the UNet's prediction (epsilon or v), guidance already applied.

Each sampler visits exactly the timesteps and sigmas that sd-scripts' diffusers scheduler visits
with kohya's configuration (sdxl_gen_img.py:1515-1571 for the generator, train_util.get_my_scheduler
for training-time samples); tests/test_gen_samplers.py checks that against stored diffusers values.

One file for the whole set (about 450 lines): the samplers share the schedule, the sigma/timestep
conventions above and the two configurations, and each is a few dozen lines of one loop.
"""

import math

import numpy as np

from library.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012

# kohya's two configurations. The generator sets steps_offset=1 (DDIM, PNDM) and leaves x0 alone;
# training-time samples keep diffusers' steps_offset=0 and force clip_sample=True, which clamps the
# predicted x0 to [-1, 1] in the two schedulers that have that option (DDIM and Heun).
PRESETS = {
    "generator": dict(steps_offset=1, clip_denoised=False),
    "training": dict(steps_offset=0, clip_denoised=True),
}


def _train_sigmas():
    betas = np.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


TRAIN_SIGMAS = _train_sigmas()  # sigma of each training timestep 0..999
_LOG_SIGMAS = np.log(TRAIN_SIGMAS)
SIGMA_MIN = float(TRAIN_SIGMAS[0])


def sigma_at(t):
    """Sigma of a (possibly fractional) timestep, linear in t as diffusers interpolates."""
    return np.interp(t, np.arange(NUM_TRAIN_TIMESTEPS), TRAIN_SIGMAS)


def t_at(sigma):
    """Timestep of a sigma, linear in log sigma and clamped to [0, 999] (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(_LOG_SIGMAS, log_sigma, side="right") - 1, 0, NUM_TRAIN_TIMESTEPS - 2)
    w = np.clip((_LOG_SIGMAS[low] - log_sigma) / (_LOG_SIGMAS[low] - _LOG_SIGMAS[low + 1]), 0.0, 1.0)
    return low + w


# ---------------------------------------------------------------------------------------------
# Step grids: the n timesteps a sampler starts its steps from, and the n + 1 sigmas (last = end).

def _leading_timesteps(steps, steps_offset):
    """DDIM and PNDM: multiples of 1000 // steps, shifted by steps_offset, descending."""
    ts = np.arange(steps)[::-1] * (NUM_TRAIN_TIMESTEPS // steps) + steps_offset
    if ts[0] >= NUM_TRAIN_TIMESTEPS:
        raise UserError(f"{steps} steps is too many for this sampler (timestep {ts[0]} does not exist); "
                        f"use at most {NUM_TRAIN_TIMESTEPS - steps_offset}")
    return ts


def _linspace_timesteps(steps):
    """Euler, LMS, Heun, DPM2: evenly spaced float timesteps from 999 to 0."""
    return np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps)[::-1]


def _dpm_solver_timesteps(steps):
    """DPM-Solver: steps + 1 evenly spaced points from 999 to 0, rounded, the last one dropped."""
    return np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps + 1).round()[::-1][:-1]


def _grid(timesteps, final_sigma):
    return timesteps, np.append(sigma_at(timesteps), final_sigma)


# ---------------------------------------------------------------------------------------------
# The denoiser: one UNet call turned into (x0, eps) in sigma space.

class _Denoiser:
    """Wraps `model(x_in, t) -> prediction` as `(x, sigma, t) -> (x0, eps)`.

    eps is the model's noise estimate before any clamping: DDIM with clip_sample keeps it unclamped
    (diffusers' use_clipped_model_output=False) while x0 is clamped.
    """

    def __init__(self, model, prediction_type, clip):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"unknown prediction type {prediction_type!r}: use 'epsilon' or 'v_prediction'")
        self.model, self.v, self.clip = model, prediction_type == "v_prediction", clip

    def __call__(self, x, sigma, t):
        scale = 1.0 / math.sqrt(sigma * sigma + 1.0)
        pred = np.asarray(self.model((x * scale).astype(np.float32), float(t)), dtype=x.dtype)
        if self.v:  # x0 = c_skip x + c_out v; eps = (x - x0) / sigma written out
            x0 = x * scale * scale - pred * (sigma * scale)
            eps = x * (sigma * scale * scale) + pred * scale
        else:
            x0, eps = x - pred * sigma, pred
        return (np.clip(x0, -1.0, 1.0) if self.clip else x0), eps


def _randn(rng, like):
    """Standard normal noise shaped like `like`, from one Generator or from one Generator per batch
    row (then an image depends only on its own seed, not on its place in the batch)."""
    if isinstance(rng, np.random.Generator):
        return rng.standard_normal(like.shape).astype(like.dtype)
    return np.stack([g.standard_normal(like.shape[1:]) for g in rng]).astype(like.dtype)


def _ancestral(sigma, sigma_next, eta):
    """Split a step into a deterministic part down to sigma_down and fresh noise of size sigma_up."""
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


# ---------------------------------------------------------------------------------------------
# Samplers. Each takes the denoiser, the initial state, the grid and the rng, and returns the state
# at the last sigma of the grid.

def sample_ddim(denoise, x, ts, sigmas, rng, eta=0.0):
    """DDIM: x0 plus the model's own noise rescaled to the next sigma; eta > 0 swaps part of it for
    fresh noise (the DDIM variance equals k-diffusion's ancestral split in sigma space)."""
    for i, t in enumerate(ts):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, eps = denoise(x, s, t)
        if eta > 0 and s_next > 0:
            s_down, s_up = _ancestral(s, s_next, eta)
            x = x0 + eps * s_down + _randn(rng, x) * s_up
        else:
            x = x0 + eps * s_next
    return x


def sample_pndm(denoise, x, ts, sigmas, rng):
    """PNDM as diffusers runs it: three Runge-Kutta warm-up steps on half-step timesteps (12 calls),
    then 4th-order Adams-Bashforth on the noise estimate. Each move is the DDIM transfer
    x -> x + (sigma_to - sigma_from) * eps between integer timesteps; below 0 means sigma_min."""
    steps = len(ts)
    ratio, half = NUM_TRAIN_TIMESTEPS // steps, NUM_TRAIN_TIMESTEPS // steps // 2
    ascending = ts[::-1]
    prk = (np.repeat(ascending[-4:], 2) + np.tile([0, half], 4))[:-1].repeat(2)[1:-1][::-1]

    def sig(t):
        return float(TRAIN_SIGMAS[t]) if t >= 0 else SIGMA_MIN

    def transfer(x_from, t_from, t_to, eps):
        return x_from + eps * (sig(t_to) - sig(t_from))

    # `level` is the timestep x sits at. With an odd 1000 // steps the half steps land one timestep
    # away from the next model timestep; diffusers feeds that x unchanged, so the UNet input is
    # scaled by where x is, while the UNet is told t.
    history, level = [], int(prk[0])
    for j in range(3):  # Runge-Kutta: stages at t, t - h/2, t - h/2, t - h (diffusers' counter logic)
        start, x_start, total = int(prk[4 * j]), x, 0.0
        for k, weight in enumerate((1 / 6, 1 / 3, 1 / 3, 1 / 6)):
            t = int(prk[4 * j + k])
            _, eps = denoise(x, sig(level), t)
            if k == 0:
                history.append(eps)
            total = total + weight * eps
            level = t - (half if k % 2 == 0 else 0)
            x = transfer(x_start, start, level, total if k == 3 else eps)
    for t in ascending[:-3][::-1]:
        t = int(t)
        _, eps = denoise(x, sig(t), t)
        history = history[-3:] + [eps]
        e = (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4]) / 24
        x = transfer(x, t, t - ratio, e)
    return x


def _lms_coefficient(sigmas, i, order, j):
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of node sigma_(i-j)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly *= np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    integral = poly.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def sample_lms(denoise, x, ts, sigmas, rng, order=4):
    """Linear multistep (Adams-Bashforth in sigma) on the ODE derivative, up to 4th order."""
    ds = []
    for i, t in enumerate(ts):
        s = float(sigmas[i])
        x0, _ = denoise(x, s, t)
        ds = (ds + [(x - x0) / s])[-order:]
        cur = min(i + 1, order)
        x = x + sum(_lms_coefficient(sigmas, i, cur, j) * d for j, d in enumerate(reversed(ds)))
    return x


def sample_euler(denoise, x, ts, sigmas, rng):
    for i, t in enumerate(ts):
        s = float(sigmas[i])
        x0, _ = denoise(x, s, t)
        x = x + (x - x0) / s * (float(sigmas[i + 1]) - s)
    return x


def sample_euler_ancestral(denoise, x, ts, sigmas, rng):
    for i, t in enumerate(ts):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, _ = denoise(x, s, t)
        s_down, s_up = _ancestral(s, s_next, 1.0)
        x = x + (x - x0) / s * (s_down - s)
        if s_next > 0:
            x = x + _randn(rng, x) * s_up
    return x


def sample_heun(denoise, x, ts, sigmas, rng):
    """Heun's 2nd order; the corrector is evaluated at the next grid point; the last step is Euler."""
    for i, t in enumerate(ts):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, _ = denoise(x, s, t)
        d = (x - x0) / s
        x_pred = x + d * (s_next - s)
        if s_next == 0:
            x = x_pred
            continue
        x0_2, _ = denoise(x_pred, s_next, ts[i + 1])
        x = x + (d + (x_pred - x0_2) / s_next) / 2 * (s_next - s)
    return x


def _midpoint_step(denoise, x, s, s_target, d):
    """DPM2's second stage: a derivative at the log-midpoint of [s_target, s], used for the whole step."""
    s_mid = math.exp((math.log(s) + math.log(s_target)) / 2)
    x_mid = x + d * (s_mid - s)
    x0_mid, _ = denoise(x_mid, s_mid, t_at(s_mid))
    return x + (x_mid - x0_mid) / s_mid * (s_target - s)


def sample_dpm_2(denoise, x, ts, sigmas, rng):
    for i, t in enumerate(ts):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, _ = denoise(x, s, t)
        d = (x - x0) / s
        x = x + d * (s_next - s) if s_next == 0 else _midpoint_step(denoise, x, s, s_next, d)
    return x


def sample_dpm_2_ancestral(denoise, x, ts, sigmas, rng):
    for i, t in enumerate(ts):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, _ = denoise(x, s, t)
        d = (x - x0) / s
        s_down, s_up = _ancestral(s, s_next, 1.0)
        if s_down == 0:
            x = x + d * (s_down - s)
        else:
            x = _midpoint_step(denoise, x, s, s_down, d) + _randn(rng, x) * s_up
    return x


def _dpm_solver_multistep(denoise, x, ts, sigmas, data_prediction):
    """DPM-Solver(++) 2M, midpoint form, as diffusers' DPMSolverMultistepScheduler (order 2).

    In sigma space a first-order step is DDIM. The 2nd-order term extrapolates the model output
    (x0 for ++, eps otherwise) from the previous step, in log-sigma. The first step has no history;
    the last is first order when it ends at sigma 0 or when there are fewer than 15 steps
    (diffusers' lower_order_final)."""
    n, prev = len(ts), None
    for i, t in enumerate(ts):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, eps = denoise(x, s, t)
        m = x0 if data_prediction else eps
        first_order = prev is None or (i == n - 1 and (s_next == 0 or n < 15))
        if not first_order:
            r0 = math.log(float(sigmas[i - 1]) / s) / math.log(s / s_next)
            m_step = m + 0.5 * (m - prev) / r0
        else:
            m_step = m
        if data_prediction:
            x = x * (s_next / s) + m_step * (1 - s_next / s)
        else:
            x = x + m_step * (s_next - s)
        prev = m
    return x


def sample_dpmsolver(denoise, x, ts, sigmas, rng):
    return _dpm_solver_multistep(denoise, x, ts, sigmas, data_prediction=False)


def sample_dpmsolver_pp(denoise, x, ts, sigmas, rng):
    return _dpm_solver_multistep(denoise, x, ts, sigmas, data_prediction=True)


def _singlestep_orders(steps):
    """diffusers' order list for a 2nd-order singlestep solver with lower_order_final (forced on when
    the last sigma is 0): pairs (1, 2); a trailing 1; the very last step always first order."""
    orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    orders[-1] = 1
    return orders


def sample_dpmsingle(denoise, x, ts, sigmas, rng):
    """DPM-Solver++ 2S as diffusers' DPMSolverSinglestepScheduler: a first-order step to the next grid
    point gives a second x0 estimate there; the following step restarts from the pair's first point
    and goes to the point after, with the 2nd-order (midpoint) combination of both estimates."""
    anchor = x0_prev = None
    for i, (t, order) in enumerate(zip(ts, _singlestep_orders(len(ts)))):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, _ = denoise(x, s, t)
        if order == 1:
            anchor = x
            x = x * (s_next / s) + x0 * (1 - s_next / s)
        else:
            s_start = float(sigmas[i - 1])
            r0 = math.log(s_start / s) / math.log(s_start / s_next)
            m = x0_prev + 0.5 * (x0 - x0_prev) / r0
            x = anchor * (s_next / s_start) + m * (1 - s_next / s_start)
        x0_prev = x0
    return x


# ---------------------------------------------------------------------------------------------
# The table: kohya's names -> (sampler, grid, whether x_T is scaled like a sigma-space scheduler).

def _spec(fn, grid, sigma_space_init, clips=False, draws_noise=False):
    return dict(fn=fn, grid=grid, sigma_space_init=sigma_space_init, clips=clips, draws_noise=draws_noise)


_SAMPLERS = {
    "ddim": _spec(sample_ddim, lambda n, off: _grid(_leading_timesteps(n, off), 0.0), False, clips=True),
    "pndm": _spec(sample_pndm, lambda n, off: _grid(_leading_timesteps(n, off), SIGMA_MIN), False),
    "lms": _spec(sample_lms, lambda n, off: _grid(_linspace_timesteps(n), 0.0), True),
    "euler": _spec(sample_euler, lambda n, off: _grid(_linspace_timesteps(n), 0.0), True),
    "euler_a": _spec(sample_euler_ancestral, lambda n, off: _grid(_linspace_timesteps(n), 0.0), True,
                     draws_noise=True),
    "heun": _spec(sample_heun, lambda n, off: _grid(_linspace_timesteps(n), 0.0), True, clips=True),
    "dpm_2": _spec(sample_dpm_2, lambda n, off: _grid(_linspace_timesteps(n), 0.0), True),
    "dpm_2_a": _spec(sample_dpm_2_ancestral, lambda n, off: _grid(_linspace_timesteps(n), 0.0), True,
                     draws_noise=True),
    # kohya's dpmsolver config (final sigma 0) makes diffusers raise; end at sigma_min as it asks.
    "dpmsolver": _spec(sample_dpmsolver, lambda n, off: _grid(_dpm_solver_timesteps(n), SIGMA_MIN), False),
    "dpmsolver++": _spec(sample_dpmsolver_pp, lambda n, off: _grid(_dpm_solver_timesteps(n), 0.0), False),
    "dpmsingle": _spec(sample_dpmsingle, lambda n, off: _grid(_dpm_solver_timesteps(n), 0.0), False),
}
_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2",
            "k_dpm_2_a": "dpm_2_a"}
SAMPLER_NAMES = tuple(_SAMPLERS) + tuple(_ALIASES)  # the names kohya's --sampler accepts
MIN_STEPS = {"pndm": 4}  # PNDM's warm-up alone takes three steps plus one to land


def canonical_name(name):
    """kohya's sampler name without its k_ alias; an unknown name is a UserError that lists them."""
    name = _ALIASES.get(name, name)
    if name not in _SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
    return name


def schedule(name, steps, steps_offset=1):
    """(timesteps, sigmas) of the steps: n start timesteps and n + 1 sigmas ending at the final one."""
    name = canonical_name(name)
    if not MIN_STEPS.get(name, 1) <= steps <= NUM_TRAIN_TIMESTEPS:
        raise UserError(f"{name} needs between {MIN_STEPS.get(name, 1)} and {NUM_TRAIN_TIMESTEPS} steps, "
                        f"got {steps}")
    return _SAMPLERS[name]["grid"](steps, steps_offset)


def draws_noise(name, eta=0.0):
    """Whether the sampler consumes random numbers during sampling (so it needs an rng)."""
    name = canonical_name(name)
    return _SAMPLERS[name]["draws_noise"] or (name == "ddim" and eta > 0)


def img2img_start(name, steps, strength, preset="generator"):
    """kohya's img2img start for `steps` steps at `strength` (sdxl_gen_img.py:692-704), as grid
    indices (noise_index, start_index): the init latents are noised to the sigma of grid point
    `noise_index`, and sampling runs from grid point `start_index` to the end.

    kohya: init_timestep = min(int(steps * strength) + offset, steps), noise at
    timesteps[-init_timestep], loop from t_start = max(steps - init_timestep + offset, 0), where
    offset is the scheduler's steps_offset (1 in the generator, except dpmsingle which has none;
    0 in training samples). So int(steps * strength) steps run, and with offset 1 the first of
    them starts one grid point below the noise level (strength 1 skips step 0; strength 0 runs
    no step and returns the init latents noised to the last grid point).
    """
    name = canonical_name(name)
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"img2img strength must be between 0 and 1, got {strength}")
    if name == "pndm":
        raise UserError("img2img and highres fix are not supported with the pndm sampler (its "
                        "Runge-Kutta warm-up cannot start mid-schedule); choose another --sampler")
    offset = 0 if name == "dpmsingle" else PRESETS[preset]["steps_offset"]
    init_timestep = min(int(steps * strength) + offset, steps)
    return steps - init_timestep, max(steps - init_timestep + offset, 0)


def sample(name, model, noise, steps, rng=None, *, prediction_type="epsilon", preset="generator", eta=0.0,
           init=None, strength=None):
    """Run sampler `name` for `steps` steps from standard-normal `noise`; return the final latents.

    model(x_in, t) -> prediction for the latents x_in at timestep t (float), guidance applied.
    rng: numpy Generator (or one per batch row) for euler_a, dpm_2_a and ddim with eta > 0.
    preset: "generator" (sdxl_gen_img's scheduler settings) or "training" (training-time samples:
    steps_offset 0, x0 clamped to [-1, 1] in ddim and heun).
    init, strength: img2img. `init` (B, 4, h, w) are clean latents (VAE scale applied); they are
    noised with `noise` at kohya's start (see img2img_start) and only the remaining steps run.
    The result is on the usual latent scale (what the VAE decodes after dividing by its factor).
    """
    name = canonical_name(name)
    if preset not in PRESETS:
        raise UserError(f"unknown sampler preset {preset!r}: use one of {', '.join(PRESETS)}")
    if eta and name != "ddim":
        raise UserError(f"eta applies to the ddim sampler only, not {name}")
    if draws_noise(name, eta) and not (isinstance(rng, np.random.Generator)
                                       or (rng is not None and len(rng) == len(noise))):
        raise ValueError(f"{name} draws noise while sampling: pass rng, a numpy Generator or one per batch row")
    spec, config = _SAMPLERS[name], PRESETS[preset]
    ts, sigmas = schedule(name, steps, config["steps_offset"])
    noise = np.asarray(noise)
    # x_T: Karras-style schedulers start at sigma_max (init_noise_sigma with linspace spacing); the
    # DDPM-style ones start from plain noise in the UNet's space, i.e. sqrt(1 + sigma^2) in sigma space.
    if init is None:
        s0 = float(sigmas[0])
        x = noise * (s0 if spec["sigma_space_init"] else math.sqrt(1.0 + s0 * s0))
    else:
        noise_index, start = img2img_start(name, steps, 1.0 if strength is None else strength, preset)
        s_noise = float(sigmas[noise_index])
        x = np.asarray(init, dtype=noise.dtype) + noise * s_noise   # add_noise, in sigma space
        if not spec["sigma_space_init"]:
            # DDPM-style schedulers keep the UNet-space sample sqrt(abar) (x0 + s eps) and treat it
            # as being at the start point's sigma: in sigma space that is a rescale.
            s_start = float(sigmas[start])
            x = x * math.sqrt((1.0 + s_start * s_start) / (1.0 + s_noise * s_noise))
        ts, sigmas = ts[start:], sigmas[start:]
    denoise = _Denoiser(model, prediction_type, clip=config["clip_denoised"] and spec["clips"])
    extra = {"eta": eta} if name == "ddim" else {}
    x = spec["fn"](denoise, x, ts, sigmas, rng, **extra)
    return x / math.sqrt(1.0 + float(sigmas[-1]) ** 2)
