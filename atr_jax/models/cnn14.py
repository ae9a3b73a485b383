"""CNN14 audio encoder (PANNs layout, SPEC 3) with frame masks, plus the masked building blocks and the SpecAugment
that every PANNs tower shares (ResNet38 imports them from here).

Owns: `Cnn14` (log-mel (B, T, 64) + frame mask -> clip embedding (B, channels[-1])), `ConvBlock`, the masked helpers
(`log_mel_stem`, `masked_avg_pool`, `mask_frames`, `batch_norm`, `clip_embedding`) and the pure `spec_augment`.
Layout is NHWC with H = time and W = mel, so a PyTorch PANNs state_dict maps onto the parameter names (bn0,
conv_block{1..6}/{conv1,bn1,conv2,bn2}) one to one.

Frame-mask semantics: padded frames are "not there". Activations are multiplied by the mask after bn0 and after
every BN-ReLU, so each convolution sees zeros past a clip's end exactly as its own zero padding; after each time
pooling the valid length becomes floor(L / pool_t) (at least 1) and the activations are re-masked. The final
time max/mean run over valid steps only. Hence in eval mode a clip's embedding does not depend on how far it is
padded or on its batch-mates; for an unpadded clip of at least 64 frames it equals the PANNs computation. In
training, BatchNorm statistics are taken over valid frames only.
"""
from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch (PyTorch momentum 0.1)
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
    freq_drop = _stripe_mask(freq_rng, jnp.full((batch,), num_bins, jnp.int32), num_bins, FREQ_STRIPES,
                             FREQ_MAX_WIDTH)
    drop = time_drop[:, :, None] | freq_drop[:, None, :]
    return jnp.where(drop, jnp.zeros((), x.dtype), x)


def batch_norm(name: str, train: bool, dtype, scale_init=nn.initializers.ones) -> nn.BatchNorm:
    """PyTorch-equivalent BatchNorm (eps 1e-5, PyTorch momentum 0.1); running statistics in eval mode."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                        scale_init=scale_init, name=name)


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
    x = nn.avg_pool(x, (pool_t, pool_f), strides=(pool_t, pool_f), padding='VALID')
    lengths = jnp.maximum(lengths // pool_t, 1)
    frame_mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    return mask_frames(x, frame_mask), frame_mask, lengths


def conv3x3(features: int, dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                   kernel_init=nn.initializers.xavier_uniform(), name=name)


def log_mel_stem(module: nn.Module, log_mel: jax.Array, frame_mask: jax.Array, time_factor: int, train: bool,
                 augment: bool, dtype):
    """The input stage shared by the PANNs towers, run inside `module`'s compact call: pads time to a multiple of
    `time_factor` (the tower's total time downsampling, so every stage keeps a step; the padding is masked),
    applies `bn0` over the mel bins, SpecAugment when training with `augment` (rng stream 'augment'), and masks.
    Returns (x (B, T, mel, 1), frame mask (B, T), valid lengths (B,))."""
    if log_mel.ndim != 3 or frame_mask.shape != log_mel.shape[:2]:
        raise ValueError(f'{type(module).__name__} expects log_mel (B, T, mel) and frame_mask (B, T); got '
                         f'{log_mel.shape} and {frame_mask.shape}')
    extra = -log_mel.shape[1] % time_factor
    log_mel = jnp.pad(log_mel, ((0, 0), (0, extra), (0, 0)))
    frame_mask = jnp.pad(frame_mask.astype(bool), ((0, 0), (0, extra)))
    lengths = frame_mask.sum(axis=1).astype(jnp.int32)
    x = log_mel.astype(dtype)
    x = batch_norm('bn0', train, dtype)(x, mask=frame_mask[:, :, None] if train else None)
    if train and augment:
        x = spec_augment(module.make_rng('augment'), x, lengths)
    return mask_frames(x[..., None], frame_mask), frame_mask, lengths


def clip_embedding(x: jax.Array, frame_mask: jax.Array, lengths: jax.Array) -> jax.Array:
    """NHWC activations -> (B, C) float32: mean over frequency, then max + mean over the valid time steps."""
    x = jnp.mean(x.astype(jnp.float32), axis=2)
    valid = frame_mask[:, :, None]
    time_max = jnp.max(jnp.where(valid, x, -jnp.inf), axis=1)
    time_mean = jnp.sum(jnp.where(valid, x, 0.0), axis=1) / lengths[:, None].astype(jnp.float32)
    return time_max + time_mean


class ConvBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> average pool (floor), on NHWC (H = time) with a frame mask."""
    features: int
    pool: tuple[int, int] = (2, 2)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, frame_mask: jax.Array, lengths: jax.Array, train: bool):
        """Returns (pooled activations, pooled frame mask, pooled valid lengths)."""
        for index in (1, 2):
            x = conv3x3(self.features, self.dtype, f'conv{index}')(x)
            x = batch_norm(f'bn{index}', train, self.dtype)(x, mask=bn_mask(frame_mask, train))
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
        x, frame_mask, lengths = log_mel_stem(self, log_mel, frame_mask, time_factor, train, self.spec_augment,
                                              self.dtype)
        for index, (features, pool) in enumerate(zip(self.channels, pools), start=1):
            x, frame_mask, lengths = ConvBlock(features, pool, self.dtype, name=f'conv_block{index}')(
                x, frame_mask, lengths, train)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return clip_embedding(x, frame_mask, lengths)
