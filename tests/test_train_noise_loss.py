"""Noise schedule, noise draws, forward diffusion and the loss against kohya's own code.

Golden values: tests/fixtures/train_golden/noise_loss.json (its `_source` says what produced them).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from library.errors import UserError
from library.training import noise_draws as N
from library.training.loss_options import LossOptions, huber_c_per_timestep, timestep_weights
from library.training.losses import DiffusionLoss
from library.training.forward_diffusion import ForwardDiffusion
from library.resample import area_resize, bilinear_resize

GOLDEN = json.loads((Path(__file__).parent / "fixtures/train_golden/noise_loss.json").read_text())
SCHEDULE = N.ddpm_schedule()
# diffusers computes ᾱ in float32 and kohya's SNR = ᾱ/(1-ᾱ) from it; at small t, 1-ᾱ cancels
# (1-ᾱ_0 = 8.5e-4), so SNR-derived values agree only to ~3e-5 with our float64-derived tables.
SNR_RTOL = 5e-5


def arr(x, dtype=np.float32):
    return np.asarray(x, dtype=dtype)


def test_ddpm_schedule_matches_diffusers():
    g = GOLDEN["schedule"]
    np.testing.assert_allclose(SCHEDULE.betas, arr(g["betas"]), rtol=1e-6)
    np.testing.assert_allclose(SCHEDULE.alphas_cumprod, arr(g["alphas_cumprod"]), rtol=2e-6)
    np.testing.assert_allclose(SCHEDULE.snr, arr(g["all_snr"]), rtol=SNR_RTOL)
    np.testing.assert_allclose(SCHEDULE.sqrt_alphas_cumprod ** 2, SCHEDULE.alphas_cumprod, rtol=1e-6)


@pytest.mark.parametrize("case", GOLDEN["resample"], ids=lambda c: f"{c['mode']}{c['size']}")
def test_resampling_matches_torch_interpolate(case):
    fn = bilinear_resize if case["mode"] == "bilinear" else area_resize
    out = fn(arr(case["input"]), tuple(case["size"]))
    np.testing.assert_allclose(out, arr(case["output"]), rtol=1e-5, atol=1e-6)


class Replay:
    """Hands out kohya's recorded `random.random()` / `torch.randn` draws in order."""

    def __init__(self, draws):
        self.draws = list(draws)

    def take(self, kind):
        got, shape, value = self.draws.pop(0)
        assert got == kind, (got, kind)
        return shape, value

    def random(self):
        return self.take("random")[1]

    def standard_normal(self, shape):
        recorded_shape, value = self.take("randn")
        assert tuple(recorded_shape) == tuple(shape)
        return arr(value)


def draws_from_kohya(case, opts):
    """Rebuild our NoiseDraws from the draws kohya made, in kohya's call order."""
    rec = Replay(case["draws"])
    latents = arr(case["latents"])
    b, c = latents.shape[:2]
    noise = arr(rec.take("randn_like")[1])
    offset_strength, offset_noise = 0.0, np.zeros((b, c, 1, 1), np.float32)
    if opts.uses_offset:
        offset_strength = opts.noise_offset
        if opts.noise_offset_random_strength:
            offset_strength *= rec.take("rand")[1][0]
        offset_noise = rec.standard_normal((b, c, 1, 1))
    pyramid = np.zeros_like(latents)
    if opts.uses_multires:
        pyramid = N.pyramid_noise(latents.shape, opts.multires_noise_iterations,
                                  opts.multires_noise_discount, rec)
    lo, hi = opts.timestep_range
    timesteps = arr(rec.take("randint")[1] if lo < hi else case["timesteps"], np.int32)
    ip_strength, ip_noise = 0.0, np.zeros_like(latents)
    if opts.uses_ip_noise:
        ip_strength = opts.ip_noise_gamma
        if opts.ip_noise_gamma_random_strength:
            ip_strength *= rec.take("rand")[1][0]
        ip_noise = arr(rec.take("randn_like")[1])
    assert not rec.draws, "kohya drew numbers this port does not use"
    return latents, N.NoiseDraws(noise, offset_noise, np.float32(offset_strength), pyramid,
                                 ip_noise, np.float32(ip_strength), timesteps)


@pytest.mark.parametrize("case", GOLDEN["noise"], ids=lambda c: ",".join(c["options"]) or "plain")
@pytest.mark.parametrize("v_param", [False, True], ids=["eps", "v"])
def test_forward_diffusion_matches_kohya_given_the_same_draws(case, v_param):
    opts = N.NoiseOptions(**case["options"])
    latents, draws = draws_from_kohya(case, opts)
    np.testing.assert_array_equal(draws.timesteps, case["timesteps"])
    cell = ForwardDiffusion(SCHEDULE, opts, v_parameterization=v_param)
    noisy, target = cell(Tensor(latents), *map(Tensor, draws))
    np.testing.assert_allclose(noisy.asnumpy(), arr(case["noisy"]), rtol=1e-5, atol=2e-6)
    expected_target = case["velocity"] if v_param else case["noise"]
    np.testing.assert_allclose(target.asnumpy(), arr(expected_target), rtol=1e-5, atol=2e-6)


def test_sampler_is_reproducible_and_follows_the_options():
    opts = N.NoiseOptions(noise_offset=0.1, noise_offset_random_strength=True,
                          multires_noise_iterations=4, ip_noise_gamma=0.2, min_timestep=10,
                          max_timestep=20)
    shape = (3, 4, 16, 12)
    a = N.NoiseSampler(opts, seed=7).draw(shape, (0, 1, 2))
    b = N.NoiseSampler(opts, seed=7).draw(shape, (0, 1, 2))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # another batch (key) draws other numbers
    other = N.NoiseSampler(opts, seed=7).draw(shape, (0, 1, 3))
    assert not np.array_equal(a.noise, other.noise)
    assert a.noise.shape == a.pyramid.shape == a.ip_noise.shape == shape
    assert a.offset_noise.shape == (3, 4, 1, 1)
    assert 0 <= a.offset_strength <= 0.1 and a.ip_strength == np.float32(0.2)
    assert a.timesteps.dtype == np.int32 and ((10 <= a.timesteps) & (a.timesteps < 20)).all()
    assert np.abs(a.pyramid).sum() > 0
    plain = N.NoiseSampler(N.NoiseOptions(), seed=7).draw(shape, (0, 1, 2))
    assert not plain.pyramid.any() and not plain.ip_noise.any() and plain.offset_strength == 0
    fixed = N.NoiseSampler(N.NoiseOptions(min_timestep=300, max_timestep=300), 0).draw(shape, (0,))
    assert (fixed.timesteps == 300).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"adaptive_noise_scale": 0.1}, "--adaptive_noise_scale"),
    ({"adaptive_noise_scale": 0.1, "noise_offset": 0.0}, "--adaptive_noise_scale"),
    ({"min_timestep": 500, "max_timestep": 100}, "--min_timestep"),
    ({"max_timestep": 1001}, "--max_timestep"),
    ({"min_timestep": 1000}, "past the last timestep"),
])
def test_bad_noise_options_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        N.NoiseOptions(**kwargs)


def test_huber_c_tables_match_kohya():
    g = GOLDEN["huber_c"]
    for schedule, table in g["tables"].items():
        opts = LossOptions(loss_type="huber", huber_schedule=schedule, huber_c=g["huber_c"],
                           huber_scale=g["huber_scale"])
        np.testing.assert_allclose(huber_c_per_timestep(opts, SCHEDULE), arr(table), rtol=SNR_RTOL)


def numpy_weights(opts, snr):
    """Transcription of kohya's post_process_loss chain, applied one factor at a time."""
    loss = np.ones_like(snr, dtype=np.float64)
    scale = np.minimum(snr, 1000) / (np.minimum(snr, 1000) + 1)
    if opts.min_snr_gamma:
        loss = loss * np.minimum(snr, opts.min_snr_gamma) / (snr + 1 if opts.v_parameterization else snr)
    if opts.scale_v_pred_loss_like_noise_pred:
        loss = loss * scale
    if opts.v_pred_like_loss:
        loss = loss + loss / scale * opts.v_pred_like_loss
    if opts.debiased_estimation_loss:
        s = np.minimum(snr, 1000)
        loss = loss * (1 / (s + 1) if opts.v_parameterization else 1 / np.sqrt(s))
    return loss


@pytest.mark.parametrize("kwargs", [
    {"min_snr_gamma": 5.0}, {"min_snr_gamma": 5.0, "v_parameterization": True},
    {"v_parameterization": True, "scale_v_pred_loss_like_noise_pred": True},
    {"v_pred_like_loss": 0.3}, {"debiased_estimation_loss": True},
    {"debiased_estimation_loss": True, "v_parameterization": True, "min_snr_gamma": 2.0},
])
def test_timestep_weights_fold_kohyas_chain(kwargs):
    opts = LossOptions(**kwargs)
    expected = numpy_weights(opts, SCHEDULE.snr.astype(np.float64))
    np.testing.assert_allclose(timestep_weights(opts, SCHEDULE), expected, rtol=1e-6)


@pytest.mark.parametrize("case", GOLDEN["loss"]["cases"], ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c["options"].items()) or "l2")
def test_loss_matches_kohya(case):
    g = GOLDEN["loss"]
    options = dict(case["options"])
    options["masked"] = options.pop("masked_loss", False)
    loss_fn = DiffusionLoss(LossOptions(**options), SCHEDULE)
    pred, target = arr(g["pred"]), arr(g["target"])
    mask = area_resize(arr(g["alpha_masks"])[:, None], pred.shape[2:])
    args = (Tensor(pred), Tensor(target), Tensor(arr(g["timesteps"], np.int32)),
            Tensor(arr(g["loss_weights"])), Tensor(mask))
    np.testing.assert_allclose(loss_fn.per_sample(*args).asnumpy(), arr(case["per_sample"]),
                               rtol=SNR_RTOL, atol=1e-7)
    np.testing.assert_allclose(loss_fn(*args).asnumpy(), case["loss"], rtol=SNR_RTOL)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_type": "l3"}, "--loss_type"),
    ({"huber_schedule": "linear"}, "--huber_schedule"),
    ({"loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.0}, "--huber_c"),
    ({"scale_v_pred_loss_like_noise_pred": True}, "--v_parameterization"),
    ({"v_pred_like_loss": 0.1, "v_parameterization": True}, "--v_pred_like_loss"),
])
def test_bad_loss_options_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        LossOptions(**kwargs)


class NoisyLoss(ms.nn.Cell):
    """Forward diffusion and loss in one compiled graph, as the train step will hold them."""

    def __init__(self, noise_options, loss_options):
        super().__init__()
        self.diffusion = ForwardDiffusion(SCHEDULE, noise_options, loss_options.v_parameterization)
        self.loss = DiffusionLoss(loss_options, SCHEDULE)

    def construct(self, latents, pred, loss_weights, mask, *draws):
        noisy, target = self.diffusion(latents, *draws)
        return noisy, self.loss(pred + 0.1 * noisy, target, draws[-1], loss_weights, mask)


def test_noise_and_loss_compile_and_match_pynative():
    noise_options = N.NoiseOptions(noise_offset=0.1, adaptive_noise_scale=0.02,
                                   multires_noise_iterations=3, ip_noise_gamma=0.1)
    loss_options = LossOptions(loss_type="huber", masked=True, min_snr_gamma=5.0,
                               v_parameterization=True, debiased_estimation_loss=True)
    rng = np.random.default_rng(0)
    shape = (2, 4, 8, 6)
    inputs = [Tensor(rng.standard_normal(shape).astype(np.float32)) for _ in range(2)]
    inputs += [Tensor(np.array([1.0, 0.5], np.float32)), Tensor(rng.random((2, 1, 8, 6)).astype(np.float32))]
    draws = [Tensor(d) for d in N.NoiseSampler(noise_options, seed=3).draw(shape, (0,))]
    cell = NoisyLoss(noise_options, loss_options)
    eager = cell(*inputs, *draws)
    compiled = ms.jit(cell.construct)(*inputs, *draws)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-6, atol=1e-7)
