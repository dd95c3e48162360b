"""CLIP text encoders with Hugging Face module names (`text_model.encoder.layers.0.self_attn.q_proj`).

TE1 is CLIP ViT-L/14's text tower (quick_gelu); TE2 is OpenCLIP ViT-bigG's (gelu) with a
`text_projection`. Both are this one class, configured. The forward returns what SDXL needs:
the last hidden state (after the final layer norm), the pooled output (projected when the model
has a projection) and every hidden state (the embeddings, then each layer's output).
"""

import mindspore as ms
from mindspore import nn, ops

from library import layers
from library.models.config import CLIPTextConfig


class CLIPAttention(nn.Cell):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = layers.Linear(dim, dim)
        self.k_proj = layers.Linear(dim, dim)
        self.v_proj = layers.Linear(dim, dim)
        self.out_proj = layers.Linear(dim, dim)

    def construct(self, x, mask):
        out = layers.math_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads,
                                    mask)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, dim, inner, act):
        super().__init__()
        self.act = layers.ACTIVATIONS[act]
        self.fc1 = layers.Linear(dim, inner)
        self.fc2 = layers.Linear(inner, dim)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm1 = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def construct(self, x, mask):
        x = layers.add(x, self.self_attn(self.layer_norm1(x), mask))
        return layers.add(x, self.mlp(self.layer_norm2(x)))


class CLIPEmbeddings(nn.Cell):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = layers.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = layers.Embedding(cfg.max_positions, cfg.hidden_size)

    def construct(self, input_ids):
        length = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length][None]


class CLIPEncoder(nn.Cell):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers)])


class CLIPTextTransformer(nn.Cell):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)


class CLIPTextModel(nn.Cell):
    """`model(input_ids)` → (last_hidden_state, pooled, hidden_states).

    pooled is the final-normed state at the first EOS token of each row (Hugging Face's rule for
    configs with a real eos_token_id; kohya's `argmax(ids == eos)`), then text_projection if any.
    """

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.has_projection = cfg.projection_dim > 0
        if self.has_projection:
            self.text_projection = layers.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        self.mask = layers.causal_mask(cfg.max_positions)

    def enable_gradient_checkpointing(self):
        layers.enable_recompute(list(self.text_model.encoder.layers))

    def construct(self, input_ids):
        length = input_ids.shape[1]
        mask = self.mask[:, :, :length, :length]
        h = self.text_model.embeddings(input_ids)
        hidden_states = (h,)
        for layer in self.text_model.encoder.layers:
            h = layer(h, mask)
            hidden_states = hidden_states + (h,)
        last = self.text_model.final_layer_norm(h)
        eos_index = ops.argmax((input_ids == self.cfg.eos_token_id).astype(ms.float32), -1)
        pick = ops.one_hot(eos_index, length, ops.ones((), last.dtype), ops.zeros((), last.dtype))
        pooled = (last * pick[:, :, None]).sum(1)
        if self.has_projection:
            pooled = self.text_projection(pooled)
        return last, pooled, hidden_states
