"""SDXL conditioning as kohya trains it: the text context, the pooled text vector and the
size-conditioning vector `y` the UNet takes.

Text: TE1's penultimate hidden state (kohya's `hidden_states[11]` of 12 layers) and TE2's
penultimate hidden state, both without the final layer norm, concatenated on the channel axis;
pooled = TE2's final-normed state at the first EOS of the first chunk, through text_projection.
With --max_token_length the n chunks of 77 are merged back to 75n + 2 positions: chunk 0's BOS,
75 tokens of each chunk, and the last position of the last chunk.
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from library import layers


def merge_chunks(hidden, n_chunks):
    """(B*n, 77, C) -> (B, 75n + 2, C); a single chunk stays (B, 77, C)."""
    b = hidden.shape[0] // n_chunks
    hidden = hidden.reshape(b, n_chunks * 77, hidden.shape[-1])
    if n_chunks == 1:
        return hidden
    pieces = [hidden[:, :1]] + [hidden[:, 77 * k + 1:77 * k + 76] for k in range(n_chunks)]
    return ops.cat(pieces + [hidden[:, -1:]], axis=1)


def encode_ids(text_encoder1, text_encoder2, ids1, ids2, token_weights1=None, token_weights2=None):
    """The tensor part of `encode_text`, usable inside a compiled graph: ids (B, n, 77) int32
    tensors, optional per-position weights (B, L) already merged by `merge_weights`."""
    b, n = ids1.shape[:2]
    _, _, hidden1 = text_encoder1(ids1.reshape(b * n, 77))
    _, pooled, hidden2 = text_encoder2(ids2.reshape(b * n, 77))
    hidden1, hidden2 = merge_chunks(hidden1[-2], n), merge_chunks(hidden2[-2], n)
    if token_weights1 is not None:
        hidden1 = hidden1 * token_weights1[:, :, None].astype(hidden1.dtype)
    if token_weights2 is not None:
        hidden2 = hidden2 * token_weights2[:, :, None].astype(hidden2.dtype)
    context = ops.cat([hidden1, hidden2], axis=-1)
    return context, pooled.reshape(b, n, -1)[:, 0]


def encode_text(text_encoder1, text_encoder2, ids1, ids2, weights1=None, weights2=None):
    """ids (B, n, 77) from `library.text.tokenize_chunks` -> (context (B, L, C1 + C2), pooled
    (B, P)), L = 77 or 75n + 2.

    With --weighted_captions, `weights1`/`weights2` (B, n, 77) from `library.text.tokenize_weighted`
    scale each encoder's hidden states position by position, as kohya's training does
    (encode_tokens_with_weights): no re-normalisation of the mean (that is the generator's rule),
    and the pooled vector is not weighted.
    """
    def merged(weights):
        return None if weights is None else Tensor(merge_weights(weights))

    return encode_ids(text_encoder1, text_encoder2, Tensor(np.asarray(ids1, np.int32)),
                      Tensor(np.asarray(ids2, np.int32)), merged(weights1), merged(weights2))


def merge_weights(weights):
    """Per-token weights (B, n, 77) -> (B, L) matching `merge_chunks`: one chunk as is; n chunks
    as 1.0, the 75 inner weights of each chunk, 1.0 (kohya's slices [75k+1 : 75k+76])."""
    weights = np.asarray(weights, np.float32)
    b, n = weights.shape[:2]
    if n == 1:
        return weights[:, 0]
    ones = np.ones((b, 1), np.float32)
    return np.concatenate([ones, weights[:, :, 1:76].reshape(b, 75 * n), ones], axis=1)


def size_embedding(original_size_hw, crop_top_left, target_size_hw, dim):
    """SDXL's size conditioning: six scalars, each a `dim`-wide sinusoid (cos first), in the order
    original (h, w), crop (top, left), target (h, w). Inputs are (B, 2) tensors."""
    sizes = ops.cat([original_size_hw, crop_top_left, target_size_hw], axis=1).astype(ms.float32)
    b = sizes.shape[0]
    return layers.timestep_embedding(sizes.reshape(-1), dim).reshape(b, 6 * dim)


def vector_condition(pooled, original_size_hw, crop_top_left, target_size_hw, size_embed_dim):
    """The UNet's `y`: pooled text (B, P) followed by the size embedding (B, 6 * dim)."""
    emb = size_embedding(original_size_hw, crop_top_left, target_size_hw, size_embed_dim)
    return ops.cat([pooled.astype(emb.dtype), emb], axis=1)
