"""CNN14 audio encoder (PANNs layout, SPEC 3) with frame masks, plus the masked building blocks and the SpecAugment
that every PANNs tower shares (ResNet38 imports them from here).

Owns: `Cnn14` (log-mel (B, T, 64) + frame mask -> clip embedding (B, channels[-1])) and its fields from
`model.audio` (`fields_from_config`, its registry hook), `ConvBlock`, `Conv3x3` (`conv_same`: `same_conv` on CPU),
`BatchNorm` (with `update_running_statistics`), `dropout`, the masked helpers (`log_mel_stem`, `masked_avg_pool`,
`mask_frames`, `batch_norm`, `clip_embedding`) and the pure `spec_augment`.
Layout is NHWC with H = time and W = mel, so a PyTorch PANNs state_dict maps onto the parameter names (bn0,
conv_block{1..6}/{conv1,bn1,conv2,bn2}) one to one.

Frame-mask semantics: padded frames are "not there". Activations are multiplied by the mask after bn0 and after
every BN-ReLU, so each convolution sees zeros past a clip's end exactly as its own zero padding; after each time
pooling the valid length becomes floor(L / pool_t) (at least 1) and the activations are re-masked. The final
time max/mean run over valid steps only. Hence in eval mode a clip's embedding does not depend on how far it is
padded or on its batch-mates; for an unpadded clip of at least 64 frames it equals the PANNs computation. In
training, BatchNorm statistics are taken over valid frames only.
"""

from collections.abc import Callable, Sequence
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch (PyTorch momentum 0.1)
BATCH_MOMENTS = "batch_moments"  # Collection where training-mode BatchNorm puts its batch moments when it is mutable.
TIME_STRIPES, TIME_MAX_WIDTH = 2, 64
FREQ_STRIPES, FREQ_MAX_WIDTH = 2, 8


def _stripe_mask(rng: jax.Array, lengths: jax.Array, size: int, num_stripes: int, max_width: int) -> jax.Array:
  """(B, size) bool, True inside any of `num_stripes` stripes per example.

  Each stripe has width U[0, max_width) (clipped to the example's length) and a uniform start such that it lies
  within the first `lengths[b]` positions.
  """
  batch = lengths.shape[0]
  width_rng, start_rng = jax.random.split(rng)
  widths = jax.random.randint(width_rng, (batch, num_stripes), 0, max_width)
  widths = jnp.minimum(widths, lengths[:, None])
  num_starts = lengths[:, None] - widths + 1
  starts = jnp.floor(jax.random.uniform(start_rng, (batch, num_stripes)) * num_starts).astype(jnp.int32)
  positions = jnp.arange(size)[None, None, :]
  inside = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
  return inside.any(axis=1)


def spec_augment(rng: jax.Array, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
  """SpecAugment of (B, T, F) features: per example 2 time stripes of width U[0,64) then 2 frequency stripes of
  width U[0,8), each at a uniform start, set to 0. `lengths` (B,) restricts time stripes to the valid frames
  (default: all T frames)."""
  batch, num_frames, num_bins = x.shape
  if lengths is None:
    lengths = jnp.full((batch,), num_frames, jnp.int32)
  time_rng, freq_rng = jax.random.split(rng)
  time_drop = _stripe_mask(time_rng, lengths.astype(jnp.int32), num_frames, TIME_STRIPES, TIME_MAX_WIDTH)
  freq_drop = _stripe_mask(freq_rng, jnp.full((batch,), num_bins, jnp.int32), num_bins, FREQ_STRIPES, FREQ_MAX_WIDTH)
  drop = time_drop[:, :, None] | freq_drop[:, None, :]
  return jnp.where(drop, jnp.zeros((), x.dtype), x)


class BatchNorm(nn.Module):
  """BatchNorm over every axis but the last, with Flax's variable names (params scale/bias, batch_stats mean/var)
  and PyTorch's numerics: the batch is normalised by its biased variance E[x^2] - E[x]^2, and the running
  statistics take running = momentum * running + (1 - momentum) * batch with the unbiased variance (n / (n - 1)).
  In training, `mask` (bool, broadcastable to x, last axis 1) restricts the statistics to the True positions,
  and the running statistics take one momentum update from the batch moments; when the collection BATCH_MOMENTS
  is mutable they are left alone and the moments (count, mean, mean_of_squares) are put there instead, for
  `update_running_statistics` to combine the moments of several batches into one update.

  Written out rather than `nn.BatchNorm(mask=...)`, whose masked statistics materialise full-size broadcasts of
  the mask and of constants on XLA CPU: the two masked sums here read x once, in one fused reduction."""

  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: jnp.dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      count, mean, mean_of_squares = _moments(x.astype(jnp.float32), mask)
      var = _variance(mean, mean_of_squares)
      if self.is_mutable_collection(BATCH_MOMENTS) and not self.is_initializing():
        for name, value in (("count", count), ("mean", mean), ("mean_of_squares", mean_of_squares)):
          self.put_variable(BATCH_MOMENTS, name, value)
      elif not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * _unbiased(var, count)
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x * multiplier.astype(self.dtype) + (bias - mean * multiplier).astype(self.dtype)).astype(self.dtype)


def _moments(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(count, per-channel mean, per-channel mean of squares) of float32 x over every axis but the last, over the
  masked positions only; count is a float32 scalar."""
  axes = tuple(range(x.ndim - 1))
  if mask is None:
    count = jnp.float32(x.size // x.shape[-1])
    mean, mean_of_squares = jnp.mean(x, axes), jnp.mean(jnp.square(x), axes)
  else:
    weights = mask.astype(jnp.float32)
    count = jnp.sum(weights) * (x.size // (weights.size * x.shape[-1]))
    mean = jnp.sum(x * weights, axes) / count
    mean_of_squares = jnp.sum(jnp.square(x) * weights, axes) / count
  return count, mean, mean_of_squares


def _variance(mean: jax.Array, mean_of_squares: jax.Array) -> jax.Array:
  """Biased variance E[x^2] - E[x]^2, clipped at 0."""
  return jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)


def _unbiased(var: jax.Array, count: jax.Array) -> jax.Array:
  """The biased variance of `count` positions made unbiased, as PyTorch's running variance takes it."""
  return var * (count / jnp.maximum(count - 1.0, 1.0))


def update_running_statistics(batch_stats: dict, moments: dict, momentum: float = BN_MOMENTUM) -> dict:
  """`batch_stats` after one momentum update per BatchNorm layer from the moments it put in BATCH_MOMENTS in K
  forward passes (leaves stacked on a leading axis of size K), pooled over all K passes' positions (weighted by
  count): the update a single pass over their union would make from the same layer inputs. `momentum` is the
  layers' (BN_MOMENTUM, as `batch_norm` builds them); layers without moments (run on running statistics) keep
  their statistics."""
  if "count" in moments:
    weights = moments["count"][:, None] / jnp.sum(moments["count"])
    mean = jnp.sum(weights * moments["mean"], axis=0)
    var = _variance(mean, jnp.sum(weights * moments["mean_of_squares"], axis=0))
    var = _unbiased(var, jnp.sum(moments["count"]))
    return {
      "mean": momentum * batch_stats["mean"] + (1 - momentum) * mean,
      "var": momentum * batch_stats["var"] + (1 - momentum) * var,
    }
  return {
    **batch_stats,
    **{name: update_running_statistics(batch_stats[name], value, momentum) for name, value in moments.items()},
  }


def batch_norm(name: str, train: bool, dtype, scale_init=nn.initializers.ones) -> BatchNorm:
  """PyTorch-equivalent BatchNorm (eps 1e-5, PyTorch momentum 0.1); running statistics in eval mode."""
  return BatchNorm(use_running_average=not train, dtype=dtype, scale_init=scale_init, name=name)


def mask_frames(x: jax.Array, frame_mask: jax.Array) -> jax.Array:
  """Zeroes the padded time steps of NHWC activations (H = time)."""
  return x * frame_mask[:, :, None, None].astype(x.dtype)


def bn_mask(frame_mask: jax.Array, train: bool) -> jax.Array | None:
  """The BatchNorm `mask` argument of NHWC activations: statistics over valid frames only (train mode)."""
  return frame_mask[:, :, None, None] if train else None


def masked_avg_pool(x: jax.Array, lengths: jax.Array, pool: tuple[int, int]):
  """Average pool (floor) of NHWC activations -> (pooled, pooled frame mask, pooled valid lengths (>= 1)).
  A pooled step is valid when all its input steps were, so valid outputs never mix in padding."""
  pool_t, pool_f = pool
  x = nn.avg_pool(x, (pool_t, pool_f), strides=(pool_t, pool_f), padding="VALID")
  lengths = jnp.maximum(lengths // pool_t, 1)
  frame_mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
  return mask_frames(x, frame_mask), frame_mask, lengths


def _correlate(x: jax.Array, kernel: jax.Array) -> jax.Array:
  padding = [((size - 1) // 2, (size - 1) // 2) for size in kernel.shape[:2]]
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 NHWC convolution (cross-correlation) with an odd-sized HWIO kernel and 'same' zero padding.

  The function of `lax.conv_general_dilated`, with a cheaper backward pass on XLA CPU (used on CPU only, see
  `conv_same`):
  - the input gradient needs the kernel with its taps reversed and its in/out features swapped, which XLA emits
    as one reverse-transpose copy ~5x slower than reversing the taps (contiguous blocks) and then transposing, as
    done here;
  - where the activations are small next to the kernel (CNN14's blocks 5-6) or have one channel (the first
    convolution), both gradients are plain matrix products with the zero-padded patches instead, which needs no
    kernel-sized copy at all (`_patch_matmul_gradients`)."""
  return _correlate(x, kernel)


def _same_conv_fwd(x, kernel):
  return _correlate(x, kernel), (x, kernel)


def _patches(x: jax.Array, kernel_hw: tuple[int, int]) -> jax.Array:
  """(N, H, W, C) -> (N, H, W, kh * kw * C): each position's zero-padded kh x kw neighbourhood, taps in HWIO order."""
  (kh, kw), (_, h, w, _) = kernel_hw, x.shape
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return jnp.concatenate([padded[:, a : a + h, b : b + w] for a in range(kh) for b in range(kw)], axis=-1)


def _patch_matmul_gradients(x, kernel, dy):
  """Both gradients of `same_conv` as matrix products: dkernel = patchesᵀ dy, and dx sums the patch gradients
  dy kernelᵀ back onto the positions they were taken from."""
  (kh, kw, features, _), (n, h, w, _) = kernel.shape, x.shape
  dy_rows = dy.reshape(n * h * w, -1)
  dkernel = jax.lax.dot_general(_patches(x, (kh, kw)).reshape(n * h * w, -1), dy_rows, (((0,), (0,)), ((), ())))
  dpatches = jax.lax.dot_general(dy_rows, kernel.reshape(-1, kernel.shape[-1]), (((1,), (1,)), ((), ())))
  dpatches = dpatches.reshape(n, h, w, kh * kw, features)
  dx_padded = sum(
    jnp.pad(dpatches[:, :, :, a * kw + b], ((0, 0), (a, kh - 1 - a), (b, kw - 1 - b), (0, 0)))
    for a in range(kh)
    for b in range(kw)
  )
  return dx_padded[:, kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w], dkernel.reshape(kernel.shape)


def _same_conv_bwd(residuals, dy):
  x, kernel = residuals
  positions = x.shape[0] * x.shape[1] * x.shape[2]
  # Measured on CNN14's layers (batch 8, 10 s clips): the patches win for 31x2 and 62x4 positions at 1024-2048
  # output features (positions <= 3 x out) and for the 1-channel input; the convolutions win everywhere else.
  if positions <= 3 * kernel.shape[-1] or kernel.shape[2] == 1:
    return _patch_matmul_gradients(x, kernel, dy)
  taps = kernel.reshape(-1, *kernel.shape[2:])
  reversed_taps = jnp.concatenate([taps[index : index + 1] for index in reversed(range(taps.shape[0]))])
  dx = _correlate(dy, jnp.swapaxes(reversed_taps.reshape(kernel.shape), 2, 3))
  _, kernel_pullback = jax.vjp(lambda k: _correlate(x, k), kernel)
  return dx, kernel_pullback(dy)[0]


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


class Conv3x3(nn.Module):
  """3x3 convolution, stride 1, zero padding 1, no bias, NHWC (`conv_same`); parameter 'kernel' (3, 3, in, out)
  as nn.Conv."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (3, 3, x.shape[-1], self.features), jnp.float32)
    return conv_same(x.astype(self.dtype), kernel.astype(self.dtype))


def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' convolution by backend: `same_conv` (gradients tuned for XLA CPU) on the CPU, plain
  `lax.conv_general_dilated` (XLA's own gradients, which cuDNN and the GPU/TPU fusions are tuned for) elsewhere."""
  return same_conv(x, kernel) if jax.default_backend() == "cpu" else _correlate(x, kernel)


def conv3x3(features: int, dtype, name: str) -> Conv3x3:
  return Conv3x3(features, dtype, name=name)


def log_mel_stem(
  module: nn.Module, log_mel: jax.Array, frame_mask: jax.Array, time_factor: int, train: bool, augment: bool, dtype
):
  """The input stage shared by the PANNs towers, run inside `module`'s compact call: pads time up to
  `time_factor` frames when shorter (the tower's total time downsampling, so every stage keeps a step; the padding
  is masked; longer inputs are not padded: the pools floor as in PANNs),
  applies `bn0` over the mel bins, SpecAugment when training with `augment` (rng stream 'augment'), and masks.
  Returns (x (B, T, mel, 1), frame mask (B, T), valid lengths (B,))."""
  if log_mel.ndim != 3 or frame_mask.shape != log_mel.shape[:2]:
    raise ValueError(
      f"{type(module).__name__} expects log_mel (B, T, mel) and frame_mask (B, T); got "
      f"{log_mel.shape} and {frame_mask.shape}"
    )
  extra = max(time_factor - log_mel.shape[1], 0)
  log_mel = jnp.pad(log_mel, ((0, 0), (0, extra), (0, 0)))
  frame_mask = jnp.pad(frame_mask.astype(bool), ((0, 0), (0, extra)))
  lengths = frame_mask.sum(axis=1).astype(jnp.int32)
  x = log_mel.astype(dtype)
  x = batch_norm("bn0", train, dtype)(x, mask=frame_mask[:, :, None] if train else None)
  if train and augment:
    x = spec_augment(module.make_rng("augment"), x, lengths)
  return mask_frames(x[..., None], frame_mask), frame_mask, lengths


def clip_embedding(x: jax.Array, frame_mask: jax.Array, lengths: jax.Array) -> jax.Array:
  """NHWC activations -> (B, C) float32: mean over frequency, then max + mean over the valid time steps."""
  x = jnp.mean(x.astype(jnp.float32), axis=2)
  valid = frame_mask[:, :, None]
  time_max = jnp.max(jnp.where(valid, x, -jnp.inf), axis=1)
  time_mean = jnp.sum(jnp.where(valid, x, 0.0), axis=1) / lengths[:, None].astype(jnp.float32)
  return time_max + time_mean


def dropout(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Inverted dropout for the PANNs towers (rng stream 'dropout' of `module`), drawing 16 random bits per element:
  each element is zeroed with probability round(65536 rate) / 65536 (within 2^-17 of `rate`; 0.2 -> 0.199997) and
  the kept ones are scaled by the inverse keep probability. Identity when not training or at rate 0.

  `nn.Dropout` draws 32 bits per element; threefry on CPU costs per 32-bit word, so two draws per word halve the
  cost (CNN14 at batch 8, 10 s clips: 109 -> 55 ms of a training step's forward pass on 2 cores)."""
  threshold = round(rate * 65536)
  if not train or threshold == 0:
    return x
  if threshold >= 65536:
    return jnp.zeros_like(x)
  channels = x.shape[-1]
  words = jax.random.bits(module.make_rng("dropout"), (*x.shape[:-1], -(-channels // 2)), jnp.uint32)
  draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*x.shape[:-1], -1)[..., :channels]
  return jnp.where(draws >= threshold, x * (65536 / (65536 - threshold)), jnp.zeros((), x.dtype)).astype(x.dtype)


class ConvBlock(nn.Module):
  """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> average pool (floor), on NHWC (H = time) with a frame mask."""

  features: int
  pool: tuple[int, int] = (2, 2)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frame_mask: jax.Array, lengths: jax.Array, train: bool):
    """Returns (pooled activations, pooled frame mask, pooled valid lengths)."""
    for index in (1, 2):
      x = conv3x3(self.features, self.dtype, f"conv{index}")(x)
      x = batch_norm(f"bn{index}", train, self.dtype)(x, mask=bn_mask(frame_mask, train))
      x = mask_frames(nn.relu(x), frame_mask)
    return masked_avg_pool(x, lengths, tuple(self.pool))


class Cnn14(nn.Module):
  """PANNs CNN14 trunk: log-mel (B, T, 64) + frame mask (B, T) -> clip embedding (B, channels[-1]) in float32.

  `last_pool` is block 6's pooling: (2, 2) as the retrieval reference (default), (1, 1) as PANNs.
  `dtype` is the compute dtype; parameters stay float32. Rng streams: 'augment' (SpecAugment), 'dropout'.
  """

  channels: Sequence[int] = (64, 128, 256, 512, 1024, 2048)
  last_pool: tuple[int, int] = (2, 2)
  dropout_rate: float = 0.2
  spec_augment: bool = True
  dtype: jnp.dtype = jnp.float32

  def _pools(self) -> list[tuple[int, int]]:
    return [(2, 2)] * (len(self.channels) - 1) + [tuple(self.last_pool)]

  @nn.compact
  def __call__(self, log_mel: jax.Array, frame_mask: jax.Array, train: bool) -> jax.Array:
    pools = self._pools()
    time_factor = math.prod(pool_t for pool_t, _ in pools)
    x, frame_mask, lengths = log_mel_stem(self, log_mel, frame_mask, time_factor, train, self.spec_augment, self.dtype)
    for index, (features, pool) in enumerate(zip(self.channels, pools), start=1):
      x, frame_mask, lengths = ConvBlock(features, pool, self.dtype, name=f"conv_block{index}")(
        x, frame_mask, lengths, train
      )
      x = dropout(self, x, self.dropout_rate, train)
    return clip_embedding(x, frame_mask, lengths)


def fields_from_config(audio_config: ml_collections.ConfigDict) -> dict:
  """Cnn14's fields for `model.audio` (keys: channels, last_pool, dropout, spec_augment)."""
  return {
    "channels": tuple(audio_config.channels),
    "last_pool": tuple(audio_config.last_pool),
    "dropout_rate": audio_config.dropout,
    "spec_augment": audio_config.spec_augment,
  }
