"""Model configurations: the SDXL base preset and two smaller presets of the same topology
(tiny, for tests and the demo; medium, for the benches).

Plain values only (no MindSpore import), so tools and tests can reason about shapes cheaply.
The field names follow the SGM/LDM configs that the single-file checkpoint was trained with.
"""

from dataclasses import dataclass, field, asdict


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple = (0, 2, 10)  # per level; the middle block uses the last level's depth
    num_head_channels: int = 64
    context_dim: int = 2048                # TE1 hidden + TE2 hidden
    adm_in_channels: int = 2816            # pooled TE2 output + 6 size embeddings
    size_embed_dim: int = 256              # each of the 6 size-conditioning scalars
    norm_groups: int = 32

    @property
    def time_embed_dim(self):
        return self.model_channels * 4

    @property
    def level_channels(self):
        return tuple(self.model_channels * m for m in self.channel_mult)


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 0                # 0: no text_projection (TE1)
    eos_token_id: int = 49407


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.13025

    @property
    def downscale(self):
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class SDXLConfig:
    name: str
    unet: UNetConfig
    text_encoder1: CLIPTextConfig
    text_encoder2: CLIPTextConfig
    vae: VAEConfig = field(default_factory=VAEConfig)

    def to_dict(self):
        return asdict(self)


SDXL_BASE = SDXLConfig(
    name="sdxl_base",
    unet=UNetConfig(),
    text_encoder1=CLIPTextConfig(),
    text_encoder2=CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_layers=32,
                                 num_heads=20, hidden_act="gelu", projection_dim=1280),
    vae=VAEConfig(),
)

# Same topology as SDXL base (three levels, no attention at level 0, a 1x1 skip wherever the
# channel count changes, two transformer blocks at the last level and in the middle), small enough
# that a train step runs on CPU in well under a second. The VAE keeps four levels so latents are
# 1/8 of the image size, as in SDXL.
TINY = SDXLConfig(
    name="tiny",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 3), transformer_depth=(0, 1, 2),
                    num_head_channels=16, context_dim=64, adm_in_channels=32 + 6 * 16,
                    size_embed_dim=16),
    text_encoder1=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4),
    text_encoder2=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                                 hidden_act="gelu", projection_dim=32),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
)

# SDXL base's topology (levels, depths 0/2/10, heads of 64 -> 16 channels per head at a quarter
# of the width) at a quarter of its width: model_channels 80, so 5/10/20 heads per level. Text
# encoders at a quarter width with SDXL's layer counts. Random weights only (no checkpoint): the
# benches use it to measure speed and memory at a realistic depth without SDXL's 10 GiB.
MEDIUM = SDXLConfig(
    name="medium",
    unet=UNetConfig(model_channels=80, num_head_channels=16, context_dim=512,
                    adm_in_channels=320 + 6 * 64, size_embed_dim=64, norm_groups=16),
    text_encoder1=CLIPTextConfig(hidden_size=192, intermediate_size=768, num_heads=3),
    text_encoder2=CLIPTextConfig(hidden_size=320, intermediate_size=1280, num_layers=32,
                                 num_heads=5, hidden_act="gelu", projection_dim=320),
    vae=VAEConfig(ch=32, norm_groups=16),
)

# a checkpoint's preset is found by its conv_in and label_emb shapes, which differ between these
PRESETS = {c.name: c for c in (SDXL_BASE, TINY, MEDIUM)}


def get_preset(name):
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
