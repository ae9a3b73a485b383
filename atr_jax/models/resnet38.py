"""ResNet38 audio encoder (PANNs layout, SPEC 3) with frame masks.

Owns: `ResNet38` (log-mel (B, T, 64) + frame mask -> clip embedding (B, out_features)), its fields from
`model.audio` (`fields_from_config`, its registry hook), its `ResnetBasicBlock` and `Downsample`. Parameter names
follow the PANNs state_dict one to one: bn0, conv_block1, resnet/layer{1..4}/{i}/{conv1,bn1,conv2,bn2,
downsample/{1,2}}, conv_block_after1 (index 0 of PANNs' downsample Sequential is its average pool, which has no
parameters).

Frame masks have the Cnn14 semantics (see cnn14): every convolution input is zero past a clip's end, pooled lengths
are floor(L / 2) (at least 1), the final time pooling runs over valid steps, so an eval embedding does not depend on
padding or batch-mates. The residual sum is masked after its ReLU, like every other activation.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from atr_jax.models.cnn14 import (
  ConvBlock,
  batch_norm,
  bn_mask,
  clip_embedding,
  conv3x3,
  dropout,
  log_mel_stem,
  mask_frames,
  masked_avg_pool,
)


class Downsample(nn.Module):
  """The shortcut of a stride-2 block: 2x2 average pool -> conv1x1 (named '1') -> BN (named '2')."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, lengths: jax.Array, train: bool) -> jax.Array:
    x, frame_mask, _ = masked_avg_pool(x, lengths, (2, 2))
    x = nn.Conv(
      self.features, (1, 1), use_bias=False, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name="1"
    )(x)
    return batch_norm("2", train, self.dtype)(x, mask=bn_mask(frame_mask, train))


class ResnetBasicBlock(nn.Module):
  """PANNs basic block: [avg pool 2x2 if stride 2] -> conv3x3 -> BN -> ReLU -> dropout -> conv3x3 -> BN (scale
  initialised to 0) -> + shortcut -> ReLU. The shortcut is the identity or, with stride 2, `Downsample`."""

  features: int
  stride: int = 1
  dropout_rate: float = 0.2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frame_mask: jax.Array, lengths: jax.Array, train: bool):
    """Returns (activations, frame mask, valid lengths) after the block."""
    if self.stride not in (1, 2):
      raise ValueError(f"ResnetBasicBlock stride must be 1 or 2, got {self.stride}")
    if self.stride == 1 and x.shape[-1] != self.features:
      raise ValueError(f"a stride-1 block keeps its width: input has {x.shape[-1]} channels, block {self.features}")
    if self.stride == 2:
      shortcut = Downsample(self.features, self.dtype, name="downsample")(x, lengths, train)
      out, frame_mask, lengths = masked_avg_pool(x, lengths, (2, 2))
    else:
      shortcut = out = x
    out = conv3x3(self.features, self.dtype, "conv1")(out)
    out = batch_norm("bn1", train, self.dtype)(out, mask=bn_mask(frame_mask, train))
    out = mask_frames(nn.relu(out), frame_mask)
    out = dropout(self, out, self.dropout_rate, train)
    out = conv3x3(self.features, self.dtype, "conv2")(out)
    out = batch_norm("bn2", train, self.dtype, scale_init=nn.initializers.zeros)(out, mask=bn_mask(frame_mask, train))
    return mask_frames(nn.relu(out + shortcut), frame_mask), frame_mask, lengths


class ResnetStage(nn.Module):
  """One `layer{k}` of PANNs' _ResNet: `num_blocks` basic blocks named '0', '1', ...; the first has `stride`."""

  features: int
  num_blocks: int
  stride: int
  dropout_rate: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, frame_mask, lengths, train: bool):
    for index in range(self.num_blocks):
      x, frame_mask, lengths = ResnetBasicBlock(
        self.features, self.stride if index == 0 else 1, self.dropout_rate, self.dtype, name=str(index)
      )(x, frame_mask, lengths, train)
    return x, frame_mask, lengths


class ResnetTrunk(nn.Module):
  """PANNs' `resnet` (_ResNet): stages layer1..layerN; layer1 has stride 1, the others stride 2."""

  widths: Sequence[int]
  blocks: Sequence[int]
  dropout_rate: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, frame_mask, lengths, train: bool):
    for index, (features, num_blocks) in enumerate(zip(self.widths, self.blocks), start=1):
      x, frame_mask, lengths = ResnetStage(
        features, num_blocks, 1 if index == 1 else 2, self.dropout_rate, self.dtype, name=f"layer{index}"
      )(x, frame_mask, lengths, train)
    return x, frame_mask, lengths


class ResNet38(nn.Module):
  """PANNs ResNet38 trunk: log-mel (B, T, 64) + frame mask (B, T) -> clip embedding (B, out_features) float32.

  bn0 -> [SpecAugment] -> ConvBlock 1->widths[0] (pool 2x2) -> dropout -> ResNet stages (`blocks` basic blocks of
  `widths`, block dropout `block_dropout_rate`: 0.1 in PANNs, 0.2 in the retrieval reference) -> avg pool 2x2 ->
  dropout -> ConvBlock ->out_features (pool 1x1) -> dropout -> frequency mean, time max + mean.
  `dtype` is the compute dtype; parameters stay float32. Rng streams: 'augment' (SpecAugment), 'dropout'.
  """

  widths: Sequence[int] = (64, 128, 256, 512)
  blocks: Sequence[int] = (3, 4, 6, 3)
  out_features: int = 2048
  dropout_rate: float = 0.2
  block_dropout_rate: float = 0.2
  spec_augment: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, log_mel: jax.Array, frame_mask: jax.Array, train: bool) -> jax.Array:
    if len(self.widths) != len(self.blocks):
      raise ValueError(f"ResNet38 widths {tuple(self.widths)} and blocks {tuple(self.blocks)} differ in length")
    time_factor = 2 * 2 ** (len(self.widths) - 1) * 2  # stem pool, stride-2 stages, pool after the trunk
    x, frame_mask, lengths = log_mel_stem(self, log_mel, frame_mask, time_factor, train, self.spec_augment, self.dtype)
    x, frame_mask, lengths = ConvBlock(self.widths[0], (2, 2), self.dtype, name="conv_block1")(
      x, frame_mask, lengths, train
    )
    x, frame_mask, lengths = ResnetTrunk(self.widths, self.blocks, self.block_dropout_rate, self.dtype, name="resnet")(
      dropout(self, x, self.dropout_rate, train), frame_mask, lengths, train
    )
    x, frame_mask, lengths = masked_avg_pool(x, lengths, (2, 2))
    x, frame_mask, lengths = ConvBlock(self.out_features, (1, 1), self.dtype, name="conv_block_after1")(
      dropout(self, x, self.dropout_rate, train), frame_mask, lengths, train
    )
    return clip_embedding(dropout(self, x, self.dropout_rate, train), frame_mask, lengths)


def fields_from_config(audio_config: ml_collections.ConfigDict) -> dict:
  """ResNet38's fields for `model.audio` (keys: dropout, spec_augment, resnet.{widths,blocks,out_features,
  block_dropout})."""
  resnet = audio_config.resnet
  return {
    "widths": tuple(resnet.widths),
    "blocks": tuple(resnet.blocks),
    "out_features": resnet.out_features,
    "dropout_rate": audio_config.dropout,
    "block_dropout_rate": resnet.block_dropout,
    "spec_augment": audio_config.spec_augment,
  }
