"""Checkpoint I/O: strict loads, round trips, dtypes, diffusers folders, and bad files."""

import numpy as np
import mindspore as ms
import pytest

from library.errors import UserError
from library.models import load_sdxl
from library.models.checkpoint import (COMPONENTS, base_parameters, save_diffusers_folder,
                                       save_single_file)
from library.safetensors_io import SafetensorsFile, write_safetensors
from conftest import run_tool


def file_tensors(path):
    st = SafetensorsFile(path)
    return {k: np.array(st.get(k)) for k in st.keys()}


def params(models):
    return {(c, n): p.astype(ms.float32).asnumpy() for c, n, p in base_parameters(models)}


def test_single_file_round_trip_is_identical(tiny_ckpt, tiny_models, tmp_path):
    out = tmp_path / "again.safetensors"
    save_single_file(tiny_models, out)
    original, saved = file_tensors(tiny_ckpt), file_tensors(out)
    assert sorted(original) == sorted(saved)
    assert all(np.array_equal(original[k], saved[k]) for k in original)
    reloaded = params(load_sdxl(out))
    first = params(tiny_models)
    assert all(np.array_equal(first[k], reloaded[k]) for k in first)


def test_te2_fused_qkv_and_projection_are_split_as_openclip_stores_them(tiny_ckpt, tiny_models):
    raw = file_tensors(tiny_ckpt)
    te2 = dict(tiny_models.text_encoder2.parameters_and_names())
    fused = raw["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    d = fused.shape[1]
    for i, name in enumerate("qkv"):
        ours = te2[f"text_model.encoder.layers.1.self_attn.{name}_proj.weight"].asnumpy()
        assert np.array_equal(ours, fused[i * d:(i + 1) * d])
    p = raw["conditioner.embedders.1.model.text_projection"]
    assert np.array_equal(te2["text_projection.weight"].asnumpy(), p.T)  # pooled = x @ P


@pytest.mark.parametrize("dtype,ms_dtype", [("float16", ms.float16), ("bfloat16", ms.bfloat16)])
def test_load_in_half_precision(tiny_ckpt, tiny_models, dtype, ms_dtype):
    half = load_sdxl(tiny_ckpt, dtype=dtype)
    got = {(c, n): p for c, n, p in base_parameters(half)}
    assert {p.dtype for p in got.values()} == {ms_dtype}
    full = params(tiny_models)
    key = ("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
    expected = ms.Tensor(full[key]).astype(ms_dtype).astype(ms.float32).asnumpy()
    assert np.array_equal(got[key].astype(ms.float32).asnumpy(), expected)


def test_diffusers_folder_round_trip(tiny_models, tmp_path):
    folder = tmp_path / "diffusers"
    save_diffusers_folder(tiny_models, folder)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert (folder / sub / "config.json").is_file()
    again = params(load_sdxl(folder))
    first = params(tiny_models)
    assert set(again) == set(first)
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_safetensors_files_interoperate_with_the_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16),
              "c": np.array(3, dtype=np.int64)}
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, arrays, metadata={"k": "v"})
    theirs = load_file(ours)
    assert all(np.array_equal(theirs[k], arrays[k]) for k in arrays)
    save_file(arrays, tmp_path / "theirs.safetensors", metadata={"k": "v"})
    st = SafetensorsFile(tmp_path / "theirs.safetensors")
    assert st.metadata == {"k": "v"}
    assert all(np.array_equal(st.get(k), arrays[k]) for k in arrays)


def test_bfloat16_is_rounded_to_nearest_even_and_read_back_exactly(tmp_path):
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5e-3, 3.0e38, np.inf, np.nan], np.float32)
    write_safetensors(tmp_path / "b.safetensors", {"x": values}, dtype="bfloat16")
    st = SafetensorsFile(tmp_path / "b.safetensors")
    assert st.dtype("x") == "BF16"
    got = st.get("x")
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1.0); 1 + 3*2^-8 rounds up.
    assert got[0] == 1.0 and got[1] == 1.0 and got[2] == 1.015625
    assert abs(got[3] - values[3]) < 2 ** -8 * abs(values[3])
    assert np.isinf(got[5]) and np.isnan(got[6])
    as_ms = ms.Tensor(values[:5], ms.bfloat16).astype(ms.float32).asnumpy()
    assert np.array_equal(as_ms, got[:5])   # the same rounding MindSpore applies


def test_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(ValueError):
        write_safetensors(target, {"x": np.zeros(2, np.float32)}, metadata={"n": 1})
    assert list(tmp_path.iterdir()) == []


# --- bad inputs, through a CLI, as a user meets them -----------------------------------------

def _variant(tiny_ckpt, path, change):
    tensors = file_tensors(tiny_ckpt)
    change(tensors)
    write_safetensors(path, tensors)
    return path


def _convert(src, tmp_path, **env):
    return run_tool("tools/convert_sdxl.py", src, "--out", tmp_path / "out.safetensors",
                    check=False, env=env)


def _assert_refused(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in proc.stderr


def test_truncated_checkpoint(tiny_ckpt, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(tiny_ckpt.read_bytes()[: tiny_ckpt.stat().st_size // 2])
    _assert_refused(_convert(bad, tmp_path), str(bad), "is truncated", "download or save it again")


def test_corrupt_header(tmp_path):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _assert_refused(_convert(bad, tmp_path), "not a valid .safetensors file")


def test_sd15_checkpoint(tmp_path):
    bad = tmp_path / "sd15.safetensors"
    write_safetensors(bad, {
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3), np.float16),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(768, np.float16),
        "first_stage_model.decoder.conv_in.weight": np.zeros((512, 4, 3, 3), np.float16)})
    _assert_refused(_convert(bad, tmp_path), "Stable Diffusion 1.x/2.x", "needs an SDXL checkpoint")


def test_lora_passed_as_model(tmp_path):
    bad = tmp_path / "my_lora.safetensors"
    write_safetensors(bad, {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.zeros((4, 640), np.float32),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": np.zeros((640, 4), np.float32),
        "lora_unet_input_blocks_4_1_proj_in.alpha": np.array(4.0, np.float32)})
    _assert_refused(_convert(bad, tmp_path), "is a LoRA", "--network_weights")


def test_pickle_checkpoint_is_refused_without_being_read(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04\x95 this would be unpickled")
    _assert_refused(_convert(bad, tmp_path), "pickle", "arbitrary code", ".safetensors")


def test_missing_extra_and_misshapen_tensors_are_listed(tiny_ckpt, tmp_path):
    gone = "model.diffusion_model.output_blocks.5.2.conv.weight"
    bad = _variant(tiny_ckpt, tmp_path / "missing.safetensors", lambda t: t.pop(gone))
    _assert_refused(_convert(bad, tmp_path), "1 tensors the model needs are missing", gone)

    extra = "model.diffusion_model.some_new_block.weight"
    bad = _variant(tiny_ckpt, tmp_path / "extra.safetensors",
                   lambda t: t.update({extra: np.zeros(3, np.float32)}))
    _assert_refused(_convert(bad, tmp_path), "not part of an SDXL model", extra)

    key = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
    bad = _variant(tiny_ckpt, tmp_path / "shape.safetensors",
                   lambda t: t.update({key: np.ones(7, np.float32)}))
    _assert_refused(_convert(bad, tmp_path), "wrong shape", key, "(7,)")


@pytest.mark.parametrize("preset", ["tiny", "medium", "sdxl_base"])
def test_a_files_preset_is_found_from_the_shapes_its_built_unet_has(preset):
    """The preset probe reads conv_in and label_emb shapes off the config: they must be the
    shapes the built UNet's parameters have (built without weights, about a second at full size)."""
    from library.models import build_sdxl
    from library.models.checkpoint import detect_preset
    unet = dict(build_sdxl(preset, init=False).unet.parameters_and_names())
    assert detect_preset("m", lambda k: tuple(unet[k].shape)) == preset


def test_an_unknown_unet_width_is_refused(tiny_ckpt, tmp_path):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    bad = _variant(tiny_ckpt, tmp_path / "wide.safetensors",
                   lambda t: t.update({key: np.zeros((48, 4, 3, 3), np.float32)}))
    _assert_refused(_convert(bad, tmp_path), str(bad), "(48, 4, 3, 3)",
                    "match no supported SDXL configuration")


def test_position_ids_in_a_file_are_tolerated(tiny_ckpt, tmp_path):
    key = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    ok = _variant(tiny_ckpt, tmp_path / "pos.safetensors",
                  lambda t: t.update({key: np.arange(77, dtype=np.int64)[None]}))
    load_sdxl(ok)


def test_hub_id_offline_says_to_pass_a_local_path(tmp_path):
    proc = _convert("stabilityai/stable-diffusion-xl-base-1.0", tmp_path, HF_HUB_OFFLINE="1")
    _assert_refused(proc, "Hugging Face hub", "pass a local path")


def test_missing_path_is_a_user_error():
    with pytest.raises(UserError, match="model not found"):
        load_sdxl("/nonexistent/model.safetensors")
