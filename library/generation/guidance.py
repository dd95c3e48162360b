"""The UNet step the pipeline compiles: classifier-free guidance as one Cell (both halves in one
2B UNet call), the plain step for a scale of 1, and the open input signature that lets one graph
serve every batch, latent size and prompt length."""


def step_cells(unet):
    """(guided, plain) UNet step Cells: the first for classifier-free guidance (2B context rows),
    the second for B rows (a scale of 1). Two Cells rather than a branch on the batch sizes: a
    graph with an open batch size cannot branch on it."""
    import mindspore as ms
    from mindspore import nn, ops

    class PlainUNet(nn.Cell):
        """eps for B latents with B context rows."""

        def __init__(self, unet):
            # auto_prefix=False keeps the UNet's parameter names: with a prefix MindSpore would
            # rename them (to "unet.…"), which renames the LoRA parameters of a training run
            # that samples with the models it trains.
            super().__init__(auto_prefix=False)
            self.unet = unet

        def construct(self, x, t, context, y):
            return self.unet(x, t, context, y)

    class GuidedUNet(PlainUNet):
        """eps for B latents with 2B context rows: the unconditional (first B) and conditional
        halves run in one UNet call and are combined with the per-row guidance scale."""

        def __init__(self, unet):
            super().__init__(unet)
            self.halves = ops.Split(axis=0, output_num=2)

        def construct(self, x, t, context, y, scale):
            out = self.unet(ops.cat([x, x], axis=0), t, context, y)
            # the Split primitive: ops.chunk checks the (open) batch size in Python
            uncond, cond = self.halves(out)
            return uncond + scale.astype(out.dtype) * (cond - uncond)

    cells = GuidedUNet(unet), PlainUNet(unet)
    for cell in cells:
        cell.set_train(False)
    return cells, ms


def open_signature(tensors):
    """Shape-only tensors with every axis open but the last of the 2-D ones and the channels of
    the 4-D ones: one graph for every batch, latent size and prompt length."""
    from mindspore import Tensor
    signature = []
    for x in tensors:
        shape = [None] * x.ndim
        if x.ndim == 2:
            shape[1] = x.shape[1]           # y: pooled + size embedding width
        elif x.ndim == 3:
            shape[2] = x.shape[2]           # context: the embedding width
        elif x.ndim == 4 and x.shape[1] != 1:
            shape[1] = x.shape[1]           # latents: 4 channels (scale is (B, 1, 1, 1))
        elif x.ndim == 4:
            shape[1:] = [1, 1, 1]
        signature.append(Tensor(shape=shape, dtype=x.dtype))
    return signature


def param_dtype(cell):
    for p in cell.get_parameters():
        return p.dtype
    raise ValueError("model without parameters")
