"""The in-graph half of the noise: from a step's `NoiseDraws` to noisy latents and the target.

It runs inside the compiled train step because `--adaptive_noise_scale` needs the latents, which
come from the VAE inside the step when latents are not cached. The order is kohya's
`get_noise_noisy_latents_and_timesteps` (train_util.py:6071-6107):
offset noise -> multi-resolution noise (divide by the std) -> add_noise with the input
perturbation -> target (noise, or the velocity with --v_parameterization).
"""

from mindspore import nn, ops, Tensor

from library.training.noise_draws import DDPMSchedule, NoiseOptions


def _per_sample(table, timesteps, like):
    """table[t] shaped (B, 1, 1, 1) to broadcast over latents."""
    return ops.gather(table, timesteps, 0).reshape((-1,) + (1,) * (like.ndim - 1)).astype(like.dtype)


class ForwardDiffusion(nn.Cell):
    """`construct(latents, *NoiseDraws) -> (noisy_latents, target)`."""

    def __init__(self, schedule: DDPMSchedule, options: NoiseOptions, v_parameterization=False):
        super().__init__()
        self.sqrt_alphas_cumprod = Tensor(schedule.sqrt_alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = Tensor(schedule.sqrt_one_minus_alphas_cumprod)
        self.uses_offset = options.uses_offset
        self.adaptive_noise_scale = options.adaptive_noise_scale
        self.uses_multires = options.uses_multires
        self.uses_ip_noise = options.uses_ip_noise
        self.v_parameterization = v_parameterization

    def add_noise(self, latents, noise, timesteps):
        """diffusers' `DDPMScheduler.add_noise`: sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise."""
        a = _per_sample(self.sqrt_alphas_cumprod, timesteps, latents)
        s = _per_sample(self.sqrt_one_minus_alphas_cumprod, timesteps, latents)
        return a * latents + s * noise

    def get_velocity(self, latents, noise, timesteps):
        """diffusers' `DDPMScheduler.get_velocity`: sqrt(ᾱ_t)·noise - sqrt(1-ᾱ_t)·x0."""
        a = _per_sample(self.sqrt_alphas_cumprod, timesteps, latents)
        s = _per_sample(self.sqrt_one_minus_alphas_cumprod, timesteps, latents)
        return a * noise - s * latents

    def construct(self, latents, noise, offset_noise, offset_strength, pyramid, ip_noise,
                  ip_strength, timesteps):
        if self.uses_offset:
            offset = offset_strength
            if self.adaptive_noise_scale is not None:
                latent_mean = ops.abs(latents.mean(axis=(2, 3), keep_dims=True))
                offset = ops.maximum(offset + self.adaptive_noise_scale * latent_mean, 0.0)
            noise = noise + offset * offset_noise
        if self.uses_multires:
            noise = noise + pyramid
            centred = noise - noise.mean()
            std = ops.sqrt((centred * centred).sum() / (noise.size - 1))  # torch's unbiased std
            noise = noise / std
        perturbed = noise + ip_strength * ip_noise if self.uses_ip_noise else noise
        noisy_latents = self.add_noise(latents, perturbed, timesteps)
        target = self.get_velocity(latents, noise, timesteps) if self.v_parameterization else noise
        return noisy_latents, target
