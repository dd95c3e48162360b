"""Module trees: names and shapes are the checkpoint's, at full size and in the tiny preset."""

import numpy as np
import pytest

from library.models import build_sdxl
from library.models.checkpoint import checkpoint_shapes
from library.models.config import SDXL_BASE, TINY
from library.models.unet import (BasicTransformerBlock, Downsample, ResBlock, SpatialTransformer,
                                 Upsample)
from conftest import FIXTURES


def read_key_table(path):
    rows = path.read_text().splitlines()[1:]
    table = {}
    for row in rows:
        key, shape = row.split("\t")
        table[key] = tuple(int(x) for x in shape.strip("[]").split(",") if x.strip())
    return table


@pytest.fixture(scope="module")
def base_models():
    return build_sdxl("sdxl_base", init=False)


def test_full_size_checkpoint_keys_and_shapes_match_sdxl_base(base_models):
    expected = read_key_table(FIXTURES / "sdxl_base_checkpoint_keys.tsv")
    got = checkpoint_shapes(base_models)
    assert len(expected) == 2514
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != tuple(v)} == {}


def test_full_size_unet_parameter_count(base_models):
    n = sum(int(np.prod(p.shape)) for p in base_models.unet.get_parameters())
    assert n == 2_567_463_684   # kohya's SdxlUNet2DConditionModel, counted in the reference


def _kinds(unet):
    return [type(c) for _, c in unet.cells_and_names()]


@pytest.mark.parametrize("preset", ["tiny", "sdxl_base"])
def test_every_block_kind_is_present(preset):
    unet = build_sdxl(preset, init=False).unet
    kinds = _kinds(unet)
    for kind in (ResBlock, SpatialTransformer, BasicTransformerBlock, Downsample, Upsample):
        assert kind in kinds, kind.__name__
    names = dict(unet.parameters_and_names())
    # A 1x1 skip wherever channels change, two transformer blocks in the deepest level.
    assert "input_blocks.4.0.skip_connection.weight" in names
    assert "input_blocks.7.0.skip_connection.weight" in names
    assert "input_blocks.7.1.transformer_blocks.1.attn1.to_q.weight" in names
    assert "output_blocks.2.2.conv.weight" in names and "output_blocks.5.2.conv.weight" in names
    assert not any(k.startswith("input_blocks.1.1.") for k in names)  # no attention at level 0


def test_tiny_unet_and_text_encoders_mirror_base_topology():
    # The tiny VAE keeps the four levels (latents at 1/8) but has fewer, narrower blocks.
    def no_vae(keys):
        return {k for k in keys if not k.startswith("first_stage_model.")}

    tiny = no_vae(checkpoint_shapes(build_sdxl("tiny", init=False)))
    base = no_vae(read_key_table(FIXTURES / "sdxl_base_checkpoint_keys.tsv"))

    def layout(keys):  # deeper transformer stacks are the only difference allowed
        import re
        return {re.sub(r"(transformer_blocks|resblocks|layers)\.\d+\.", r"\1.N.", k) for k in keys}

    assert layout(tiny) == layout(base)


def test_configs_are_consistent():
    for cfg in (SDXL_BASE, TINY):
        u = cfg.unet
        assert u.context_dim == cfg.text_encoder1.hidden_size + cfg.text_encoder2.hidden_size
        assert u.adm_in_channels == cfg.text_encoder2.projection_dim + 6 * u.size_embed_dim
    assert SDXL_BASE.unet.adm_in_channels == 2816 and SDXL_BASE.vae.scaling_factor == 0.13025


def test_a_built_model_skips_mindspores_per_cell_name_check_and_duplicates_are_refused(
        monkeypatch, tiny_ckpt):
    """layers.check_parameter_names_once: MindSpore's own check (one subtree walk per cell on
    its first PyNative call) must not run for a built model's cells; if MindSpore renames the private
    flag it runs again and this test fails."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn
    from library import layers
    from library.models import load_sdxl
    calls = []
    original = nn.Cell.check_names_and_refresh_name
    monkeypatch.setattr(nn.Cell, "check_names_and_refresh_name",
                        lambda self: calls.append(len(self.trainable_params())) or original(self))
    te = build_sdxl("tiny").text_encoder1
    te(Tensor(np.zeros((1, 77), np.int32)))
    assert not any(calls)       # at most layers' shared parameterless op cells, once a process

    def marked(model):
        return {c._is_check_and_refresh for _, c in model.cells_and_names()}
    assert marked(load_sdxl(tiny_ckpt).unet) == {True}
    assert marked(build_sdxl("tiny", init=False).unet) == {False}   # no data yet: MindSpore's own

    class Twice(nn.Cell):
        def __init__(self):
            super().__init__()
            self.a = Parameter(Tensor(np.zeros(1, np.float32)), name="w")
            self.b = Parameter(Tensor(np.zeros(1, np.float32)), name="w")
    with pytest.raises(ValueError, match=r"duplicate parameter names: \['w'\]"):
        layers.check_parameter_names_once(Twice())
