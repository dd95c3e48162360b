"""SDXL's AutoencoderKL with the original LDM module names (`encoder.down.0.block.1.conv1`), the
names the single-file checkpoint uses under `first_stage_model.`.

`encode(image)` returns the Gaussian moments (mean and log-variance, 2 x latent channels);
`decode(latent)` returns the image. Scaling by `scaling_factor` (0.13025 for SDXL) is the
caller's job, as in kohya.
"""

from mindspore import nn, ops

from library import layers
from library.models.config import VAEConfig


def _norm(groups, ch):
    return layers.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Cell):
    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = _norm(groups, in_ch)
        self.conv1 = layers.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(groups, out_ch)
        self.conv2 = layers.Conv2d(out_ch, out_ch, 3, padding=1)
        self.has_shortcut = in_ch != out_ch
        if self.has_shortcut:
            self.nin_shortcut = layers.Conv2d(in_ch, out_ch, 1)

    def construct(self, x):
        h = self.conv1(layers.silu(self.norm1(x)))
        h = self.conv2(layers.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.has_shortcut else x) + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over pixels; q/k/v/proj_out are 1x1 convs as in the file."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = _norm(groups, ch)
        self.q = layers.Conv2d(ch, ch, 1)
        self.k = layers.Conv2d(ch, ch, 1)
        self.v = layers.Conv2d(ch, ch, 1)
        self.proj_out = layers.Conv2d(ch, ch, 1)

    def construct(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t):
            return t.reshape(b, c, h * w).transpose(0, 2, 1)

        out = layers.math_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)), 1)
        return x + self.proj_out(out.transpose(0, 2, 1).reshape(b, c, h, w))


class Downsample(nn.Cell):
    def __init__(self, ch):
        super().__init__()
        # LDM pads only bottom and right before a stride-2 conv without padding.
        self.conv = layers.Conv2d(ch, ch, 3, stride=2, padding=(0, 1, 0, 1))

    def construct(self, x):
        return self.conv(x)


class Upsample(nn.Cell):
    def __init__(self, ch):
        super().__init__()
        self.conv = layers.Conv2d(ch, ch, 3, padding=1)

    def construct(self, x):
        return self.conv(layers.upsample_nearest_2x(x))


class DownLevel(nn.Cell):
    """One encoder resolution level: `block.N` resnets, then an optional `downsample`."""

    def __init__(self, blocks, downsample=None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.has_resample = downsample is not None
        if self.has_resample:
            self.downsample = downsample

    def construct(self, x):
        for blk in self.block:
            x = blk(x)
        return self.downsample(x) if self.has_resample else x


class UpLevel(nn.Cell):
    """One decoder resolution level: `block.N` resnets, then an optional `upsample`."""

    def __init__(self, blocks, upsample=None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.has_resample = upsample is not None
        if self.has_resample:
            self.upsample = upsample

    def construct(self, x):
        for blk in self.block:
            x = blk(x)
        return self.upsample(x) if self.has_resample else x


class Mid(nn.Cell):
    def __init__(self, ch, groups):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def construct(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Cell):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = layers.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        down, ch = [], cfg.ch
        for i, out_ch in enumerate(chans):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, out_ch, g))
                ch = out_ch
            last = i == len(chans) - 1
            down.append(DownLevel(blocks, None if last else Downsample(ch)))
        self.down = nn.CellList(down)
        self.mid = Mid(ch, g)
        self.norm_out = _norm(g, ch)
        self.conv_out = layers.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(layers.silu(self.norm_out(h)))


class Decoder(nn.Cell):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        chans = [cfg.ch * m for m in cfg.ch_mult]
        ch = chans[-1]
        self.conv_in = layers.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = Mid(ch, g)
        # `up` is indexed by level (0 = full resolution) but run from the deepest level up.
        up = [None] * len(chans)
        for i in reversed(range(len(chans))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, chans[i], g))
                ch = chans[i]
            up[i] = UpLevel(blocks, Upsample(ch) if i else None)
        self.up = nn.CellList(up)
        self.norm_out = _norm(g, ch)
        self.conv_out = layers.Conv2d(ch, cfg.out_channels, 3, padding=1)
        self.n_levels = len(chans)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for i in range(self.n_levels - 1, -1, -1):
            h = self.up[i](h)
        return self.conv_out(layers.silu(self.norm_out(h)))


class AutoencoderKL(nn.Cell):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = layers.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = layers.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def enable_gradient_checkpointing(self):
        cells = [c for _, c in self.cells_and_names() if isinstance(c, (ResnetBlock, AttnBlock))]
        layers.enable_recompute(cells)

    def encode(self, image):
        return self.quant_conv(self.encoder(image))

    def decode(self, latent):
        return self.decoder(self.post_quant_conv(latent))

    def sample_latent(self, moments, noise):
        """A draw from the encoded Gaussian (kohya caches one sample, not the mean)."""
        mean, logvar = ops.split(moments, moments.shape[1] // 2, axis=1)
        std = ops.exp(0.5 * ops.clamp(logvar, -30.0, 20.0))
        return mean + std * noise.astype(mean.dtype)

    def construct(self, image):
        return self.encode(image)
