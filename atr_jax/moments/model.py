"""QD-DETR for audio moment retrieval (AM-DETR, SPEC 12) in Flax linen: frame and token features in, per-query
windows, foreground logits and per-frame saliency out. Sizes come from `config.moments.model`.

- Input projections: audio frames (T, D + 2) and text tokens (L, D) each through `num_input_layers` of (LayerNorm,
  dropout `input_dropout`, Dense to d; ReLU between layers).
- Encoder: `num_cross_layers` post-norm layers in which the frames (plus a sine position embedding of their place in
  the recording) attend to the text tokens; then a learned global token (with a learned position) joins the frames
  for `num_encoder_layers` self-attention layers.
- Saliency per frame: <W1 frame, W2 global> / sqrt(d). With `negative=True` the encoder also runs with the text
  batch shifted by one (query i+1 for recording i) and returns that saliency too (the mismatched-query term).
- Decoder (DAB style): `num_queries` learnable anchors (centre, width), sigmoid space. Each layer: a position query
  from the anchors' sine embedding (MLP), self-attention between queries, conditional cross-attention to the frames
  (each head's query and key are its content part concatenated with its position part: the anchor centre's sine
  embedding, scaled by an MLP of the content after the first layer and by the ratio of a predicted reference width to
  the anchor's width, against the frames' sine positions), FFN. After each layer the shared span MLP refines the
  anchors: span = sigmoid(MLP(h) + logit(anchor)), and the next layer's anchors are those spans without gradient.
- Heads on each decoder layer's (LayerNorm-ed) output: 2-way logits (index 0 = foreground) and the span.

Every attention masks every padded key (frames and tokens; the upstream bug that only blocked padding-to-padding
pairs is not reproduced), so a padded batch gives the valid positions the same outputs as an unpadded one. Spans are
(centre, width) as fractions of the valid frames' duration. Parameters are float32; `dtype` "bfloat16" computes in
bfloat16 with softmaxes and outputs in float32.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict):
  if config.dtype not in DTYPES:
    raise ValueError(f"moments.model.dtype={config.dtype!r} is not one of {tuple(DTYPES)}")
  return DTYPES[config.dtype]


def sine_embedding(x: jax.Array, dim: int) -> jax.Array:
  """(...,) values in [0, 1] -> (..., dim): sin/cos pairs of 2 pi x at frequencies 10000^(-2i/dim)."""
  frequencies = 10000.0 ** (-jnp.arange(dim // 2, dtype=jnp.float32) * 2 / dim)
  angles = 2 * math.pi * x[..., None].astype(jnp.float32) * frequencies
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], -1).reshape(*x.shape, dim)


def frame_positions(mask: jax.Array) -> jax.Array:
  """(B, T) mask -> (B, T) centre of each frame as a fraction of the valid frames' duration."""
  count = jnp.maximum(mask.sum(-1, keepdims=True), 1).astype(jnp.float32)
  return (jnp.arange(mask.shape[-1], dtype=jnp.float32) + 0.5) / count


def inverse_sigmoid(x: jax.Array, eps: float = 1e-3) -> jax.Array:
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))


class Mlp(nn.Module):
  """Dense layers with ReLU between them; the last has `out_dim` features."""

  hidden_dim: int
  out_dim: int
  num_layers: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers - 1):
      x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"dense_{i}")(x))
    return nn.Dense(self.out_dim, dtype=self.dtype, name=f"dense_{self.num_layers - 1}")(x)


class InputProjection(nn.Module):
  config: ml_collections.ConfigDict
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    layers = self.config.num_input_layers
    for i in range(layers):
      x = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(x)
      x = nn.Dropout(self.config.input_dropout)(x, deterministic=not train)
      x = nn.Dense(self.config.hidden_dim, dtype=self.dtype, name=f"dense_{i}")(x)
      if i < layers - 1:
        x = nn.relu(x)
    return x


class Attention(nn.Module):
  """Multi-head attention: query (B, N, d) over key/value (B, M, d) where `key_mask` (B, M) is True. With
  `query_pos`/`key_pos` each head's query/key is [content, position] (conditional cross-attention)."""

  config: ml_collections.ConfigDict
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, query, key, value, key_mask, train: bool, query_pos=None, key_pos=None):
    d, heads = self.config.hidden_dim, self.config.num_heads
    if d % heads:
      raise ValueError(f"moments.model.hidden_dim={d} is not divisible by moments.model.num_heads={heads}")

    def project(x, name):
      return nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(*x.shape[:-1], heads, d // heads)

    q, k, v = project(query, "query"), project(key, "key"), project(value, "value")
    if query_pos is not None:
      q = jnp.concatenate([q, project(query_pos, "query_pos")], -1)
      k = jnp.concatenate([k, project(key_pos, "key_pos")], -1)
    logits = jnp.einsum("bnhc,bmhc->bhnm", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = nn.Dropout(self.config.dropout)(jax.nn.softmax(logits, -1), deterministic=not train)
    out = jnp.einsum("bhnm,bmhc->bnhc", weights.astype(self.dtype), v).reshape(*query.shape[:-1], d)
    return nn.Dense(d, dtype=self.dtype, name="out")(out)


class FeedForward(nn.Module):
  config: ml_collections.ConfigDict
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(nn.Dense(self.config.ffn_dim, dtype=self.dtype, name="dense_0")(x))
    y = nn.Dropout(self.config.dropout)(y, deterministic=not train)
    return nn.Dense(self.config.hidden_dim, dtype=self.dtype, name="dense_1")(y)


class EncoderLayer(nn.Module):
  """Post-norm layer: x (+ x_pos) attends to `context` (+ `context_pos`), then an FFN."""

  config: ml_collections.ConfigDict
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, x_pos, context, context_pos, context_mask, train: bool):
    drop = nn.Dropout(self.config.dropout)
    key = context if context_pos is None else context + context_pos
    y = Attention(self.config, self.dtype, name="attention")(x + x_pos, key, context, context_mask, train)
    x = nn.LayerNorm(dtype=self.dtype, name="norm_0")(x + drop(y, deterministic=not train))
    y = FeedForward(self.config, self.dtype, name="ffn")(x, train)
    return nn.LayerNorm(dtype=self.dtype, name="norm_1")(x + drop(y, deterministic=not train))


class Encoder(nn.Module):
  """Frames attend to the text, then [global token, frames] self-attend. Returns (global (B, d), frames (B, T, d))."""

  config: ml_collections.ConfigDict
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, frames, frame_pos, frame_mask, tokens, token_mask, train: bool):
    for i in range(self.config.num_cross_layers):
      frames = EncoderLayer(self.config, self.dtype, name=f"cross_{i}")(
        frames, frame_pos, tokens, None, token_mask, train
      )
    d, batch = self.config.hidden_dim, frames.shape[0]
    init = nn.initializers.normal(1.0)
    token = jnp.broadcast_to(self.param("global_token", init, (1, 1, d)).astype(self.dtype), (batch, 1, d))
    token_pos = jnp.broadcast_to(self.param("global_pos", init, (1, 1, d)).astype(self.dtype), (batch, 1, d))
    x = jnp.concatenate([token, frames], 1)
    pos = jnp.concatenate([token_pos, frame_pos], 1)
    mask = jnp.concatenate([jnp.ones((batch, 1), bool), frame_mask], 1)
    for i in range(self.config.num_encoder_layers):
      x = EncoderLayer(self.config, self.dtype, name=f"self_{i}")(x, pos, x, pos, mask, train)
    return x[:, 0], x[:, 1:]


class DecoderLayer(nn.Module):
  config: ml_collections.ConfigDict
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, tgt, query_pos, query_sine, memory, memory_pos, memory_mask, first: bool, train: bool):
    drop = nn.Dropout(self.config.dropout)
    queries_mask = jnp.ones(tgt.shape[:2], bool)
    q = tgt + query_pos
    y = Attention(self.config, self.dtype, name="self_attention")(q, q, tgt, queries_mask, train)
    tgt = nn.LayerNorm(dtype=self.dtype, name="norm_0")(tgt + drop(y, deterministic=not train))
    query, key = (tgt + query_pos, memory + memory_pos) if first else (tgt, memory)
    y = Attention(self.config, self.dtype, name="cross_attention")(
      query, key, memory, memory_mask, train, query_pos=query_sine, key_pos=memory_pos
    )
    tgt = nn.LayerNorm(dtype=self.dtype, name="norm_1")(tgt + drop(y, deterministic=not train))
    y = FeedForward(self.config, self.dtype, name="ffn")(tgt, train)
    return nn.LayerNorm(dtype=self.dtype, name="norm_2")(tgt + drop(y, deterministic=not train))


class Decoder(nn.Module):
  """Returns logits (layers, B, Q, 2) and spans (layers, B, Q, 2) (centre, width), float32."""

  config: ml_collections.ConfigDict
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, memory, memory_pos, memory_mask, train: bool):
    d, batch, num_queries = self.config.hidden_dim, memory.shape[0], self.config.num_queries
    anchors = self.param("anchors", nn.initializers.normal(1.0), (num_queries, 2))
    reference = jnp.broadcast_to(jax.nn.sigmoid(anchors), (batch, num_queries, 2))
    tgt = jnp.zeros((batch, num_queries, d), self.dtype)
    position_head = Mlp(d, d, 2, self.dtype, name="position_head")
    scale_head = Mlp(d, d, 2, self.dtype, name="scale_head")
    width_head = Mlp(d, 1, 2, self.dtype, name="width_head")
    span_head = Mlp(d, 2, 3, self.dtype, name="span_head")
    class_head = nn.Dense(2, dtype=self.dtype, name="class_head")
    norm = nn.LayerNorm(dtype=self.dtype, name="norm")
    all_logits, all_spans = [], []
    for i in range(self.config.num_decoder_layers):
      centre, width = reference[..., 0], reference[..., 1]
      sine = jnp.concatenate([sine_embedding(centre, d // 2), sine_embedding(width, d // 2)], -1).astype(self.dtype)
      query_pos = position_head(sine)
      query_sine = sine_embedding(centre, d).astype(self.dtype)
      if i > 0:
        query_sine = query_sine * scale_head(tgt)
      reference_width = jax.nn.sigmoid(width_head(tgt).astype(jnp.float32))
      query_sine = query_sine * (reference_width / jnp.maximum(width[..., None], 1e-3)).astype(self.dtype)
      tgt = DecoderLayer(self.config, self.dtype, name=f"layer_{i}")(
        tgt, query_pos, query_sine, memory, memory_pos, memory_mask, i == 0, train
      )
      hidden = norm(tgt)
      spans = jax.nn.sigmoid(span_head(hidden).astype(jnp.float32) + inverse_sigmoid(reference))
      all_logits.append(class_head(hidden).astype(jnp.float32))
      all_spans.append(spans)
      reference = jax.lax.stop_gradient(spans)
    return jnp.stack(all_logits), jnp.stack(all_spans)


class MomentDETR(nn.Module):
  """`__call__(audio, audio_mask, text, text_mask, train=..., negative=...)` -> dict with "logits" and "spans"
  (num_decoder_layers, B, Q, 2), "saliency" (B, T) and, with `negative`, "saliency_negative" (B, T); float32."""

  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, audio, audio_mask, text, text_mask, *, train: bool, negative: bool = False):
    dtype = compute_dtype(self.config)
    d = self.config.hidden_dim
    audio_mask, text_mask = audio_mask.astype(bool), text_mask.astype(bool)
    frames = InputProjection(self.config, dtype, name="audio_projection")(audio.astype(dtype), train)
    tokens = InputProjection(self.config, dtype, name="text_projection")(text.astype(dtype), train)
    frame_pos = sine_embedding(frame_positions(audio_mask), d).astype(dtype)
    encoder = Encoder(self.config, dtype, name="encoder")
    saliency_frames = nn.Dense(d, dtype=dtype, name="saliency_frames")
    saliency_global = nn.Dense(d, dtype=dtype, name="saliency_global")

    def saliency(tokens, token_mask):
      global_token, memory = encoder(frames, frame_pos, audio_mask, tokens, token_mask, train)
      scores = (saliency_frames(memory) * saliency_global(global_token)[:, None]).astype(jnp.float32).sum(-1)
      return scores / math.sqrt(d), memory

    scores, memory = saliency(tokens, text_mask)
    logits, spans = Decoder(self.config, dtype, name="decoder")(memory, frame_pos, audio_mask, train)
    outputs = {"logits": logits, "spans": spans, "saliency": scores}
    if negative:  # Recording i against query i + 1.
      outputs["saliency_negative"], _ = saliency(jnp.roll(tokens, -1, 0), jnp.roll(text_mask, -1, 0))
    return outputs
