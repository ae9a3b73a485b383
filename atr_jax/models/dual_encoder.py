"""Audio-text dual encoder (SPEC 4): a PANNs audio tower (CNN14 or ResNet38) and a BERT-family text tower, MLP
projection heads, L2-normalised joint embeddings.

Owns: `DualEncoder`, `build_audio_tower` (audio ConfigDict -> Cnn14 | ResNet38), `build_model` (model ConfigDict ->
DualEncoder), `with_frozen_towers_in_inference` (the model that runs frozen towers with train=False) and
`load_pretrained_text` (puts HF weights into an initialised parameter tree). Parameter tree: {'audio', 'text',
'audio_head', 'text_head'}; batch statistics live under 'audio'.
"""

from collections.abc import Sequence
import dataclasses
import os

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from atr_jax.models.bert import BertConfig, BertEncoder, check_params_match, load_hf_params
from atr_jax.models.cnn14 import Cnn14
from atr_jax.models.hf_hub import resolve_model_dir
from atr_jax.models.resnet38 import ResNet38
from atr_jax.sharding import place_like

AUDIO_ARCHS = ("cnn14", "resnet38")
# Longest input (frames) each audio tower embeds whole; None: any length (the PANNs towers mask their padding).
AUDIO_MAX_FRAMES = {"cnn14": None, "resnet38": None}
TEXT_POOLINGS = ("cls", "mean")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_NORM_EPSILON = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows of x scaled to unit L2 norm in float32 (all-zero rows stay zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _NORM_EPSILON**2))


class ProjectionHead(nn.Module):
  """Dense(hidden) -> ReLU -> Dense(out)."""

  hidden: int
  out: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.xavier_uniform()
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=init, name="fc1")(x))
    return nn.Dense(self.out, dtype=self.dtype, kernel_init=init, name="fc2")(x)


def pool_text(last_hidden: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
  """'cls': the first token's state; 'mean': the attention-mask-weighted mean over tokens."""
  if pooling == "cls":
    return last_hidden[:, 0]
  if pooling == "mean":
    weights = attention_mask.astype(jnp.float32)[:, :, None]
    total = jnp.sum(last_hidden.astype(jnp.float32) * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  raise ValueError(f"Unknown text pooling {pooling!r}; expected one of {TEXT_POOLINGS}")


class DualEncoder(nn.Module):
  """Audio tower + text tower + projection heads -> unit-norm float32 embeddings of size `embed_dim`.

  `audio_always_eval` / `text_always_eval`: run that tower with train=False even in a training step (BatchNorm on
  running statistics, no dropout, no SpecAugment): how frozen towers run unless the reference behaviour is asked.
  """

  audio: Cnn14 | ResNet38
  text: BertEncoder
  text_pooling: str = "cls"
  embed_dim: int = 1024
  head_hidden: int = 2048
  dtype: jnp.dtype = jnp.float32
  audio_always_eval: bool = False
  text_always_eval: bool = False

  def setup(self):
    self.audio_head = ProjectionHead(self.head_hidden, self.embed_dim, self.dtype)
    self.text_head = ProjectionHead(self.head_hidden, self.embed_dim, self.dtype)

  def embed_audio(self, log_mel: jax.Array, frame_mask: jax.Array, train: bool) -> jax.Array:
    """log-mel (B, T, mel) + frame mask (B, T) -> (B, embed_dim) unit-norm."""
    tower_train = train and not self.audio_always_eval
    return l2_normalize(self.audio_head(self.audio(log_mel, frame_mask, tower_train)))

  def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool) -> jax.Array:
    """token ids (B, L) + attention mask (B, L) -> (B, embed_dim) unit-norm."""
    last_hidden, _ = self.text(input_ids, attention_mask, train and not self.text_always_eval)
    return l2_normalize(self.text_head(pool_text(last_hidden, attention_mask, self.text_pooling)))

  def __call__(self, log_mel, frame_mask, input_ids, attention_mask, train: bool):
    """-> (audio embeddings, text embeddings)."""
    return (self.embed_audio(log_mel, frame_mask, train), self.embed_text(input_ids, attention_mask, train))


def _text_config(model_config: ml_collections.ConfigDict) -> BertConfig:
  config = BertConfig.from_hf_json(os.path.join(resolve_model_dir(model_config.text.model_dir), "config.json"))
  if model_config.text.dropout is not None:
    config = dataclasses.replace(
      config, hidden_dropout_prob=model_config.text.dropout, attention_probs_dropout_prob=model_config.text.dropout
    )
  return config


def _maybe_remat(module_class: type[nn.Module], remat: bool) -> type[nn.Module]:
  """`module_class`, or its rematerialised version (activations recomputed in the backward pass) when `remat`.
  Towers are called as (x, mask, train): `train` (argument 3, counting self) is static."""
  return nn.remat(module_class, static_argnums=(3,)) if remat else module_class


def build_audio_tower(
  audio_config: ml_collections.ConfigDict, dtype=jnp.float32, remat: bool = False
) -> Cnn14 | ResNet38:
  """The audio tower of `model.audio` (keys: arch, dropout, spec_augment; cnn14: channels, last_pool; resnet38:
  resnet.{widths,blocks,out_features,block_dropout}), rematerialised when `remat`."""
  arch = audio_config.get("arch", "cnn14")
  if arch == "cnn14":
    return _maybe_remat(Cnn14, remat)(
      channels=tuple(audio_config.channels),
      last_pool=tuple(audio_config.last_pool),
      dropout_rate=audio_config.dropout,
      spec_augment=audio_config.spec_augment,
      dtype=dtype,
    )
  if arch == "resnet38":
    resnet = audio_config.resnet
    return _maybe_remat(ResNet38, remat)(
      widths=tuple(resnet.widths),
      blocks=tuple(resnet.blocks),
      out_features=resnet.out_features,
      dropout_rate=audio_config.dropout,
      block_dropout_rate=resnet.block_dropout,
      spec_augment=audio_config.spec_augment,
      dtype=dtype,
    )
  raise ValueError(f"model.audio.arch {arch!r} is not one of {AUDIO_ARCHS}")


def build_model(model_config: ml_collections.ConfigDict) -> DualEncoder:
  """DualEncoder from the `model` config (keys: audio.* (see build_audio_tower),
  text.{model_dir,pretrained,pooling,dropout}, embed_dim, head_hidden, dtype, remat)."""
  if model_config.dtype not in _DTYPES:
    raise ValueError(f"model.dtype {model_config.dtype!r} is not one of {sorted(_DTYPES)}")
  if model_config.text.pooling not in TEXT_POOLINGS:
    raise ValueError(f"model.text.pooling {model_config.text.pooling!r} is not one of {TEXT_POOLINGS}")
  dtype = _DTYPES[model_config.dtype]
  remat = bool(model_config.get("remat", False))
  audio = build_audio_tower(model_config.audio, dtype, remat)
  text = _maybe_remat(BertEncoder, remat)(_text_config(model_config), dtype)
  return DualEncoder(
    audio=audio,
    text=text,
    text_pooling=model_config.text.pooling,
    embed_dim=model_config.embed_dim,
    head_hidden=model_config.head_hidden,
    dtype=dtype,
  )


def with_frozen_towers_in_inference(model: DualEncoder, frozen: Sequence[str], enabled: bool) -> DualEncoder:
  """`model` whose frozen towers ('audio' / 'text' in `frozen`) always run with train=False when `enabled`
  (config.model.frozen_in_inference_mode); `model` itself otherwise (the reference: frozen BatchNorm still
  updates its running statistics, dropout stays on)."""
  if not enabled:
    return model
  return model.clone(audio_always_eval="audio" in frozen, text_always_eval="text" in frozen)


def load_pretrained_text(params: dict, model_config: ml_collections.ConfigDict) -> dict:
  """Returns `params` with params['text'] replaced by the HF weights of model.text.model_dir (each array placed
  like the one it replaces); `params` itself when model.text.pretrained is False."""
  if not model_config.text.pretrained:
    return params
  _, hf_params = load_hf_params(resolve_model_dir(model_config.text.model_dir))
  check_params_match(params["text"], hf_params, f"HF weights in {model_config.text.model_dir}")
  return {**params, "text": place_like(hf_params, params["text"])}
