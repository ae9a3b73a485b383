"""Audio-text dual encoder (SPEC 4): an audio tower and a text tower picked by name (`registry`), projection heads
(SPEC 4's two-layer MLP, or one Linear layer as the DCASE 2025 baseline), L2-normalised joint embeddings.

Owns: `DualEncoder`, `build_model` (model ConfigDict -> DualEncoder), `with_frozen_towers_in_inference` (the model
that runs frozen towers with train=False) and the pretrained weights of an initialised model (`load_pretrained`:
the text tower's released weights and the audio tower's converted ones; `load_pretrained_text`). Parameter tree:
{'audio', 'text', 'audio_head', 'text_head'}; batch statistics live under 'audio'.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from atr_jax.models.registry import audio_tower, text_tower
from atr_jax.models.weights import audio_init_dir, load_audio_variables
from atr_jax.sharding import place_like

TEXT_POOLINGS = ("cls", "mean")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_NORM_EPSILON = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows of x scaled to unit L2 norm, in float32 or wider (float64 stays float64); all-zero rows stay zero."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _NORM_EPSILON**2))


class ProjectionHead(nn.Module):
  """Dense(hidden) -> ReLU -> Dense(out); with hidden 0, one Dense(out) (named 'linear')."""

  hidden: int
  out: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.xavier_uniform()
    if not self.hidden:
      return nn.Dense(self.out, dtype=self.dtype, kernel_init=init, name="linear")(x)
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

  audio: nn.Module
  text: nn.Module
  text_pooling: str = "cls"
  embed_dim: int = 1024
  head_hidden: int = 2048
  dtype: jnp.dtype = jnp.float32
  audio_always_eval: bool = False
  text_always_eval: bool = False

  def setup(self):
    self.audio_head = ProjectionHead(self.head_hidden, self.embed_dim, self.dtype)
    self.text_head = ProjectionHead(self.head_hidden, self.embed_dim, self.dtype)

  def embed_audio(self, audio: jax.Array, audio_mask: jax.Array, train: bool) -> jax.Array:
    """The audio tower's input + mask (log-mel (B, T, mel) + frame mask (B, T), or waveforms (B, L) + sample mask
    (B, L): `registry.audio_inputs`) -> (B, embed_dim) unit-norm."""
    tower_train = train and not self.audio_always_eval
    return l2_normalize(self.audio_head(self.audio(audio, audio_mask, tower_train)))

  def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool) -> jax.Array:
    """token ids (B, L) + attention mask (B, L) -> (B, embed_dim) unit-norm."""
    last_hidden, _ = self.text(input_ids, attention_mask, train and not self.text_always_eval)
    return l2_normalize(self.text_head(pool_text(last_hidden, attention_mask, self.text_pooling)))

  def __call__(self, audio, audio_mask, input_ids, attention_mask, train: bool):
    """-> (audio embeddings, text embeddings)."""
    return (self.embed_audio(audio, audio_mask, train), self.embed_text(input_ids, attention_mask, train))


def build_model(model_config: ml_collections.ConfigDict) -> DualEncoder:
  """DualEncoder from the `model` config (keys: audio.arch and that tower's keys, text.arch and that tower's keys,
  text.pooling, embed_dim, head_hidden (0: Linear heads), dtype, remat)."""
  if model_config.dtype not in _DTYPES:
    raise ValueError(f"model.dtype {model_config.dtype!r} is not one of {sorted(_DTYPES)}")
  if model_config.text.pooling not in TEXT_POOLINGS:
    raise ValueError(f"model.text.pooling {model_config.text.pooling!r} is not one of {TEXT_POOLINGS}")
  dtype = _DTYPES[model_config.dtype]
  remat = bool(model_config.remat)
  return DualEncoder(
    audio=audio_tower(model_config.audio).build(model_config.audio, dtype, remat),
    text=text_tower(model_config.text).build(model_config.text, dtype, remat),
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
  """Returns `params` with params['text'] replaced by the released weights of model.text.model_dir (each array
  placed like the one it replaces); `params` itself when model.text.pretrained is False."""
  if not model_config.text.pretrained:
    return params
  loaded = text_tower(model_config.text).load(model_config.text.model_dir, {"params": params["text"]})
  return {**params, "text": place_like(loaded["params"], params["text"])}


def load_pretrained(variables: dict, model_config: ml_collections.ConfigDict) -> dict:
  """`variables` ({'params', 'batch_stats'} of an initialised DualEncoder) with the pretrained towers in: the text
  tower's weights when model.text.pretrained (`load_pretrained_text`), the audio tower's variables from the
  converted folder model.audio.init_from unless it is "scratch"; each array placed like the one it replaces."""
  variables = {**variables, "params": load_pretrained_text(variables["params"], model_config)}
  directory = audio_init_dir(model_config)
  if directory is None:
    return variables
  audio = {name: collection["audio"] for name, collection in variables.items() if "audio" in collection}
  loaded = place_like(load_audio_variables(directory, audio, model_config.audio.arch), audio)
  return {
    name: {**collection, "audio": loaded[name]} if name in loaded else collection
    for name, collection in variables.items()
  }
