"""The compiled train step, as two graphs.

`GradStep` (one compiled graph for every batch shape: `dynamic_signature`): latents (from the
cache, or from the VAE inside the graph), text conditioning (from the cache, or from the text encoders inside the graph), the noise
of kohya's `get_noise_noisy_latents_and_timesteps`, the UNet, the loss, and the gradients of the
trainable LoRA parameters, added into gradient buffers. It returns the loss and, per sample, the
loss before the batch mean.

`ApplyStep` (compiled once): the mean of the accumulated gradients, clipping by global norm
(--max_grad_norm, 0 = off), the optimizer update with the step's learning rates (a tensor input,
so a new LR never recompiles), and zeroed buffers. It returns the gradient norm.

The gradient buffers are flat: one float32 vector per segment of the optimizer's FlatLayout
(library.training.flat; one per parameter group), which the grad step adds the concatenated
gradients into. So the apply step (division, all-reduce, norm, clipping, the optimizer, zeroing)
runs a fixed number of kernels per group, and only the final write into the LoRA parameters is
per tensor.

With `--mixed_precision fp16` a DynamicLossScaler (library.training.grad_ops) is a child of
`ApplyStep` and `GradStep` reads its scale Parameter: the grad step differentiates the scaled loss
(so the buffers hold scaled gradients, also across accumulation), and the apply step unscales,
checks from the global norm that every gradient is finite, clips, updates only when they are,
and adjusts the scale.
Without it (no, bf16) neither graph holds any of this.

Every random number comes in as an input (drawn on the host from seeded generators), so a step
is a pure function of its inputs and the parameters: runs are reproducible and resumable, and the
graph never depends on the noise options' random state.
"""

from typing import NamedTuple

import mindspore as ms
from mindspore import nn, ops, Tensor

from library.conditioning import encode_ids, vector_condition
from library.training.grad_ops import clip_to_norm, global_norm, scale_all


class StepLayout(NamedTuple):
    """What the step graph computes itself and what it receives precomputed."""
    latents_cached: bool      # inputs[0] are latents (unscaled) rather than images
    text_cached: bool         # context/pooled come in, instead of token ids
    weighted: bool            # per-token weights come with the ids
    masked: bool              # a loss mask comes in


# The open axes of each GradStep input (see its docstring for the order): B, the batch, on every
# per-sample input; H, W on the latent-sized ones (and the images when latents are not cached).
# Inputs a layout does not use are 1-element placeholders and stay static.
_BATCH, _IMAGE = (0,), (0, 2, 3)


def _open_axes(layout):
    text = (_BATCH, _BATCH, _BATCH if layout.weighted else None, _BATCH if layout.weighted else None)
    return (_IMAGE, None if layout.latents_cached else _IMAGE, *text, _BATCH, _BATCH, _BATCH,
            _IMAGE, _BATCH, (), _IMAGE, _IMAGE, (), _BATCH, _BATCH,
            _IMAGE if layout.masked else None)


def dynamic_signature(inputs, layout):
    """Shape-only tensors for `GradStep.set_inputs`: `inputs` (one real batch, as Tensors)
    with the batch size and the latent height and width left open, so one compiled graph runs
    every bucket and batch size of a run."""
    signature = []
    for x, axes in zip(inputs, _open_axes(layout)):
        shape = list(x.shape)
        for axis in axes or ():
            shape[axis] = None
        signature.append(Tensor(shape=shape, dtype=x.dtype))
    return signature


class GradStep(nn.Cell):
    """`construct(pixels, vae_noise, text_a, text_b, text_c, text_d, original_hw, crop_tl,
    target_hw, noise, offset_noise, offset_strength, pyramid, ip_noise, ip_strength, timesteps,
    loss_weights, mask) -> (loss, per_sample_loss)`.

    pixels: latents (B,4,h,w) unscaled when cached, else images (B,3,H,W) in [-1, 1];
    text_a/text_b: context (B,L,C) / pooled (B,P) when cached, else token ids (B,n,77) int32 for
    each encoder; text_c/text_d: merged per-token weights (B,L) with --weighted_captions (else
    ignored); the noise inputs are `library.training.noise_draws.NoiseDraws`.
    """

    def __init__(self, models, flat, forward_diffusion, loss, layout: StepLayout,
                 weight_dtype=ms.float32, vae_dtype=ms.float32, loss_scale=None):
        super().__init__(auto_prefix=False)
        # fp16: the DynamicLossScaler's scale Parameter, shared with ApplyStep, which updates it
        self.scaled = loss_scale is not None
        self.loss_scale = loss_scale
        self.unet = models.unet
        self.vae = models.vae
        self.te1 = models.text_encoder1
        self.te2 = models.text_encoder2
        self.scaling_factor = models.config.vae.scaling_factor
        self.size_embed_dim = models.config.unet.size_embed_dim
        self.forward_diffusion = forward_diffusion
        self.loss = loss
        # plain bools: graph mode reads them as constants
        self.layout = layout
        self.latents_cached, self.text_cached = layout.latents_cached, layout.text_cached
        self.weighted, self.masked = layout.weighted, layout.masked
        self.weight_dtype = weight_dtype
        self.vae_dtype = vae_dtype
        # flat: the optimizer's FlatLayout (library.training.flat); the gradients of its
        # parameters, in its order, accumulate into one float32 buffer per segment
        self.flat = flat
        self.trainable = flat.params
        self.grad_buffers = flat.zeros("grad_buffer")
        self.value_and_grad = ms.value_and_grad(self.forward_loss, None, self.trainable,
                                                has_aux=True)
        self.hyper_map = ops.HyperMap()

    def latents(self, pixels, vae_noise):
        if self.latents_cached:
            return pixels.astype(ms.float32) * self.scaling_factor
        moments = ops.stop_gradient(self.vae.encode(pixels.astype(self.vae_dtype)))
        return self.vae.sample_latent(moments, vae_noise).astype(ms.float32) * self.scaling_factor

    def text(self, text_a, text_b, text_c, text_d):
        if self.text_cached:
            return text_a, text_b
        if self.weighted:
            return encode_ids(self.te1, self.te2, text_a, text_b, text_c, text_d)
        return encode_ids(self.te1, self.te2, text_a, text_b)

    def forward_loss(self, pixels, vae_noise, text_a, text_b, text_c, text_d, original_hw,
                     crop_tl, target_hw, noise, offset_noise, offset_strength, pyramid, ip_noise,
                     ip_strength, timesteps, loss_weights, mask):
        latents = self.latents(pixels, vae_noise)
        noisy, target = self.forward_diffusion(latents, noise, offset_noise, offset_strength,
                                               pyramid, ip_noise, ip_strength, timesteps)
        context, pooled = self.text(text_a, text_b, text_c, text_d)
        y = vector_condition(pooled, original_hw, crop_tl, target_hw, self.size_embed_dim)
        wd = self.weight_dtype
        pred = self.unet(noisy.astype(wd), timesteps, context.astype(wd), y.astype(wd))
        per_sample = self.loss.per_sample(pred, target, timesteps, loss_weights,
                                          mask if self.masked else None)
        if self.scaled:
            return per_sample.mean() * self.loss_scale, per_sample
        return per_sample.mean(), per_sample

    def construct(self, *inputs):
        (loss, per_sample), grads = self.value_and_grad(*inputs)
        self.hyper_map(ops.assign_add, self.grad_buffers, self.flat.flatten(grads))
        if self.scaled:
            loss = per_sample.mean()    # the loss, not the scaled one the gradients came from
        return loss, per_sample


class ForwardLoss(nn.Cell):
    """GradStep's forward and loss as a Cell of its own (validation): no gradients, nothing
    written, and inputs that can be declared dynamic (`set_inputs`) apart from the grad step's."""

    def __init__(self, grad_step):
        super().__init__(auto_prefix=False)
        self.grad_step = grad_step

    def construct(self, *inputs):
        return self.grad_step.forward_loss(*inputs)


class ApplyStep(nn.Cell):
    """`construct(lrs, accumulation) -> grad_norm`: update from the accumulated gradients."""

    def __init__(self, grad_buffers, optimizer, max_grad_norm, loss_scaler=None,
                 grad_mean=None):
        super().__init__(auto_prefix=False)
        self.grad_buffers = grad_buffers     # GradStep.grad_buffers: flat, in the optimizer's layout
        # data parallel: library.training.distributed.GradientMean, averaging over the ranks
        # before clipping, so the norm and the update are the same on every rank
        self.grad_mean = grad_mean
        self.optimizer = optimizer
        self.scaled = loss_scaler is not None
        self.loss_scaler = loss_scaler      # a child Cell: its Parameters are saved with the state
        # 0 turns clipping off (kohya); the norm is still computed for the log
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else float("inf")

    def construct(self, lrs, accumulation):
        # the mean over the micro-steps and, with fp16, the unscaling: one pass over the buffers
        factor = 1 / accumulation
        if self.scaled:
            factor = factor / self.loss_scaler.scale
        grads = scale_all(self.grad_buffers, factor)
        if self.grad_mean is not None:
            grads = self.grad_mean(grads)
        norm = global_norm(grads)
        grads = clip_to_norm(grads, norm, self.max_grad_norm)
        if self.scaled:
            # torch GradScaler's order under accelerate: unscale (done with the mean above),
            # check (from the norm), clip, step unless inf/NaN, update the scale. A skipped step
            # leaves weights and optimizer state (its step count too) as they were; the returned
            # norm is then not finite. Inline: as a method returning nothing, this branch
            # compiled to a Python-fallback node that MindIR (the compile cache) cannot export.
            finite = ops.isfinite(norm)
            if finite:
                self.optimizer(grads, lrs)
            self.loss_scaler.update(finite)
        else:
            self.optimizer(grads, lrs)
        self._zero_buffers()
        return norm

    def _zero_buffers(self):
        for buffer in self.grad_buffers:
            buffer.copy_(ops.zeros_like(buffer))   # InplaceZero has no CPU kernel
