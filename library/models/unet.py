"""The SDXL UNet with the original (SGM) module names.

`input_blocks.4.1.transformer_blocks.0.attn1.to_q` here is `model.diffusion_model.input_blocks.4.1.
transformer_blocks.0.attn1.to_q` in the single-file checkpoint and `lora_unet_input_blocks_4_1_...`
in a kohya LoRA, so neither loading nor LoRA naming needs a lookup table.

Called as kohya's: `unet(x, timesteps, context, y)`.
"""

from mindspore import nn, ops

from library import layers
from library.models.config import UNetConfig


class ResBlock(nn.Cell):
    def __init__(self, in_ch, out_ch, emb_dim, groups):
        super().__init__()
        # SequentialCell keeps the SGM indices (in_layers.2, out_layers.3) as parameter names.
        self.in_layers = nn.SequentialCell([layers.GroupNorm(groups, in_ch), nn.SiLU(),
                                            layers.Conv2d(in_ch, out_ch, 3, padding=1)])
        self.emb_layers = nn.SequentialCell([nn.SiLU(), layers.Linear(emb_dim, out_ch)])
        self.out_layers = nn.SequentialCell([layers.GroupNorm(groups, out_ch), nn.SiLU(),
                                             nn.Identity(),
                                             layers.Conv2d(out_ch, out_ch, 3, padding=1)])
        self.has_skip = in_ch != out_ch
        if self.has_skip:
            self.skip_connection = layers.Conv2d(in_ch, out_ch, 1)

    def construct(self, x, emb, context=None):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).astype(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        skip = self.skip_connection(x) if self.has_skip else x
        return layers.add(skip, h)


class Downsample(nn.Cell):
    def __init__(self, ch):
        super().__init__()
        self.op = layers.Conv2d(ch, ch, 3, stride=2, padding=1)

    def construct(self, x, emb=None, context=None):
        return self.op(x)


class Upsample(nn.Cell):
    def __init__(self, ch):
        super().__init__()
        self.conv = layers.Conv2d(ch, ch, 3, padding=1)

    def construct(self, x, emb=None, context=None):
        return self.conv(layers.upsample_nearest_2x(x))


class CrossAttention(nn.Cell):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.attention = layers.Attention(heads)
        self.to_q = layers.Linear(dim, dim, bias=False)
        self.to_k = layers.Linear(context_dim, dim, bias=False)
        self.to_v = layers.Linear(context_dim, dim, bias=False)
        self.to_out = nn.SequentialCell([layers.Linear(dim, dim)])

    def construct(self, x, context, batch):
        out = self.attention(self.to_q(x), self.to_k(context), self.to_v(context), batch)
        return self.to_out(out)


class GEGLU(nn.Cell):
    def __init__(self, dim, inner):
        super().__init__()
        self.inner = inner
        self.proj = layers.Linear(dim, inner * 2)

    def construct(self, x):
        h = self.proj(x)
        # Slicing, not chunk: the Chunk primitive has no CPU kernel under graph mode.
        return layers.mul(h[..., : self.inner], layers.gelu(h[..., self.inner:]))


class FeedForward(nn.Cell):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.SequentialCell([GEGLU(dim, dim * 4), nn.Identity(),
                                      layers.Linear(dim * 4, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = layers.LayerNorm(dim)
        self.norm2 = layers.LayerNorm(dim)
        self.norm3 = layers.LayerNorm(dim)

    def construct(self, x, context, batch):
        h = self.norm1(x)
        x = layers.add(self.attn1(h, h, batch), x)
        x = layers.add(self.attn2(self.norm2(x), context, batch), x)
        return layers.add(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Cell):
    """GroupNorm, proj_in, the transformer blocks, proj_out, plus the input.

    The tokens go through the blocks as rows, (B*H*W, C), and the context as (B*77, C'), so that
    every Linear has a 2-D input: with open shapes (the trainer's one dynamic graph) a 2-D Linear
    runs as its MatMul alone, while a (B, L, C) one adds Shape, ShapeCalc and Reshape kernels at
    each call (about 2,000 launches of a tiny UNet step). Only attention needs the sample
    boundaries, so the blocks get the batch size. kohya's rank dropout draws its mask per sample
    over (B, L, r) activations: a network with rank dropout sets `token_rows` False, and the
    tokens keep that layout.
    """

    token_rows = True

    def __init__(self, ch, context_dim, heads, depth, groups):
        super().__init__()
        self.norm = layers.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = layers.Linear(ch, ch)
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(ch, context_dim, heads) for _ in range(depth)])
        self.proj_out = layers.Linear(ch, ch)

    def construct(self, x, emb, context):
        b, c, h, w = x.shape
        t = self.norm(x).transpose(0, 2, 3, 1)
        if self.token_rows:
            t, context = t.reshape(-1, c), context.reshape(-1, context.shape[-1])
        else:
            t = t.reshape(b, h * w, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context, b)
        t = self.proj_out(t)
        return layers.add(t.reshape(b, h, w, c).transpose(0, 3, 1, 2), x)


class ConvIn(layers.Conv2d):
    """input_blocks.0.0: a plain conv that takes the block call signature."""

    def __init__(self, in_ch, out_ch):
        super().__init__(in_ch, out_ch, 3, padding=1)

    def construct(self, x, emb=None, context=None):
        return super().construct(x)


class TimestepBlock(nn.SequentialCell):
    """One numbered entry of input_blocks / output_blocks / middle_block. Its cells keep their
    SGM indices as names (`input_blocks.4.1`) and all take (x, emb, context)."""

    def construct(self, x, emb, context):
        for cell in self.cell_list:
            x = cell(x, emb, context)
        return x


class SDXLUNet(nn.Cell):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch0, ted, groups = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups
        self.time_embed = nn.SequentialCell([layers.Linear(ch0, ted), nn.SiLU(),
                                             layers.Linear(ted, ted)])
        self.label_emb = nn.SequentialCell([nn.SequentialCell(
            [layers.Linear(cfg.adm_in_channels, ted), nn.SiLU(), layers.Linear(ted, ted)])])

        def transformer(ch, depth):
            return SpatialTransformer(ch, cfg.context_dim, ch // cfg.num_head_channels, depth,
                                      groups)

        inputs = [TimestepBlock([ConvIn(cfg.in_channels, ch0)])]
        skip_channels = [ch0]
        ch = ch0
        n_levels = len(cfg.channel_mult)
        for level, out_ch in enumerate(cfg.level_channels):
            depth = cfg.transformer_depth[level]
            for _ in range(cfg.num_res_blocks):
                cells = [ResBlock(ch, out_ch, ted, groups)]
                ch = out_ch
                if depth:
                    cells.append(transformer(ch, depth))
                inputs.append(TimestepBlock(cells))
                skip_channels.append(ch)
            if level != n_levels - 1:
                inputs.append(TimestepBlock([Downsample(ch)]))
                skip_channels.append(ch)
        self.input_blocks = nn.CellList(inputs)

        self.middle_block = TimestepBlock([ResBlock(ch, ch, ted, groups),
                                           transformer(ch, cfg.transformer_depth[-1]),
                                           ResBlock(ch, ch, ted, groups)])

        outputs = []
        for level in reversed(range(n_levels)):
            out_ch = cfg.level_channels[level]
            depth = cfg.transformer_depth[level]
            for i in range(cfg.num_res_blocks + 1):
                cells = [ResBlock(ch + skip_channels.pop(), out_ch, ted, groups)]
                ch = out_ch
                if depth:
                    cells.append(transformer(ch, depth))
                if level and i == cfg.num_res_blocks:
                    cells.append(Upsample(ch))
                outputs.append(TimestepBlock(cells))
        self.output_blocks = nn.CellList(outputs)

        self.out = nn.SequentialCell([layers.GroupNorm(groups, ch), nn.SiLU(),
                                      layers.Conv2d(ch, cfg.out_channels, 3, padding=1)])

    def enable_gradient_checkpointing(self):
        """Recompute every ResBlock, transformer block and resampler in the backward pass."""
        kinds = (ResBlock, BasicTransformerBlock, Downsample, Upsample)
        layers.enable_recompute([c for _, c in self.cells_and_names() if isinstance(c, kinds)])

    def construct(self, x, timesteps, context, y):
        t_emb = layers.timestep_embedding(timesteps, self.cfg.model_channels).astype(x.dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.astype(x.dtype))
        context = context.astype(x.dtype)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        # Indexing, not list.pop(): pop() does not survive graph compilation.
        n = len(skips)
        for i, block in enumerate(self.output_blocks):
            h = block(ops.cat([h, skips[n - 1 - i]], axis=1), emb, context)
        return self.out(h).astype(x.dtype)
