"""LoRA cells on the tiny SDXL models: merged == unmerged, the merge formula, kohya parity of a
module, the switchable multiplier, dropouts in training only, names, checkpoint I/O, graph mode."""

import sys
import textwrap

import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor, nn

from conftest import FIXTURES, ROOT, randomise_lora
from library.models import load_sdxl
from library.models.checkpoint import base_parameters, save_single_file
from networks import lora


def tes(models):
    return [models.text_encoder1, models.text_encoder2]


def unet_inputs(models, batch=2, size=8, seed=1):
    rng = np.random.default_rng(seed)
    cfg = models.config.unet
    return (Tensor(rng.normal(size=(batch, 4, size, size)).astype(np.float32)),
            Tensor(np.array([10, 700][:batch], np.int32)),
            Tensor(rng.normal(size=(batch, 77, cfg.context_dim)).astype(np.float32)),
            Tensor(rng.normal(size=(batch, cfg.adm_in_channels)).astype(np.float32)))


def ids(batch=2, seed=2):
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 49406, (batch, 77)).astype(np.int32)
    a[:, 0], a[:, 9] = 49406, 49407
    return Tensor(a)


@pytest.fixture(scope="module")
def applied(tiny_ckpt):
    """A tiny model with a rank-4 LoRA (conv_dim 3) applied unmerged, non-zero lora_up."""
    models = load_sdxl(tiny_ckpt)
    net = lora.create_network(1.0, 4, 2.0, None, tes(models), models.unet, conv_dim="3",
                              conv_alpha="1.5")
    randomise_lora(net)
    net.apply_to(tes(models), models.unet)
    return models, net


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def fresh(tiny_ckpt):
    """A second tiny model for merging into; `restore(fresh)` puts its weights back."""
    models = load_sdxl(tiny_ckpt)
    models.saved = {id(p): p.asnumpy() for _, _, p in base_parameters(models)}
    return models


def restore(models):
    for _, _, p in base_parameters(models):
        p.set_data(Tensor(models.saved[id(p)]))


def test_merged_equals_unmerged_for_unet_and_both_text_encoders(applied, fresh):
    models, net = applied
    net.set_multiplier(0.7)
    x = unet_inputs(models, batch=1)
    out_unmerged = models.unet(*x).asnumpy()
    te_unmerged = [te(ids(1))[0].asnumpy() for te in tes(models)]
    net.set_multiplier(1.0)

    net2, sd = lora.create_network_from_weights(0.7, None, None, tes(fresh), fresh.unet,
                                                weights_sd=net.state_dict())
    assert len(net2) == len(net) == 6 * 3 * 2 + len(net.unet_loras)
    net2.merge_to(weights_sd=sd)
    try:
        assert rel(fresh.unet(*x).asnumpy(), out_unmerged) < 1e-5
        for te, expected in zip(tes(fresh), te_unmerged):
            assert rel(te(ids(1))[0].asnumpy(), expected) < 1e-5
            # and the LoRA does something (the TE output differs from the base model's)
        restore(fresh)
        assert rel(fresh.text_encoder2(ids(1))[0].asnumpy(), te_unmerged[1]) > 1e-3
    finally:
        restore(fresh)


def test_merged_weight_is_w_plus_m_scale_up_down(applied, fresh):
    models, net = applied
    before = {n: p.asnumpy() for n, p in fresh.unet.parameters_and_names()}
    fresh_net, sd = lora.create_network_from_weights(0.6, None, None, tes(fresh), fresh.unet,
                                                     weights_sd=net.state_dict())
    fresh_net.merge_to(weights_sd=sd, multiplier=0.6)
    after = {n: p.asnumpy() for n, p in fresh.unet.parameters_and_names()}
    kinds = {}
    for m in net.unet_loras:
        path = fresh_net.target_path(m)
        down, up = m.down_up()
        if down.ndim == 2:
            kind, delta = "linear", up @ down
        else:
            kind = f"conv{down.shape[2]}x{down.shape[3]}"
            delta = np.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
        expected = before[path + ".weight"] + 0.6 * (m.alpha / m.lora_dim) * delta
        np.testing.assert_allclose(after[path + ".weight"], expected, rtol=1e-5, atol=1e-6)
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {"linear", "conv3x3", "conv1x1"}
    assert {m.alpha for m in net.unet_loras} == {2.0, 1.5}
    restore(fresh)


def test_module_matches_kohya_forward_and_merge():
    """kohya's LoRAModule (forward) and LoRAInfModule.merge_to, run in PyTorch on the same
    weights (tests/fixtures/kohya_lora/kohya_lora_module_parity.npz): rank 3, alpha 2, m 0.7."""
    fx = np.load(FIXTURES / "kohya_lora" / "kohya_lora_module_parity.npz")
    for name in ("linear", "conv3", "conv1"):
        w0, b = fx[f"{name}_w0"], fx[f"{name}_b"]
        if name == "linear":
            org = nn.Dense(w0.shape[1], w0.shape[0])
        else:
            k = w0.shape[2]
            org = nn.Conv2d(w0.shape[1], w0.shape[0], k, stride=2 if k == 3 else 1,
                            pad_mode="pad", padding=1 if k == 3 else 0, has_bias=True)
        org.weight.set_data(Tensor(w0))
        org.bias.set_data(Tensor(b))
        mult = ms.Parameter(Tensor(0.7, ms.float32), name="m", requires_grad=False)
        branch = lora.LoRAModule("lora_x", org, 3, 2.0, mult)
        branch.lora_down.weight.set_data(Tensor(fx[f"{name}_down"]))
        branch.lora_up.weight.set_data(Tensor(fx[f"{name}_up"]))
        host = lora.LoRAConv2d(org) if name != "linear" else lora.LoRADense(org)
        host.lora_branches.append(branch)
        y = host(Tensor(fx[f"{name}_x"])).asnumpy()
        np.testing.assert_allclose(y, fx[f"{name}_y"], rtol=1e-5, atol=1e-5)
        merged = w0 + 0.7 * branch.delta_weight()
        np.testing.assert_allclose(merged, fx[f"{name}_merged"], rtol=1e-5, atol=1e-6)


def test_init_names_and_checkpoint_io_ignore_lora(applied, tmp_path, fresh):
    models, net = applied
    net0 = lora.create_network(1.0, 4, None, None, tes(fresh), fresh.unet)
    # kohya's init: up zero, down kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for m in net0.loras:
        down, up = m.down_up()
        assert not up.any() and down.any()
        assert np.abs(down).max() <= 1 / np.sqrt(m.fan_in) + 1e-7
    # names: kohya keys, unique, and the base weights keep their names
    names = [p.name for p in net.get_trainable_params()]
    assert len(set(names)) == len(names) == 2 * len(net)
    assert set(names) == {k for k in net.key_shapes() if not k.endswith(".alpha")}
    params = dict(models.unet.parameters_and_names())
    assert params["input_blocks.4.1.proj_in.weight"].name == "unet.input_blocks.4.1.proj_in.weight"  # as built
    assert "input_blocks.4.1.proj_in.lora_branches.0.lora_down.weight" in params
    assert params["input_blocks.4.1.proj_in.lora_branches.0.lora_down.weight"].name == \
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight"
    assert not any(p.requires_grad for n, p in params.items() if "multiplier" in n)
    # checkpoint save/load of a LoRA'd model writes the base weights only (unchanged by LoRA)
    assert len(list(base_parameters(models))) == len(list(base_parameters(fresh)))
    out = tmp_path / "base_again.safetensors"
    save_single_file(models, out)
    again = {n: p.asnumpy() for _, n, p in base_parameters(load_sdxl(out))}
    orig = {n: p.asnumpy() for _, n, p in base_parameters(fresh)}
    assert all(np.array_equal(again[n], orig[n]) for n in orig)


def test_dropouts_only_in_training(tiny_ckpt):
    models = load_sdxl(tiny_ckpt)
    te = models.text_encoder1
    net = lora.create_network(1.0, 4, 4.0, None, [te, models.text_encoder2], None,
                              neuron_dropout=0.3, rank_dropout="0.5", module_dropout="0.2")
    randomise_lora(net, up_std=0.2)
    net.apply_to([te, models.text_encoder2], None, True, False)
    te.set_train(False)
    a, b = te(ids(1))[0].asnumpy(), te(ids(1))[0].asnumpy()
    assert np.array_equal(a, b)
    te.set_train(True)
    c, d = te(ids(1))[0].asnumpy(), te(ids(1))[0].asnumpy()
    assert not np.array_equal(c, d) and not np.array_equal(c, a)
    te.set_train(False)
    for m in net.loras:                      # eval output is the no-dropout output
        m.dropout = m.rank_dropout = m.module_dropout = None
    np.testing.assert_array_equal(te(ids(1))[0].asnumpy(), a)


def test_rank_dropout_keeps_tokens_per_sample_and_both_layouts_agree(tiny_ckpt):
    """The transformers run tokens as rows (B*L, C); rank dropout (a per-sample mask, kohya's)
    switches them to (B, L, C). Both layouts give the same UNet output."""
    from library.models.unet import SpatialTransformer
    models = load_sdxl(tiny_ckpt)
    transformers = [c for _, c in models.unet.cells_and_names()
                    if isinstance(c, SpatialTransformer)]
    assert transformers and all(c.token_rows for c in transformers)
    net = lora.create_network(1.0, 4, 4.0, None, tes(models), models.unet, rank_dropout="0.5")
    randomise_lora(net, up_std=0.2)
    net.apply_to(tes(models), models.unet, False, True)
    assert not any(c.token_rows for c in transformers)
    models.unet.set_train(False)
    batch = unet_inputs(models)
    per_sample = models.unet(*batch).asnumpy()
    for c in transformers:
        c.token_rows = True
    np.testing.assert_allclose(models.unet(*batch).asnumpy(), per_sample, rtol=1e-5, atol=1e-5)


def test_second_network_stacks_with_its_own_multiplier(tiny_ckpt):
    models = load_sdxl(tiny_ckpt)
    first = lora.create_network(1.0, 2, None, None, tes(models), None)
    second = lora.create_network(1.0, 2, None, None, tes(models), None)
    randomise_lora(first, 1)
    randomise_lora(second, 2)
    first.apply_to(tes(models), None, True, False)
    second.apply_to(tes(models), None, True, False)
    names = [p.name for p in first.get_trainable_params() + second.get_trainable_params()]
    assert len(set(names)) == len(names) and names[-1].startswith("net1.")
    te = models.text_encoder1
    both = te(ids(1))[0].asnumpy()
    second.set_multiplier(0.0)
    only_first = te(ids(1))[0].asnumpy()
    first.set_multiplier(0.0)
    none = te(ids(1))[0].asnumpy()
    assert not np.allclose(both, only_first) and not np.allclose(only_first, none)


GRAPH_SCRIPT = textwrap.dedent("""
    import sys, time, json, numpy as np, mindspore as ms
    from mindspore import Tensor
    ms.set_context(mode=ms.GRAPH_MODE)
    from library.models import load_sdxl
    from networks import lora
    from tests.conftest import randomise_lora
    m = load_sdxl(sys.argv[1])
    net = lora.create_network(1.0, 4, 4.0, None, [], m.unet)
    randomise_lora(net)
    rng = np.random.default_rng(0)
    net.apply_to([], m.unet)
    m.unet.set_train(False)
    x = Tensor(rng.normal(size=(1, 4, 8, 8)).astype(np.float32))
    t = Tensor(np.array([500], np.int32))
    c = Tensor(rng.normal(size=(1, 77, 64)).astype(np.float32))
    y = Tensor(rng.normal(size=(1, 128)).astype(np.float32))
    times, outs = [], []
    for mult in (1.0, 0.0, 1.0):
        net.set_multiplier(mult)
        t0 = time.time(); outs.append(m.unet(x, t, c, y).asnumpy()); times.append(time.time() - t0)
    print(json.dumps({"times": times, "d10": float(np.abs(outs[0] - outs[1]).max()),
                      "d02": float(np.abs(outs[0] - outs[2]).max())}))
""")


def test_graph_mode_compiles_once_and_multiplier_switches(tiny_ckpt, tmp_path):
    import json
    import subprocess
    script = tmp_path / "graph_lora.py"
    script.write_text(GRAPH_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_ckpt)], cwd=ROOT,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                                                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second, third = doc["times"]
    assert doc["d10"] > 1e-3          # multiplier 0 changed the output ...
    assert doc["d02"] < 1e-6          # ... and 1 again restores it exactly
    assert second < first / 4 and third < first / 4, doc["times"]   # no recompile


def test_multiplier_switch_reaches_a_jit_compiled_function(tiny_ckpt):
    """PyNative + ms.jit (how the trainer and the generator compile): a host-side set_data is not
    seen by an already compiled function in MindSpore 2.7.1, so set_multiplier must write the
    multiplier from inside a graph."""
    import mindspore as ms
    m = load_sdxl(tiny_ckpt)
    te = [m.text_encoder1, m.text_encoder2]
    net = lora.create_network(1.0, 4, 4.0, None, te, m.unet)
    for module in net.loras:
        module.lora_up.weight.set_data(ms.Tensor(np.full(module.lora_up.weight.shape, 0.05,
                                                         np.float32)))
    net.apply_to(te, m.unet, apply_unet=False)
    encode = ms.jit(m.text_encoder1.construct)
    ids = ms.Tensor(np.array([[49406, 320, 2368, 49407] + [49407] * 73], np.int32))
    outs = []
    for mult in (1.0, 0.0, 1.0):
        net.set_multiplier(mult)
        outs.append(encode(ids)[0].asnumpy())
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
    assert np.array_equal(outs[0], outs[2])
