"""--network_args parsing, block-wise ranks and LR weights, LoRA+, and the optimizer groups."""

import math

import pytest

from library.errors import UserError
from library.models import build_sdxl
from library.lora import args as lora_args
from networks import lora


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl("tiny", init=False)


def tes(m):
    return [m.text_encoder1, m.text_encoder2]


def test_parse_network_args_like_kohya_and_strict():
    assert lora_args.parse_network_args(["conv_dim=4", "conv_alpha=1", "down_lr_weight=1,,0.5"]) == \
        {"conv_dim": "4", "conv_alpha": "1", "down_lr_weight": "1,,0.5"}
    with pytest.raises(UserError, match="unknown network_args for networks.lora: conv_rank"):
        lora_args.parse_network_args(["conv_rank=4"])
    with pytest.raises(UserError, match="--network_dropout"):
        lora_args.parse_network_args(["dropout=0.1"])
    with pytest.raises(UserError, match="not key=value"):
        lora_args.parse_network_args(["conv_dim"])


def test_unknown_or_bad_values_in_create_network(tiny):
    with pytest.raises(UserError, match="unknown network_args.*algo"):
        lora.create_network(1.0, 4, 1, None, tes(tiny), tiny.unet, algo="locon")
    with pytest.raises(UserError, match="conv_dim='four': expected an integer"):
        lora.create_network(1.0, 4, 1, None, tes(tiny), tiny.unet, conv_dim="four")
    with pytest.raises(UserError, match="block_dims must have 23 .* got 22"):
        lora.create_network(1.0, 4, 1, None, tes(tiny), tiny.unet, block_dims=",".join(["4"] * 22))
    with pytest.raises(UserError, match="conv_block_alphas must have 23"):
        lora.create_network(1.0, 4, 1, None, tes(tiny), tiny.unet, block_dims=",".join(["4"] * 23),
                            conv_block_dims=",".join(["2"] * 23), conv_block_alphas="1,2")
    with pytest.raises(UserError, match="not a comma-separated list nor a preset"):
        lora.create_network(1.0, 4, 1, None, tes(tiny), tiny.unet, up_lr_weight="cosinus")


def test_block_dims_and_alphas_per_block(tiny):
    dims = [0] + [1, 2, 3, 4, 5, 6, 7, 8, 9] + [10, 11, 12] + [13, 14, 15, 16, 17, 18, 19, 20, 0] \
        + [0]
    alphas = [float(d) / 2 for d in dims]
    conv = [0] + [2] * 21 + [0]
    net = lora.create_network(1.0, 4, 1, None, tes(tiny), tiny.unet,
                              block_dims=",".join(map(str, dims)),
                              block_alphas=",".join(map(str, alphas)),
                              conv_block_dims=",".join(map(str, conv)))
    for m in net.unet_loras:
        idx = lora.get_block_index(m.lora_name)
        is_3x3 = m.is_conv and m.lora_down.weight.shape[2] == 3
        assert m.lora_dim == (conv[idx] if is_3x3 else dims[idx])
        if not is_3x3:
            assert m.alpha == alphas[idx]
    at_21 = [m for m in net.unet_loras if lora.get_block_index(m.lora_name) == 21]
    assert at_21 and all(m.lora_down.weight.shape[2:] == (3, 3) for m in at_21)  # dim 0: skipped
    assert all(m.lora_dim == 4 for m in net.text_encoder_loras)


def test_lr_weight_presets_and_threshold_as_kohya():
    w = lora_args.get_block_lr_weight(down_lr_weight="cosine", up_lr_weight="linear+0.5",
                                 mid_lr_weight="0.5,,2")
    cosine = [math.sin(math.pi * (i / 8) / 2) for i in reversed(range(9))]
    assert len(w) == 23 and w[0] == 1.0 and w[22] == 1.0
    assert w[1:10] == [c if c > 0 else 0 for c in cosine]            # last one is 0 -> 0
    assert w[10:13] == [0.5, 0, 2.0]
    assert w[13:22] == [i / 8 + 0.5 for i in range(9)]
    short = lora_args.get_block_lr_weight(down_lr_weight="0.1,0.2", zero_threshold=0.15)
    assert short[1:10] == [0, 0.2] + [1.0] * 7
    assert lora_args.get_block_lr_weight() is None


def test_param_groups(tiny):
    net = lora.create_network(1.0, 4, 1, None, tes(tiny), tiny.unet, loraplus_lr_ratio="16",
                              loraplus_text_encoder_lr_ratio="4")
    groups = net.param_groups(text_encoder_lr=[1e-5, 2e-5], unet_lr=1e-4, default_lr=1e-3)
    desc = [(g.description, g.lr, len(g.params)) for g in groups]
    n1, n2, nu = 18, 18, len(net.unet_loras)
    assert desc == [("textencoder 1", 1e-5, n1), ("textencoder 1 plus", 4e-5, n1),
                    ("textencoder 2", 2e-5, n2), ("textencoder 2 plus", 8e-5, n2),
                    ("unet", 1e-4, nu), ("unet plus", 1e-4 * 16, nu)]
    assert all("lora_up" in p.name for p in groups[1].params)
    # one TE value (kohya): one group for both; lr 0 groups are left out ("NO LR skipping!")
    plain = lora.create_network(1.0, 4, 1, None, tes(tiny), tiny.unet)
    groups = plain.param_groups(text_encoder_lr=0, unet_lr=None, default_lr=1e-3)
    assert [(g.description, g.lr) for g in groups] == [("unet", 1e-3)]
    groups = plain.param_groups(text_encoder_lr=5e-5, unet_lr=1e-4)
    assert [(g.description, len(g.params)) for g in groups] == \
        [("textencoder", 2 * (n1 + n2)), ("unet", 2 * nu)]
    params, descriptions = plain.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert params[0]["lr"] == 5e-5 and descriptions == ["textencoder", "unet"]
    total = sum(len(g["params"]) for g in params)
    assert total == len(plain.get_trainable_params())


def test_block_lr_groups_and_zero_blocks_removed(tiny):
    net = lora.create_network(1.0, 4, 1, None, tes(tiny), tiny.unet,
                              down_lr_weight="0,1,1,1,1,1,1,1,0.5", up_lr_weight="zeros+0.25")
    blocks = {lora.get_block_index(n) for n in net.module_names() if n.startswith("lora_unet")}
    assert 9 in blocks            # input_blocks_8 has weight 0.5
    groups = net.param_groups(None, 1e-4, 1e-3)
    by_desc = {g.description: g.lr for g in groups}
    assert by_desc["unet_block9"] == pytest.approx(0.5e-4)
    assert by_desc["unet_block14"] == pytest.approx(0.25e-4)
    assert by_desc["textencoder"] == 1e-3
