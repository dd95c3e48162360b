"""tools/merge_lora.py: LoRAs into a checkpoint, and LoRA+LoRA (kohya's sum, exact concat, SVD)."""

import numpy as np
import pytest

from conftest import run_tool
from library.models import build_sdxl
from library.safetensors_io import SafetensorsFile
from networks import lora
from tools import merge_lora


@pytest.fixture(scope="module")
def tiny_targets():
    m = build_sdxl("tiny", init=False)
    return m, lora.create_network(1.0, 4, 2.0, None, [m.text_encoder1, m.text_encoder2], m.unet,
                                  conv_dim="2")


def random_lora(network, seed):
    rng = np.random.default_rng(seed)
    sd = network.state_dict()
    for k in sd:
        if not k.endswith(".alpha"):
            sd[k] = rng.normal(0, 0.1, sd[k].shape).astype(np.float32)
    return sd


def deltas(sd):
    out = {}
    for name, e in lora.split_modules(sd).items():
        alpha = float(e["alpha"]) if "alpha" in e else e["lora_down"].shape[0]
        out[name] = lora.delta_weight(e["lora_down"], e["lora_up"],
                                      alpha / e["lora_down"].shape[0])
    return out


def test_concat_and_svd_are_exact_sums_of_delta_w(tiny_targets):
    _, net = tiny_targets
    a, b = random_lora(net, 1), random_lora(net, 2)
    loaded = [merge_lora.module_factors(a), merge_lora.module_factors(b)]
    want = {n: 0.8 * da + -0.5 * deltas(b)[n] for n, da in deltas(a).items()}
    concat = merge_lora.merge_concat(loaded, [0.8, -0.5])
    svd_full = merge_lora.merge_svd(loaded, [0.8, -0.5], new_rank=8)
    for merged in (concat, svd_full):
        got = deltas(merged)
        for n in want:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-4, atol=1e-5)
        assert {e["lora_down"].shape[0] for e in lora.split_modules(merged).values()} == {4, 8}
    # truncated SVD is the best rank-2 approximation (error = the dropped singular values)
    svd2 = merge_lora.merge_svd(loaded, [0.8, -0.5], new_rank=2, new_conv_rank=1)
    name = "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"
    s = np.linalg.svd(want[name], compute_uv=False)
    err = np.linalg.norm(deltas(svd2)[name] - want[name])
    assert err == pytest.approx(np.sqrt((s[2:] ** 2).sum()), rel=1e-3)
    conv_ranks = {e["lora_down"].shape[0] for n, e in lora.split_modules(svd2).items()
                  if e["lora_down"].ndim == 4 and e["lora_down"].shape[2] == 3}
    assert conv_ranks == {1}


def test_kohya_default_merge_sums_factors(tiny_targets):
    _, net = tiny_targets
    a, b = random_lora(net, 1), random_lora(net, 2)
    merged = merge_lora.merge_kohya_sum([merge_lora.module_factors(a), merge_lora.module_factors(b)],
                                        [1.0, -0.5])
    k = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    np.testing.assert_allclose(merged[f"{k}.lora_down.weight"],
                               a[f"{k}.lora_down.weight"] - 0.5 * b[f"{k}.lora_down.weight"])
    np.testing.assert_allclose(merged[f"{k}.lora_up.weight"],
                               a[f"{k}.lora_up.weight"] + 0.5 * b[f"{k}.lora_up.weight"])


def test_cli_merges_into_checkpoint_and_into_one_lora(tiny_ckpt, tiny_targets, tmp_path):
    _, net = tiny_targets
    a, b = random_lora(net, 1), random_lora(net, 2)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora.save_lora_file(pa, a, None, {"modelspec.title": "style A"})
    lora.save_lora_file(pb, b, "fp16")
    out = tmp_path / "merged.safetensors"
    run_tool("tools/merge_lora.py", "--sd_model", tiny_ckpt, "--models", pa, pb, "--ratios",
             "0.7", "0.3", "--save_to", out)
    base, merged = SafetensorsFile(tiny_ckpt), SafetensorsFile(out)
    b16 = lora.split_modules({k: np.asarray(v, np.float32) for k, v in b.items()})
    for name, key in (("lora_unet_input_blocks_4_1_proj_in",
                       "model.diffusion_model.input_blocks.4.1.proj_in.weight"),
                      ("lora_unet_input_blocks_1_0_in_layers_2",
                       "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"),
                      ("lora_te1_text_model_encoder_layers_1_mlp_fc2",
                       "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2."
                       "weight")):
        ea = lora.split_modules(a)[name]
        eb = b16[name]
        expected = (np.asarray(base.get(key), np.float32)
                    + 0.7 * lora.delta_weight(ea["lora_down"], ea["lora_up"], 2.0 / 4 if
                                              ea["lora_down"].ndim == 2 or
                                              ea["lora_down"].shape[2] == 1 else 1.0 / 2)
                    + 0.3 * lora.delta_weight(np.float16(eb["lora_down"]).astype(np.float32),
                                              np.float16(eb["lora_up"]).astype(np.float32),
                                              float(eb["alpha"]) / eb["lora_down"].shape[0]))
        np.testing.assert_allclose(merged.get(key), expected, rtol=1e-4, atol=1e-5)
    assert merged.metadata["modelspec.merged_from"] == "style A, b"

    one = tmp_path / "one.safetensors"        # the same entry point, in-process (faster)
    assert merge_lora.main(["--models", str(pa), str(pb), "--ratios", "1", "1", "--concat",
                            "--save_to", str(one), "--save_precision", "fp16"]) == 0
    st = SafetensorsFile(one)
    assert st.metadata["ss_network_dim"] == "Dynamic"          # rank 8 linear, 4 conv
    assert st.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    with pytest.raises(SystemExit) as exc:
        merge_lora.main(["--models", str(pa), str(pb), "--ratios", "1", "--save_to", str(one)])
    assert exc.value.code == 2
