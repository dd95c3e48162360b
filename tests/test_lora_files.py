"""LoRA files: round trips, precisions, kohya's hashes, other key styles, strict loading, and the
errors a user meets through the tools (exit code 2, one `error:` line)."""

import json

import numpy as np
import pytest

from conftest import FIXTURES, run_tool
from library import lora_metadata as md
from library.errors import UserError
from library.models import build_sdxl
from library.models.keymaps import diffusers_place
from library.safetensors_io import SafetensorsFile, write_safetensors
from networks import lora


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl("tiny", init=False)


def tes(models):
    return [models.text_encoder1, models.text_encoder2]


@pytest.fixture(scope="module")
def tiny_sd(tiny):
    net = lora.create_network(1.0, 4, 2.0, None, tes(tiny), tiny.unet, conv_dim="2")
    sd = net.state_dict()
    rng = np.random.default_rng(0)
    for k in sd:
        if k.endswith("lora_up.weight"):
            sd[k] = rng.normal(0, 0.1, sd[k].shape).astype(np.float32)
    return sd


def read(path):
    st = SafetensorsFile(path)
    return {k: np.array(st.get(k)) for k in st.keys()}, st


def one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_round_trip_identical_tensors_and_metadata(tiny, tiny_sd, tmp_path):
    meta = md.network_metadata({"conv_dim": "2"}, 4, 2.0)
    meta.update(md.modelspec_metadata(title="t", timestamp=0, trigger_phrase="sks"))
    path = tmp_path / "a.safetensors"
    lora.save_lora_file(path, tiny_sd, None, meta)
    tensors, st = read(path)
    assert set(tensors) == set(tiny_sd)
    assert all(np.array_equal(tensors[k], tiny_sd[k]) for k in tiny_sd)
    assert {k: v for k, v in st.metadata.items() if not k.startswith("sshs_")} == meta
    assert (st.metadata["sshs_model_hash"], st.metadata["sshs_legacy_hash"]) == \
        md.precalculate_safetensors_hashes(tensors, meta)
    # load into a network built from the file: the same tensors come back out
    net, sd = lora.create_network_from_weights(1.0, str(path), None, tes(tiny), tiny.unet)
    net.load_state_dict(sd)
    back = net.state_dict()
    assert all(np.array_equal(back[k], tiny_sd[k]) for k in tiny_sd)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


@pytest.mark.parametrize("precision,code,tol", [("float", "F32", 0), ("fp16", "F16", 1e-3),
                                                ("bf16", "BF16", 1e-2)])
def test_save_precision_and_float32_alpha(tiny_sd, tmp_path, precision, code, tol):
    path = tmp_path / f"{precision}.safetensors"
    lora.save_lora_file(path, tiny_sd, precision, {"ss_network_dim": "4"})
    tensors, st = read(path)
    assert {st.dtype(k) for k in st.keys() if not k.endswith(".alpha")} == {code}
    assert {st.dtype(k) for k in st.keys() if k.endswith(".alpha")} == {"F32"}
    assert all(st.shape(k) == () for k in st.keys() if k.endswith(".alpha"))
    for k in tiny_sd:
        np.testing.assert_allclose(tensors[k], tiny_sd[k], rtol=tol, atol=tol)


def test_hashes_are_kohyas():
    """The values kohya's train_util.precalculate_safetensors_hashes gave for these tensors
    (mixed F16/F32/I64/BF16, >1 MiB so the legacy window is in the data, non-ASCII metadata)."""
    ref = json.loads((FIXTURES / "kohya_lora" / "hash_parity.json").read_text())
    sd = {"a.lora_down.weight": (np.arange(400000, dtype=np.float32) % 1000 * 0.001)
          .reshape(400, 1000),
          "a.alpha": np.array(4.0, np.float32),
          "b.lora_up.weight": (np.arange(300000, dtype=np.float32) % 777 * -0.002)
          .reshape(3000, 100),
          "c.alpha": np.array(8, np.int64),
          "d.lora_down.weight": (np.arange(50000, dtype=np.float32) % 333 * 0.01)
          .reshape(500, 100)}
    got = md.precalculate_safetensors_hashes(
        sd, ref["metadata"], {"a.lora_down.weight": "float16", "d.lora_down.weight": "bfloat16"})
    assert got == (ref["sshs_model_hash"], ref["sshs_legacy_hash"])


def test_int64_alpha_and_missing_alpha(tiny, tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    names = sorted({k.split(".")[0] for k in sd})
    sd[f"{names[0]}.alpha"] = np.array(3, dtype=np.int64)      # kohya's default int alpha
    del sd[f"{names[1]}.alpha"]                                # old files: alpha = rank
    path = tmp_path / "k.safetensors"
    write_safetensors(path, sd)
    net, weights = lora.create_network_from_weights(1.0, str(path), None, tes(tiny), tiny.unet)
    net.load_state_dict(weights)
    by_name = {m.lora_name: m for m in net.loras}
    assert by_name[names[0]].alpha == 3.0 and by_name[names[0]].scale == 3.0 / 4
    assert by_name[names[1]].alpha == 4.0 and by_name[names[1]].scale == 1.0


def test_per_module_ranks_from_weights(tiny, tiny_sd):
    sd = dict(tiny_sd)
    name = "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"
    sd[f"{name}.lora_down.weight"] = np.ones((7, 96), np.float32)
    sd[f"{name}.lora_up.weight"] = np.ones((96, 7), np.float32)
    net, _ = lora.create_network_from_weights(1.0, None, None, tes(tiny), tiny.unet,
                                              weights_sd=sd)
    ranks = {m.lora_name: m.lora_dim for m in net.loras}
    assert ranks[name] == 7 and set(ranks.values()) == {2, 4, 7}


def diffusers_style(tiny, sd):
    """Our tiny state dict renamed to (a) kohya keys with diffusers block names and
    (b) PEFT keys (unet./text_encoder./text_encoder_2. + .lora_A/.lora_B)."""
    cfg = tiny.config
    sgm = {n[:-len(".weight")].replace(".", "_"): n[:-len(".weight")]
           for n, _ in tiny.unet.parameters_and_names() if n.endswith(".weight")}
    kohya_diff, peft = {}, {}
    for key, value in sd.items():
        module, part = key.split(".", 1)
        if module.startswith("lora_unet_"):
            dotted = diffusers_place("unet", sgm[module[10:]] + ".weight", cfg).key[:-7]
            kohya_diff["lora_unet_" + dotted.replace(".", "_") + "." + part] = value
            prefix, path = "unet.", dotted
        else:
            kohya_diff[key] = value
            te = "text_encoder." if module.startswith("lora_te1_") else "text_encoder_2."
            path = module[9:].replace("text_model_encoder_layers_", "text_model.encoder.layers.")
            path = re.sub(r"layers\.(\d+)_(self_attn|mlp)_(.+)", r"layers.\1.\2.\3", path)
            prefix = te
        if part != "alpha":
            peft_part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
            peft[prefix + path + "." + peft_part[part]] = value
    return kohya_diff, peft


import re  # noqa: E402


def test_diffusers_and_peft_keys_are_converted(tiny, tiny_sd):
    kohya_diff, peft = diffusers_style(tiny, tiny_sd)
    assert any("down_blocks" in k for k in kohya_diff)
    assert lora.convert_to_kohya_keys(kohya_diff, unet_config=tiny.config.unet) == tiny_sd
    converted = lora.convert_to_kohya_keys(
        peft, {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2.0,
                                                     "text_encoder.lora_alpha": 2.0,
                                                     "text_encoder_2.lora_alpha": 2.0})},
        unet_config=tiny.config.unet)
    assert set(converted) == set(tiny_sd)
    assert all(np.array_equal(converted[k], tiny_sd[k]) for k in tiny_sd if "alpha" not in k)
    assert {float(v) for k, v in converted.items() if k.endswith(".alpha")} == {2.0}


def test_diffusers_written_loras_of_both_te_spellings_load_and_merge_the_same():
    """tests/fixtures/diffusers_lora: the same LoRA saved by diffusers 0.42.1 with transformers 5
    (TE1 keys `text_encoder.encoder.layers.N...`: transformers 5 dropped CLIPTextModel's
    `text_model.` level) and by diffusers 0.35.2 with transformers 4.57.1 (`text_encoder.
    text_model.encoder.layers.N...`), made by tools/make_diffusers_lora_fixtures.py. Both load
    strictly, and merging either changes every model's weights by the same amounts."""
    folder = FIXTURES / "diffusers_lora"
    spellings = {"tiny_transformers5.safetensors": "text_encoder.encoder.layers.0.",
                 "tiny_transformers4.safetensors": "text_encoder.text_model.encoder.layers.0."}
    deltas = []
    for name, te1_prefix in spellings.items():
        assert any(k.startswith(te1_prefix) for k in SafetensorsFile(folder / name).keys())
        models = build_sdxl("tiny")       # initialised: the merge reads the weights
        cells = (models.text_encoder1, models.text_encoder2, models.unet)
        before = [{n: p.asnumpy().copy() for n, p in c.parameters_and_names()} for c in cells]
        lora.merge_lora_weights(models, [folder / name], [1.0])
        deltas.append([{n: p.asnumpy() - b[n] for n, p in c.parameters_and_names()}
                       for c, b in zip(cells, before)])
    for new, old in zip(*deltas):
        assert any(np.abs(d).max() > 0 for d in new.values())          # each model was changed
        # two randomly initialised models: the same delta up to float32 rounding of W + dW
        assert all(np.allclose(new[n], old[n], rtol=0, atol=1e-6) for n in new)


# --- bad inputs ------------------------------------------------------------------------------

def sd15_lora():
    return {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
            np.zeros((4, 768), np.float32),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
            np.zeros((768, 4), np.float32),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": np.array(4.0, np.float32),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
            np.zeros((4, 768), np.float32),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
            np.zeros((640, 4), np.float32)}


def test_sd15_lora_is_refused_by_check_lora(tmp_path):
    path = tmp_path / "sd15.safetensors"
    write_safetensors(path, sd15_lora(), {"ss_base_model_version": "sd_v1"})
    err = one_error_line(run_tool("tools/check_lora.py", path, check=False))
    assert "Stable Diffusion 1.x/2.x" in err and "lora_te_text_model" in err
    assert "(4, 768) (expected (4, 2048))" in err       # attn2.to_k: 768-dim context, not 2048


def run_check_in_process(capsys, *args):
    """tools/check_lora.py's main() in this process (the same entry point as the command)."""
    from tools import check_lora
    with pytest.raises(SystemExit) as exc:
        check_lora.main([str(a) for a in args])
    captured = capsys.readouterr()
    return type("Proc", (), {"returncode": exc.value.code, "stderr": captured.err,
                             "stdout": captured.out})


def test_truncated_file_is_reported(tiny_sd, tmp_path, capsys):
    path = tmp_path / "cut.safetensors"
    lora.save_lora_file(path, tiny_sd)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    err = one_error_line(run_check_in_process(capsys, path, "--preset", "tiny"))
    assert "truncated" in err


def test_extra_unknown_keys_and_rank_mismatch_are_errors(tiny, tiny_sd, tmp_path, capsys):
    sd = dict(tiny_sd)
    sd["lora_unet_input_blocks_4_1_proj_in.dora_scale"] = np.ones((1, 64), np.float32)
    sd["embedding.string_to_param.*"] = np.ones((2, 32), np.float32)
    path = tmp_path / "extra.safetensors"
    write_safetensors(path, sd)
    err = one_error_line(run_check_in_process(capsys, path, "--preset", "tiny"))
    assert "2 keys match no module" in err and "dora_scale" in err
    with pytest.raises(UserError, match="embedding.string_to_param"):
        lora.create_network_from_weights(1.0, str(path), None, tes(tiny), tiny.unet)

    bad = dict(tiny_sd)
    name = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    bad[f"{name}.lora_up.weight"] = np.ones((64, 2), np.float32)     # down has rank 4
    with pytest.raises(UserError, match=r"lora_up.weight \(64, 2\) \(expected \(64, 4\)\)"):
        lora.create_network_from_weights(1.0, None, None, tes(tiny), tiny.unet, weights_sd=bad)
    # loading a file into a network of another rank (resuming with other --network_dim)
    net = lora.create_network(1.0, 8, None, None, tes(tiny), tiny.unet, conv_dim="2")
    with pytest.raises(UserError, match="wrong shape"):
        net.load_state_dict(tiny_sd)


def test_pickle_and_non_lora_files_are_refused(tmp_path, tiny):
    with pytest.raises(UserError, match="pickle"):
        lora.load_lora_file(tmp_path / "x.ckpt")
    path = tmp_path / "empty.safetensors"
    write_safetensors(path, {})
    with pytest.raises(UserError, match="no tensors"):
        lora.load_lora_file(path)


def test_metadata_from_args_and_no_metadata(tmp_path):
    from types import SimpleNamespace
    args = SimpleNamespace(network_dim=8, network_alpha=None, network_module="networks.lora",
                           network_dropout=0.1, output_name="my_lora", resolution="1024,768",
                           metadata_trigger_phrase="sks dog", min_timestep=100,
                           pretrained_model_name_or_path=None, no_metadata=False)
    meta = md.lora_metadata_from_args(args, {"conv_dim": "4"}, timestamp=1700000000)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "None"
    assert meta["ss_network_args"] == '{"conv_dim": "4"}'
    assert meta["modelspec.title"] == "my_lora" and meta["modelspec.resolution"] == "1024x768"
    assert meta["modelspec.trigger_phrase"] == "sks dog"
    assert meta["modelspec.timestep_range"] == "100,1000"
    assert meta["modelspec.prediction_type"] == "epsilon"
    args.no_metadata = True
    minimal = md.lora_metadata_from_args(args, {"conv_dim": "4"}, timestamp=1700000000)
    assert {k for k in minimal if k.startswith("ss_")} == set(md.SS_METADATA_MINIMUM_KEYS)


def test_merge_lora_weights_into_models(tiny_ckpt, tiny_sd, tmp_path):
    from library.models import load_sdxl
    models = load_sdxl(tiny_ckpt)
    before = models.unet.input_blocks[4][1].proj_in.weight.asnumpy()
    path = tmp_path / "a.safetensors"
    lora.save_lora_file(path, tiny_sd)
    lora.merge_lora_weights(models, [path, tiny_sd], [0.5, 0.25])
    e = lora.split_modules(tiny_sd)["lora_unet_input_blocks_4_1_proj_in"]
    expected = before + 0.75 * lora.delta_weight(e["lora_down"], e["lora_up"], 2.0 / 4)
    np.testing.assert_allclose(models.unet.input_blocks[4][1].proj_in.weight.asnumpy(), expected,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="does not fit"):
        lora.merge_lora_weights(models, [sd15_lora()], [1.0])
