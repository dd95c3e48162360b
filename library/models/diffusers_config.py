"""config.json contents for writing a diffusers-format SDXL folder from one of our configs.

Only what diffusers and transformers need to rebuild the same models; the field names are
theirs (for example diffusers' `attention_head_dim`, which for SDXL holds the number of heads).
"""

from library.models.config import SDXLConfig

DIFFUSERS_VERSION = "0.35.2"
TRANSFORMERS_VERSION = "4.57.1"


def _unet(cfg):
    u = cfg.unet
    down = ["DownBlock2D" if not d else "CrossAttnDownBlock2D" for d in u.transformer_depth]
    up = ["UpBlock2D" if not d else "CrossAttnUpBlock2D" for d in reversed(u.transformer_depth)]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": 128, "in_channels": u.in_channels, "out_channels": u.out_channels,
        "down_block_types": down, "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(u.level_channels), "layers_per_block": u.num_res_blocks,
        "transformer_layers_per_block": [max(d, 1) for d in u.transformer_depth],
        "attention_head_dim": [c // u.num_head_channels for c in u.level_channels],
        "cross_attention_dim": u.context_dim, "use_linear_projection": True,
        "norm_num_groups": u.norm_groups, "norm_eps": 1e-5,
        "addition_embed_type": "text_time", "addition_time_embed_dim": u.size_embed_dim,
        "projection_class_embeddings_input_dim": u.adm_in_channels,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "center_input_sample": False,
        "upcast_attention": False, "num_class_embeds": None, "class_embed_type": None,
        "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
        "downsample_padding": 1, "mid_block_scale_factor": 1, "dual_cross_attention": False,
        "only_cross_attention": False,
    }


def _vae(cfg):
    v = cfg.vae
    n = len(v.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": v.in_channels, "out_channels": v.out_channels,
        "latent_channels": v.latent_channels,
        "block_out_channels": [v.ch * m for m in v.ch_mult], "layers_per_block": v.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "norm_num_groups": v.norm_groups, "act_fn": "silu", "sample_size": 1024,
        "scaling_factor": v.scaling_factor, "force_upcast": True,
    }


def _clip(c, with_projection):
    out = {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "transformers_version": TRANSFORMERS_VERSION,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "max_position_embeddings": c.max_positions,
        "hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps,
        "bos_token_id": 49406, "eos_token_id": c.eos_token_id, "pad_token_id": 1,
        "torch_dtype": "float32",
    }
    out["projection_dim"] = c.projection_dim or c.hidden_size
    return out


def component_configs(cfg: SDXLConfig):
    """{component: config dict} plus "model_index" for the folder's model_index.json."""
    return {
        "unet": _unet(cfg), "vae": _vae(cfg),
        "text_encoder1": _clip(cfg.text_encoder1, False),
        "text_encoder2": _clip(cfg.text_encoder2, True),
        "model_index": {
            "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        },
    }
