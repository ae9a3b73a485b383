"""PaSST-S audio tower (SPEC 11: hear21passt's `passt_s_p16_s16_128_ap468`) and the mapping of its released weights.

Owns: `Passt` (32 kHz waveforms (B, L) + sample mask, or PaSST front-end features (B, T, 128) + frame mask -> clip
embedding (B, 768)), its transformer `Block`, the pure `structured_patchout`, its fields from `model.audio`
(`fields_from_config`) and the released-weights loader (`load`: `state_dict_to_variables` of the
`passt-s-f128-p16-s16-ap.468.pt` state_dict).

Waveforms go through the PaSST front end on the device (`data_pipelines.passt_features.log_mel_batch`: each clip
alone, the fixed mel band in eval mode, a random band per clip in training), so the training batches need no
second stored feature.

Segments and masks: the input is cut into non-overlapping SEGMENT_FRAMES (10 s) segments, each embedded as
hear21passt embeds a clip of that length (16x16 patches at stride 16, 8 frequency rows x floor(frames / 16) time
columns: the last frames % 16 are not used; the time positional embedding cut to the columns), and the clip
embedding is the mean of its segments holding at least one valid time column (the first segment always counts).
A segment's columns past the clip's end are masked out of attention as keys (the padded frames are zeroed first),
so in eval mode a clip's embedding is that of the clip alone and does not depend on its batch-mates.

Structured patchout (training only, rng stream 'augment'): per segment, `patchout_time` of its valid time columns
(at most all but one) and `patchout_freq` frequency rows are dropped, uniformly at random (hear21passt draws one set
per batch, over the columns of its unpadded input).

Parameter names follow the PyTorch state_dict (blocks.N.attn.qkv.weight -> blocks/N/attn/qkv/kernel); the
positional embeddings are stored (1, 8, 1, 768) and (1, 1, 62, 768) (tokens last) instead of PyTorch's channels-first
(1, 768, 8, 1) and (1, 768, 1, 62). The classification heads (head.*, head_dist.*) are not part of the tower.
"""

import math

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from atr_jax.models.weights import check_params_match, read_torch_state_dict, torch_shape
from data_pipelines import passt_features

HOP_MINIMUM = passt_features.HOP_LENGTH  # the shortest clip (samples) the front end takes
SEGMENT_FRAMES = 1000  # frames of a 10 s clip in the PaSST front end (data_pipelines.passt_features)
LAYER_NORM_EPSILON = 1e-6
SKIPPED_PREFIXES = ("head.", "head_dist.")  # the AudioSet classification heads of the released file
_CHANNELS_FIRST = ("freq_new_pos_embed", "time_new_pos_embed")  # PyTorch (1, E, F, T) <-> Flax (1, F, T, E)
_init = nn.initializers.truncated_normal(0.02)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (bias) and an output projection; `key_mask` (N, S)
  True on the tokens that may be attended to."""

  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    batch, length, dim = x.shape
    qkv = nn.Dense(3 * dim, dtype=self.dtype, kernel_init=_init, name="qkv")(x)
    query, key, value = jnp.split(qkv.reshape(batch, length, 3, self.num_heads, dim // self.num_heads), 3, axis=2)
    x = jax.nn.dot_product_attention(query[:, :, 0], key[:, :, 0], value[:, :, 0], mask=key_mask[:, None, None, :])
    return nn.Dense(dim, dtype=self.dtype, kernel_init=_init, name="proj")(x.reshape(batch, length, dim))


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2."""

  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_init, name="fc1")(x), approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_init, name="fc2")(h)


class Block(nn.Module):
  """Pre-norm ViT block: x + attn(norm1(x)), then + mlp(norm2(x)); LayerNorm eps 1e-6."""

  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    norm = lambda name: nn.LayerNorm(LAYER_NORM_EPSILON, dtype=self.dtype, name=name)
    x = x + Attention(self.num_heads, self.dtype, name="attn")(norm("norm1")(x), key_mask)
    return x + Mlp(self.mlp_dim, self.dtype, name="mlp")(norm("norm2")(x))


class Blocks(nn.Module):
  """The `depth` blocks, named '0', '1', ... as PyTorch's `blocks` Sequential."""

  depth: int
  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    block = nn.remat(Block) if self.remat else Block
    for index in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.dtype, name=str(index))(x, key_mask)
    return x


class PatchEmbed(nn.Module):
  """PyTorch's `patch_embed`: its `proj` convolution (patch x patch, stride patch, bias) of NHWC features (H =
  frequency, W = time) -> tokens (N, H / patch, W / patch, features)."""

  features: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    size = (self.patch_size, self.patch_size)
    return nn.Conv(self.features, size, size, "VALID", dtype=self.dtype, name="proj")(x)


def _kept(rng: jax.Array, valid: jax.Array, drop: int) -> jax.Array:
  """(N, K - drop) indices of the positions kept when `drop` of each row's valid (N, K) positions are dropped
  uniformly at random, keeping at least one valid position: the kept valid ones in order, then padded ones."""
  size = valid.shape[1]
  count = valid.sum(axis=1, keepdims=True)
  rank = jnp.argsort(jnp.argsort(jnp.where(valid, jax.random.uniform(rng, valid.shape), 2.0), axis=1), axis=1)
  dropped = valid & (rank < jnp.minimum(drop, jnp.maximum(count - 1, 0)))
  index = jnp.arange(size)[None, :]
  order = jnp.where(dropped, 2 * size + index, jnp.where(valid, index, size + index))
  return jnp.argsort(order, axis=1)[:, : size - drop]


def structured_patchout(
  rng: jax.Array, tokens: jax.Array, column_valid: jax.Array, drop_time: int, drop_freq: int
) -> tuple[jax.Array, jax.Array]:
  """Structured patchout of a patch grid: (tokens (N, F - drop_freq, T - drop_time, E), column_valid (N, T -
  drop_time)) after dropping `drop_time` of each row's valid time columns (at most all but one; the kept grid is
  filled up with padded columns) and `drop_freq` frequency rows, uniformly at random per row. `tokens` is (N, F, T,
  E), `column_valid` (N, T) True on the columns that hold the clip; drop_time < T and drop_freq < F."""
  time_rng, freq_rng = jax.random.split(rng)
  time_kept = _kept(time_rng, column_valid, drop_time)
  freq_kept = _kept(freq_rng, jnp.ones(tokens.shape[:2], bool), drop_freq)
  tokens = jnp.take_along_axis(tokens, time_kept[:, None, :, None], axis=2)
  tokens = jnp.take_along_axis(tokens, freq_kept[:, :, None, None], axis=1)
  return tokens, jnp.take_along_axis(column_valid, time_kept, axis=1)


class Passt(nn.Module):
  """PaSST-S: 32 kHz waveforms (B, L) in [-1, 1] + sample mask (B, L), or normalised log-mel (B, T, num_mels) + frame
  mask (B, T) -> clip embedding (B, embed_dim) float32.

  Waveforms first go through the PaSST front end (random mel band per clip in training, rng stream 'augment').
  Per 10 s segment: patch embedding (Conv 16x16, stride 16) + frequency and time positional embeddings ->
  [structured patchout] -> cls and distillation tokens (each + its positional embedding) prepended -> `depth` blocks
  -> LayerNorm -> mean of the two tokens; segments averaged (see the module docstring). `dtype` is the compute
  dtype; parameters stay float32. Rng stream (training only): 'augment' (mel band, patchout). `remat`: the blocks'
  activations are recomputed in the backward pass, block by block.
  """

  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  num_mels: int = 128
  segment_frames: int = SEGMENT_FRAMES
  patchout_time: int = 15
  patchout_freq: int = 2
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    """x: waveforms (B, L) with mask (B, L), or features (B, T, num_mels) with mask (B, T); the mask is True on each
    clip's first samples or frames (its valid ones)."""
    if x.ndim == 2 and mask.shape == x.shape:
      band_rng = self.make_rng("augment") if train else None
      x, mask = front_end(x, mask, band_rng)
    frame_mask = mask
    if x.ndim != 3 or x.shape[2] != self.num_mels or frame_mask.shape != x.shape[:2]:
      raise ValueError(
        f"Passt expects features (B, T, {self.num_mels}) and frame_mask (B, T); got {x.shape} and {frame_mask.shape}"
      )
    if x.shape[1] < self.patch_size:
      raise ValueError(f"Passt needs at least {self.patch_size} frames, got {x.shape[1]}")
    batch, segments = x.shape[0], max(1, math.ceil(x.shape[1] / self.segment_frames))
    x, valid_columns = _segments(x.astype(self.dtype), frame_mask, self.segment_frames, self.patch_size)
    tokens = PatchEmbed(self.embed_dim, self.patch_size, self.dtype, name="patch_embed")(
      jnp.swapaxes(x, 1, 2)[..., None]
    )  # (B * S, rows, columns, E)
    rows, columns = tokens.shape[1:3]
    freq_pos = self.param("freq_new_pos_embed", _init, (1, rows, 1, self.embed_dim))
    time_pos = self.param("time_new_pos_embed", _init, (1, 1, self.segment_frames // self.patch_size, self.embed_dim))
    tokens = tokens + (time_pos[:, :, :columns] + freq_pos).astype(self.dtype)
    column_valid = jnp.arange(columns)[None, :] < valid_columns[:, None]
    if train and (self.patchout_time or self.patchout_freq):
      tokens, column_valid = structured_patchout(
        self.make_rng("augment"), tokens, column_valid, min(self.patchout_time, columns - 1), self.patchout_freq
      )
    count, rows, columns, _ = tokens.shape
    cls_token = self.param("cls_token", _init, (1, 1, self.embed_dim))
    dist_token = self.param("dist_token", _init, (1, 1, self.embed_dim))
    token_pos = self.param("new_pos_embed", _init, (1, 2, self.embed_dim))
    special = jnp.broadcast_to(jnp.concatenate([cls_token, dist_token], axis=1) + token_pos, (count, 2, self.embed_dim))
    sequence = jnp.concatenate([special.astype(self.dtype), tokens.reshape(count, rows * columns, -1)], axis=1)
    patch_valid = jnp.broadcast_to(column_valid[:, None, :], (count, rows, columns)).reshape(count, -1)
    key_mask = jnp.concatenate([jnp.ones((count, 2), bool), patch_valid], axis=1)
    sequence = Blocks(self.depth, self.num_heads, self.mlp_dim, self.dtype, self.remat, name="blocks")(
      sequence, key_mask
    )
    sequence = nn.LayerNorm(LAYER_NORM_EPSILON, dtype=self.dtype, name="norm")(sequence[:, :2]).astype(jnp.float32)
    embeddings = sequence.mean(axis=1).reshape(batch, segments, self.embed_dim)
    used = (jnp.arange(segments)[None, :] == 0) | (valid_columns.reshape(batch, segments) > 0)
    return jnp.sum(embeddings * used[:, :, None], axis=1) / used.sum(axis=1, keepdims=True)


def front_end(waveforms: jax.Array, sample_mask: jax.Array, band_rng: jax.Array | None = None):
  """(normalised log-mel (B, T, 128), frame mask (B, T)) of zero-padded waveforms (B, L) whose valid samples
  `sample_mask` marks (a prefix per row): each clip alone with the fixed band, or with a random band per clip drawn
  from `band_rng` (training). Rows shorter than a hop (padding rows) get an all-False frame mask."""
  lengths = sample_mask.sum(axis=1).astype(jnp.int32)
  band = None if band_rng is None else passt_features.random_band(band_rng, waveforms.shape[0])
  # A padding row (length 0) is computed as a clip of one hop, then masked out entirely.
  log_mel, frame_mask = passt_features.log_mel_batch(waveforms, jnp.maximum(lengths, HOP_MINIMUM), band)
  return log_mel, frame_mask & (lengths >= HOP_MINIMUM)[:, None]


def _segments(x: jax.Array, frame_mask: jax.Array, segment_frames: int, patch_size: int):
  """(segments (B * S, F, mel), valid time columns (B * S,)) of features (B, T, mel) with a prefix frame mask: the
  S = ceil(T / segment_frames) consecutive segments of each clip, padded frames zeroed, each cut to the F = patch_size
  * floor(min(T, segment_frames) / patch_size) frames the patches cover."""
  batch, frames, mels = x.shape
  segments = max(1, math.ceil(frames / segment_frames))
  used_frames = min(frames, segment_frames) // patch_size * patch_size
  x = jnp.where(frame_mask[:, :, None], x, jnp.zeros((), x.dtype))
  x = jnp.pad(x, ((0, 0), (0, segments * segment_frames - frames), (0, 0)))
  x = x.reshape(batch * segments, segment_frames, mels)[:, :used_frames]
  lengths = frame_mask.sum(axis=1)[:, None] - segment_frames * jnp.arange(segments)[None, :]
  return x, (jnp.clip(lengths, 0, segment_frames) // patch_size).reshape(-1)


def fields_from_config(audio_config: ml_collections.ConfigDict) -> dict:
  """Passt's fields for `model.audio` (keys: passt.{embed_dim,depth,num_heads,mlp_dim,patchout_time,patchout_freq})."""
  keys = ("embed_dim", "depth", "num_heads", "mlp_dim", "patchout_time", "patchout_freq")
  return {key: audio_config.passt[key] for key in keys}


def _flax_key(name: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """'blocks.3.attn.qkv.weight' -> (('params', 'blocks', '3', 'attn', 'qkv', 'kernel'), (in, out) kernel). A dotted
  name that fits no rule comes back as a one-element key, so it is reported as unexpected."""
  *module, leaf = name.split(".")
  if not module:
    if name in _CHANNELS_FIRST and value.ndim == 4:
      return ("params", name), value.transpose(0, 2, 3, 1)
    return ("params", name), value
  if leaf == "bias":
    return ("params", *module, "bias"), value
  if leaf == "weight" and module[-1].startswith("norm"):
    return ("params", *module, "scale"), value
  if leaf == "weight" and value.ndim == 4:
    return ("params", *module, "kernel"), value.transpose(2, 3, 1, 0)
  if leaf == "weight" and value.ndim == 2:
    return ("params", *module, "kernel"), value.T
  return (name,), value


def _torch_key(flax_key: str) -> str:
  """'params/blocks/3/norm1/scale' -> 'blocks.3.norm1.weight' (the inverse of `_flax_key`)."""
  _, *module, leaf = flax_key.split("/")
  return ".".join([*module, "weight" if leaf in ("kernel", "scale") else leaf])


def _torch_shape(flax_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The file's layout of a variable of Flax shape `shape`: the positional embeddings channels-first."""
  if flax_key.rsplit("/", 1)[-1] in _CHANNELS_FIRST and len(shape) == 4:
    return (shape[0], shape[3], shape[1], shape[2])
  return torch_shape(flax_key, shape)


def state_dict_to_variables(state_dict: dict[str, np.ndarray], expected: dict, source: str) -> dict:
  """hear21passt PaSST state_dict (the released `passt-s-f128-p16-s16-ap.468.pt` layout; head.* and head_dist.*
  skipped) -> {'params'} of the Passt tower whose variables (arrays or ShapeDtypeStructs) are `expected`. Raises one
  ValueError naming, in the file's own (PyTorch) names and layout, every missing key, unexpected key and shape mismatch
  (`source` names the file in it)."""
  flat = {}
  for name, value in state_dict.items():
    if not name.startswith(SKIPPED_PREFIXES):
      key, array = _flax_key(name, np.asarray(value))
      flat[key] = np.ascontiguousarray(array, dtype=np.float32)
  variables = flax.traverse_util.unflatten_dict(flat)
  check_params_match({"params": expected["params"]}, variables, source, _torch_key, _torch_shape)
  return variables


def load(path: str, expected: dict) -> dict:
  """The {'params'} of the released PaSST file `path` (a `torch.save`d state_dict, read weights-only) for the tower
  whose variables are `expected`."""
  return state_dict_to_variables(read_torch_state_dict(path), expected, path)
