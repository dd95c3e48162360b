"""The DDPM noise schedule and the per-step random draws (numpy only, run on the host).

kohya draws its noise inside the step with torch's global RNG. Here every random number of a step
is drawn on the host from one seeded `numpy.random.Generator` and handed to the compiled step as
input tensors (`NoiseDraws`); the step then combines them deterministically
(library/training/forward_diffusion.py). That makes a run reproducible from its seed, keeps randomness out
of the graph, and keeps the step's input shapes fixed even though the multi-resolution noise
pyramid has random level sizes. The draws follow kohya's distributions; the random streams are
not torch's, so individual numbers differ from a kohya run with the same seed.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from library.errors import UserError
from library.resample import bilinear_resize

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class DDPMSchedule:
    """Per-timestep constants of diffusers' `DDPMScheduler` as kohya configures it (float32)."""
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    snr: np.ndarray  # kohya's `all_snr` = ᾱ / (1 - ᾱ)


def ddpm_schedule(beta_start=0.00085, beta_end=0.012, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """The "scaled_linear" schedule: betas linear in sqrt space, squared (computed in float64)."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return DDPMSchedule(
        betas=betas.astype(np.float32),
        alphas_cumprod=alphas_cumprod.astype(np.float32),
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod).astype(np.float32),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod).astype(np.float32),
        snr=(alphas_cumprod / (1.0 - alphas_cumprod)).astype(np.float32),
    )


@dataclass(frozen=True)
class NoiseOptions:
    """kohya's noise and timestep options, validated on construction (UserError names the option)."""
    noise_offset: Optional[float] = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: Optional[int] = None
    max_timestep: Optional[int] = None

    def __post_init__(self):
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            # kohya errors when noise_offset is unset and silently ignores the scale when it is 0
            raise UserError("--adaptive_noise_scale needs a non-zero --noise_offset")
        if self.multires_noise_iterations is not None and self.multires_noise_iterations < 0:
            raise UserError("--multires_noise_iterations must be 0 or more")
        lo, hi = self.timestep_range
        if not 0 <= lo <= hi <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--min_timestep {lo} / --max_timestep {hi}: need "
                            f"0 <= min_timestep <= max_timestep <= {NUM_TRAIN_TIMESTEPS}")
        if lo == hi == NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--min_timestep = --max_timestep = {hi} fixes t at {hi}, past the last "
                            f"timestep ({NUM_TRAIN_TIMESTEPS - 1})")

    @property
    def timestep_range(self):
        """[min, max): t ~ randint(min, max), or t = max when min == max (as kohya)."""
        lo = 0 if self.min_timestep is None else self.min_timestep
        hi = NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep
        return lo, hi

    # kohya tests these options for truth, so 0 means off
    @property
    def uses_offset(self):
        return bool(self.noise_offset)

    @property
    def uses_multires(self):
        return bool(self.multires_noise_iterations)

    @property
    def uses_ip_noise(self):
        return bool(self.ip_noise_gamma)


class NoiseDraws(NamedTuple):
    """All random numbers of one step, in the order the compiled step takes them.

    Arrays an option does not use are zeros of the same shape, so the step's signature does not
    depend on the options.
    """
    noise: np.ndarray            # (B, C, H, W) standard normal
    offset_noise: np.ndarray     # (B, C, 1, 1) standard normal, scaled by the offset
    offset_strength: np.ndarray  # () noise_offset, times U(0,1) with --noise_offset_random_strength
    pyramid: np.ndarray          # (B, C, H, W) the multi-resolution noise levels, summed
    ip_noise: np.ndarray         # (B, C, H, W) standard normal for input perturbation
    ip_strength: np.ndarray      # () ip_noise_gamma, times U(0,1) with random strength
    timesteps: np.ndarray        # (B,) int32


def pyramid_noise(shape, iterations, discount, rng):
    """The levels kohya's `pyramid_noise_like` adds to the noise (before dividing by the std).

    Level i is N(0,1) at size (H, W) / r**i with r ~ U(2, 4) drawn per level, bilinearly
    upsampled to (H, W) and weighted by discount**i; it stops after the first 1-pixel-wide level.
    `rng` needs `random()` and `standard_normal(shape)` (a numpy Generator has both).
    """
    b, c, h, w = shape
    total = np.zeros(shape, dtype=np.float32)
    for i in range(iterations):
        r = rng.random() * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        level = rng.standard_normal((b, c, hn, wn)).astype(np.float32)
        total += bilinear_resize(level, (h, w)) * np.float32(discount ** i)
        if hn == 1 or wn == 1:
            break
    return total


class NoiseSampler:
    """Draws a batch's `NoiseDraws` from a generator seeded by (seed, *key).

    The trainer's key is the batch's (epoch, index in the epoch's global batch order), so a
    batch's noise depends on nothing that came before it: a resumed run continues with the
    noise an uninterrupted one would have drawn, and with data parallelism a batch gets the same
    noise whichever rank trains it.
    """

    def __init__(self, options: NoiseOptions, seed: int):
        self.options = options
        self.seed = seed

    def draw(self, latent_shape, key):
        opts, rng = self.options, np.random.default_rng([self.seed, *key])
        b, c = latent_shape[:2]
        zeros = np.zeros(latent_shape, dtype=np.float32)
        noise = rng.standard_normal(latent_shape).astype(np.float32)

        offset_strength, offset_noise = 0.0, np.zeros((b, c, 1, 1), dtype=np.float32)
        if opts.uses_offset:
            offset_strength = opts.noise_offset
            if opts.noise_offset_random_strength:
                offset_strength *= rng.random()
            offset_noise = rng.standard_normal((b, c, 1, 1)).astype(np.float32)

        pyramid = zeros
        if opts.uses_multires:
            pyramid = pyramid_noise(latent_shape, opts.multires_noise_iterations,
                                    opts.multires_noise_discount, rng)

        lo, hi = opts.timestep_range
        timesteps = rng.integers(lo, hi, size=b) if lo < hi else np.full(b, hi)

        ip_strength, ip_noise = 0.0, zeros
        if opts.uses_ip_noise:
            ip_strength = opts.ip_noise_gamma
            if opts.ip_noise_gamma_random_strength:
                ip_strength *= rng.random()
            ip_noise = rng.standard_normal(latent_shape).astype(np.float32)

        return NoiseDraws(noise, offset_noise, np.float32(offset_strength), pyramid, ip_noise,
                          np.float32(ip_strength), timesteps.astype(np.int32))
