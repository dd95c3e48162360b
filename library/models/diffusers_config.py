"""The non-weight files of a diffusers-format SDXL folder, made from one of our configs.

The JSON contents are what diffusers 0.35.2 / transformers 4.57.1 write for the same models
(checked field by field against a folder saved by diffusers itself, in
tests/fixtures/tiny_diffusers_manifest.json), so `StableDiffusionXLPipeline.from_pretrained`
accepts a folder we write. Field names are theirs: diffusers' `attention_head_dim`, for SDXL,
holds the number of heads.
"""

from library.models.config import SDXLConfig

DIFFUSERS_VERSION = "0.35.2"
TRANSFORMERS_VERSION = "4.57.1"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _unet(cfg):
    u = cfg.unet
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": u.size_embed_dim,
        "attention_head_dim": [c // u.num_head_channels for c in u.level_channels],
        "attention_type": "default", "block_out_channels": list(u.level_channels),
        "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
        "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": u.context_dim,
        "cross_attention_norm": None,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D"
                             for d in u.transformer_depth],
        "downsample_padding": 1, "dropout": 0.0, "dual_cross_attention": False,
        "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": u.in_channels, "layers_per_block": u.num_res_blocks,
        "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
        "norm_num_groups": u.norm_groups, "num_attention_heads": None, "num_class_embeds": None,
        "only_cross_attention": False, "out_channels": u.out_channels,
        "projection_class_embeddings_input_dim": u.adm_in_channels,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default", "reverse_transformer_layers_per_block": None,
        "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None,
        "time_embedding_dim": None, "time_embedding_type": "positional",
        "timestep_post_act": None, "transformer_layers_per_block": list(u.transformer_depth),
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D"
                           for d in reversed(u.transformer_depth)],
        "upcast_attention": False, "use_linear_projection": True,
    }


def _vae(cfg):
    v = cfg.vae
    n = len(v.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": [v.ch * m for m in v.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n, "force_upcast": True,
        "in_channels": v.in_channels, "latent_channels": v.latent_channels,
        "latents_mean": None, "latents_std": None, "layers_per_block": v.num_res_blocks,
        "mid_block_add_attention": True, "norm_num_groups": v.norm_groups,
        "out_channels": v.out_channels, "sample_size": 1024, "scaling_factor": v.scaling_factor,
        "shift_factor": None, "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": True, "use_quant_conv": True,
    }


def _clip(c, with_projection, pad_token_id):
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "attention_dropout": 0.0, "bos_token_id": 49406, "dtype": "float32",
        "eos_token_id": c.eos_token_id, "hidden_act": c.hidden_act, "hidden_size": c.hidden_size,
        "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size, "layer_norm_eps": c.layer_norm_eps,
        "max_position_embeddings": c.max_positions, "model_type": "clip_text_model",
        "num_attention_heads": c.num_heads, "num_hidden_layers": c.num_layers,
        "pad_token_id": pad_token_id, "projection_dim": c.projection_dim or c.hidden_size,
        "transformers_version": TRANSFORMERS_VERSION, "vocab_size": c.vocab_size,
    }


def _special(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def tokenizer_files(pad_token):
    """{file name: JSON} of a CLIPTokenizer folder (vocab.json and merges.txt are copied)."""
    added = {"49406": dict(_special(BOS), special=True), "49407": dict(_special(EOS), special=True)}
    if pad_token == "!":   # tokenizer 2: "!" (id 0) becomes a special token when used as padding
        added = {"0": dict(_special("!"), normalized=False, special=True), **added}
    return {
        "special_tokens_map.json": {"bos_token": _special(BOS), "eos_token": _special(EOS),
                                    "pad_token": pad_token, "unk_token": _special(EOS)},
        "tokenizer_config.json": {
            "added_tokens_decoder": added,
            "bos_token": BOS, "clean_up_tokenization_spaces": False, "eos_token": EOS,
            "errors": "replace", "extra_special_tokens": {}, "model_max_length": 77,
            "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer", "unk_token": EOS},
    }


SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "final_sigmas_type": "zero", "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sigma_max": None,
    "sigma_min": None, "steps_offset": 1, "timestep_spacing": "leading",
    "timestep_type": "discrete", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True,
    "image_encoder": [None, None], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def component_configs(cfg: SDXLConfig):
    """{component: config.json content} for the four weight-carrying components."""
    return {"unet": _unet(cfg), "vae": _vae(cfg),
            "text_encoder1": _clip(cfg.text_encoder1, False, pad_token_id=49407),
            "text_encoder2": _clip(cfg.text_encoder2, True, pad_token_id=0)}
