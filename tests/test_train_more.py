"""Trainer behaviour that needs the whole step but no compile: gradient accumulation through the
real loop, --max_grad_norm, text-encoder LoRA training without caches, and --mixed_precision
fp16. Everything runs in-process and op by op (PyNative), like test_train_options.py, from
Trainings built by the trainer's own prepare() / build_training() from parsed arguments.

SGDNesterov is used where the test compares updates, because its first update is linear in the
gradient (-lr·(1+momentum)·g): AdamW's first step is about -lr·sign(g), which would hide a wrong
gradient scale."""

import json

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from conftest import ONE_BLOCK
from library.safetensors_io import SafetensorsFile
from library.models.checkpoint import is_lora_parameter_name
from library.training import build as build_module, loop
from library.training.args import parse_args
from library.training.batches import to_tensors
from library.training.build import build_training, load_models
from library.training.plan import prepare
from library.training.step import ApplyStep

LR, MOMENTUM = 1e-2, 0.9
SGD = ["--optimizer_type", "SGDNesterov", "--learning_rate", str(LR)]
CACHED = ["--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two different captioned images, so two micro-batches have different gradients."""
    from PIL import Image, ImageDraw
    root = tmp_path_factory.mktemp("more") / "img" / "1_sks"
    root.mkdir(parents=True)
    for name, color, box in (("a", (210, 40, 40), [10, 10, 50, 50]),
                             ("b", (40, 60, 210), [4, 20, 60, 44])):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse(box, fill=color)
        img.save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a {name} shape")
    return root.parent


def build(tiny_ckpt, data_dir, out, *extra):
    # PyNative, with the UNet LoRA on one block (both text encoders keep theirs): half the step
    # time of a LoRA on every block, and the same checks
    _, args = parse_args(["--pretrained_model_name_or_path", str(tiny_ckpt),
                          "--train_data_dir", str(data_dir), "--resolution", "64",
                          "--caption_extension", ".txt", "--network_module", "networks.lora",
                          "--network_dim", "4", "--network_args", ONE_BLOCK,
                          "--output_dir", str(out), "--seed", "7",
                          "--max_data_loader_n_workers", "0", "--max_train_steps", "1", *extra])
    plan = prepare(args)
    return plan, build_training(plan, load_models(args))


def numpy_of(params):
    return [p.asnumpy().astype(np.float64) for p in params]


def first_batch_inputs(training):
    batch = next(iter(training.loader.epoch(1)))
    training.loader.close()
    return to_tensors(training.assembler(batch)[0])


def per_parameter(flat, vectors):
    """Flat per-segment arrays (a FlatLayout's order: its params one after the other, row-major)
    -> {parameter name: array}."""
    out = {}
    for s, vector in zip(flat.segments, vectors):
        offset = 0
        for p in flat.params[s.start:s.stop]:
            n = int(np.prod(p.shape))
            out[p.name] = vector[offset:offset + n].reshape(p.shape)
            offset += n
    return out


def global_norm(arrays):
    return float(np.sqrt(sum((a * a).sum() for a in arrays)))


class Recorder:
    """Stands in for a step Cell in train(): calls it and keeps what the test needs."""

    def __init__(self, cell, record):
        self.cell, self.record, self.calls = cell, record, []
        self.trainable = getattr(cell, "trainable", None)

    def __getattr__(self, name):          # anything else the loop reads comes from the Cell
        return getattr(self.cell, name)

    def __call__(self, *inputs):
        before = self.record("before")
        out = self.cell(*inputs)
        self.calls.append((before, inputs, out, self.record("after")))
        return out


def test_gradient_accumulation_updates_once_with_the_mean_gradient(tiny_ckpt, data_dir, tmp_path,
                                                                   monkeypatch):
    """train() with --gradient_accumulation_steps 2 on two one-image batches: two grad steps
    (the flat buffers add up, parameters untouched), then one update from the mean gradient,
    logged as one step with the mean gradient's norm; the saved LoRA is exactly that update."""
    plan, t = build(tiny_ckpt, data_dir, tmp_path, *CACHED, *SGD, "--max_grad_norm", "0",
                    "--gradient_accumulation_steps", "2", "--output_name", "acc")
    assert plan.train_group.num_batches() == 2 and plan.num_update_steps_per_epoch == 1
    params, buffers = list(t.grad_step.trainable), list(t.grad_step.grad_buffers)
    p0 = numpy_of(params)
    grad = Recorder(t.grad_step, lambda when: (numpy_of(params), numpy_of(buffers)))
    apply = Recorder(t.apply_step, lambda when: numpy_of(buffers) if when == "before" else None)
    monkeypatch.setattr(build_module, "load_models", lambda args: t.models)
    monkeypatch.setattr(build_module, "build_training", lambda plan, models: build_module.Training(
        **{**t.__dict__, "grad_step": grad, "apply_step": apply}))
    plan.args.pynative = True
    final = loop.train(plan)

    assert len(grad.calls) == 2 and len(apply.calls) == 1
    (_, _, _, (p_a, g_a)), (_, _, _, (p_b, g_ab)) = grad.calls
    # no update before the apply step
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(p0, p_a, p_b))
    g_b = [ab - a for ab, a in zip(g_ab, g_a)]
    assert global_norm(g_a) > 0 and global_norm(g_b) > 0
    assert global_norm([a - b for a, b in zip(g_a, g_b)]) > 1e-3 * global_norm(g_a)  # two batches
    buffers_before, (_, accumulation), norm, _ = apply.calls[0]
    assert float(accumulation.asnumpy()) == 2.0
    assert all(np.array_equal(x, y) for x, y in zip(buffers_before, g_ab))
    mean = [(a + b) / 2 for a, b in zip(g_a, g_b)]
    assert float(norm.asnumpy()) == pytest.approx(global_norm(mean), rel=1e-5)
    assert all(not b.asnumpy().any() for b in buffers)                # zeroed for the next step

    # the buffers are flat (one per parameter group): the update per LoRA tensor
    mean_of = per_parameter(t.grad_step.flat, mean)
    expected = {p.name: x - LR * (1 + MOMENTUM) * mean_of[p.name] for p, x in zip(params, p0)}
    saved = SafetensorsFile(final)
    assert set(expected) <= set(saved.keys())
    scale = max(np.abs(x - p0[i]).max() for i, x in enumerate(expected.values()))
    for name, value in expected.items():
        np.testing.assert_allclose(saved.get(name), value, rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    steps = [s for s in map(json.loads, open(tmp_path / "acc_log.jsonl")) if "step" in s
             and "event" not in s]     # (epoch lines carry loss/epoch_average)
    assert [s["step"] for s in steps] == [1]
    assert steps[0]["grad_norm"] == pytest.approx(global_norm(mean), rel=1e-5)


def test_max_grad_norm_clips_and_zero_turns_it_off(tiny_ckpt, data_dir, tmp_path):
    """The same gradient applied from the same state: with --max_grad_norm 1e-4 the update is
    the unclipped one scaled by 1e-4 / (norm + 1e-6); both report the norm before clipping."""
    _, t = build(tiny_ckpt, data_dir, tmp_path, *CACHED, *SGD, "--max_grad_norm", "1e-4")
    _, off_args = parse_args(["--max_grad_norm", "0"])
    assert t.apply_step.max_grad_norm == 1e-4
    assert t.apply_step.loss_scaler is None and not t.grad_step.scaled    # float32: no scaling
    params, buffers = list(t.grad_step.trainable), list(t.grad_step.grad_buffers)
    t.grad_step(*first_batch_inputs(t))
    p0, g = numpy_of(params), [b.asnumpy() for b in buffers]
    norm = global_norm(g)
    assert norm > 1e-2, norm       # well above the limit, so clipping acts

    def apply(apply_step):
        for p, x in zip(params, p0):
            p.set_data(Tensor(x.astype(np.float32)))
        for b, x in zip(buffers, g):
            b.set_data(Tensor(x))
        for state in t.optimizer.optimizer.momentum_buffer:
            state.set_data(Tensor(np.zeros(state.shape, np.float32)))
        reported = float(apply_step(Tensor(t.schedule.lrs(0)), Tensor(1.0, ms.float32)).asnumpy())
        return reported, [p.asnumpy() - x for p, x in zip(params, p0)]

    clipped_norm, clipped = apply(t.apply_step)
    off = ApplyStep(t.grad_step.grad_buffers, t.optimizer.optimizer, off_args.max_grad_norm)
    off_norm, unclipped = apply(off)
    assert clipped_norm == pytest.approx(norm, rel=1e-5) and off_norm == pytest.approx(norm, rel=1e-5)
    np.testing.assert_allclose(global_norm(unclipped), LR * (1 + MOMENTUM) * norm, rtol=1e-4)
    factor = 1e-4 / (norm + 1e-6)
    np.testing.assert_allclose(global_norm(clipped), factor * global_norm(unclipped), rtol=1e-3)
    for c, u in zip(clipped, unclipped):
        np.testing.assert_allclose(c, factor * u, rtol=1e-3, atol=1e-3 * factor * np.abs(u).max())


def test_text_encoder_lora_trains_without_caches(tiny_ckpt, data_dir, tmp_path):
    """No caches, no --network_train_unet_only: the VAE and both text encoders run inside the
    step, and one update moves lora_up (zero at start) of TE1 and TE2 modules."""
    _, t = build(tiny_ckpt, data_dir, tmp_path, "--learning_rate", "1e-3")
    assert t.latent_cache is None and t.text_cache is None
    params = {p.name: p for p in t.grad_step.trainable}
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    te2 = "lora_te2_text_model_encoder_layers_2_mlp_fc2.lora_up.weight"
    unet = next(n for n in params if n.startswith("lora_unet_") and "lora_up" in n)
    assert not params[te1].asnumpy().any() and not params[te2].asnumpy().any()
    loss, _ = t.grad_step(*first_batch_inputs(t))
    assert np.isfinite(float(loss.asnumpy()))
    t.apply_step(Tensor(t.schedule.lrs(0)), Tensor(1.0, ms.float32))
    for name in (te1, te2, unet):
        assert np.abs(params[name].asnumpy()).max() > 1e-5, name
    # every TE LoRA that can reach the loss moved (TE1's last layer feeds no output SDXL uses)
    moved = {n.split("_text_model")[0] for n, p in params.items()
             if n.startswith("lora_te") and "lora_up" in n and p.asnumpy().any()}
    assert moved == {"lora_te1", "lora_te2"}


def test_mixed_precision_fp16_runs_a_step_on_cpu(tiny_ckpt, data_dir, tmp_path):
    """--mixed_precision fp16: frozen weights in float16, LoRA and optimizer state in float32,
    the loss scaled (accelerate's GradScaler: 2**16) so the buffers hold scaled gradients that
    the apply step unscales, and one step with a finite loss on CPU."""
    _, t = build(tiny_ckpt, data_dir, tmp_path, *CACHED, "--mixed_precision", "fp16",
                 "--learning_rate", "1e-3")
    frozen = [p for cell in (t.models.unet, t.models.text_encoder1, t.models.text_encoder2)
              for p in cell.get_parameters() if not is_lora_parameter_name(p.name)]
    assert {p.dtype for p in frozen} == {ms.float16}
    lora = list(t.grad_step.trainable)
    assert {p.dtype for p in lora} == {ms.float32}
    scaler = t.apply_step.loss_scaler
    assert t.grad_step.loss_scale is scaler.scale and float(scaler.scale.asnumpy()) == 2.0 ** 16
    assert "loss_scale.scale" in t.apply_step.parameters_dict()
    before = numpy_of(lora)
    loss, per_sample = t.grad_step(*first_batch_inputs(t))
    assert float(loss.asnumpy()) == pytest.approx(float(per_sample.asnumpy().mean()))  # unscaled
    scaled_norm = global_norm(numpy_of(t.grad_step.grad_buffers))
    norm = t.apply_step(Tensor(t.schedule.lrs(0)), Tensor(1.0, ms.float32))
    assert np.isfinite(float(loss.asnumpy())) and np.isfinite(float(norm.asnumpy()))
    assert scaled_norm == pytest.approx(2.0 ** 16 * float(norm.asnumpy()), rel=1e-4)
    assert int(scaler.skipped_steps.asnumpy()) == 0 and int(scaler.good_steps.asnumpy()) == 1
    after = numpy_of(lora)
    assert {p.dtype for p in lora} == {ms.float32}
    assert all(np.isfinite(a).all() for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))
