"""Audio-text dual encoder (SPEC 4): CNN14 and BERT towers, MLP projection heads, L2-normalised joint embeddings.

Owns: `DualEncoder`, `build_model` (model ConfigDict -> DualEncoder) and `load_pretrained_text` (puts HF BERT
weights into an initialised parameter tree). Parameter tree: {'audio', 'text', 'audio_head', 'text_head'};
batch statistics live under 'audio'.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from atr_jax.models.bert import BertConfig, BertEncoder, check_params_match, load_hf_params
from atr_jax.models.cnn14 import Cnn14

TEXT_POOLINGS = ('cls', 'mean')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_NORM_EPSILON = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of x scaled to unit L2 norm in float32 (all-zero rows stay zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _NORM_EPSILON ** 2))


class ProjectionHead(nn.Module):
    """Dense(hidden) -> ReLU -> Dense(out)."""
    hidden: int
    out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.xavier_uniform()
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=init, name='fc1')(x))
        return nn.Dense(self.out, dtype=self.dtype, kernel_init=init, name='fc2')(x)


def pool_text(last_hidden: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """'cls': the first token's state; 'mean': the attention-mask-weighted mean over tokens."""
    if pooling == 'cls':
        return last_hidden[:, 0]
    if pooling == 'mean':
        weights = attention_mask.astype(jnp.float32)[:, :, None]
        total = jnp.sum(last_hidden.astype(jnp.float32) * weights, axis=1)
        return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    raise ValueError(f'Unknown text pooling {pooling!r}; expected one of {TEXT_POOLINGS}')


class DualEncoder(nn.Module):
    """Audio tower + text tower + projection heads -> unit-norm float32 embeddings of size `embed_dim`."""
    audio: Cnn14
    text: BertEncoder
    text_pooling: str = 'cls'
    embed_dim: int = 1024
    head_hidden: int = 2048
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.audio_head = ProjectionHead(self.head_hidden, self.embed_dim, self.dtype)
        self.text_head = ProjectionHead(self.head_hidden, self.embed_dim, self.dtype)

    def embed_audio(self, log_mel: jax.Array, frame_mask: jax.Array, train: bool) -> jax.Array:
        """log-mel (B, T, mel) + frame mask (B, T) -> (B, embed_dim) unit-norm."""
        return l2_normalize(self.audio_head(self.audio(log_mel, frame_mask, train)))

    def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool) -> jax.Array:
        """token ids (B, L) + attention mask (B, L) -> (B, embed_dim) unit-norm."""
        last_hidden, _ = self.text(input_ids, attention_mask, train)
        return l2_normalize(self.text_head(pool_text(last_hidden, attention_mask, self.text_pooling)))

    def __call__(self, log_mel, frame_mask, input_ids, attention_mask, train: bool):
        """-> (audio embeddings, text embeddings)."""
        return (self.embed_audio(log_mel, frame_mask, train),
                self.embed_text(input_ids, attention_mask, train))


def _text_config(model_config: ml_collections.ConfigDict) -> BertConfig:
    config = BertConfig.from_hf_json(os.path.join(model_config.text.model_dir, 'config.json'))
    if model_config.text.dropout is not None:
        config = dataclasses.replace(config, hidden_dropout_prob=model_config.text.dropout,
                                     attention_probs_dropout_prob=model_config.text.dropout)
    return config


def build_model(model_config: ml_collections.ConfigDict) -> DualEncoder:
    """DualEncoder from the `model` config (keys: audio.{channels,last_pool,dropout,spec_augment},
    text.{model_dir,pretrained,pooling,dropout}, embed_dim, head_hidden, dtype)."""
    if model_config.dtype not in _DTYPES:
        raise ValueError(f'model.dtype {model_config.dtype!r} is not one of {sorted(_DTYPES)}')
    if model_config.text.pooling not in TEXT_POOLINGS:
        raise ValueError(f'model.text.pooling {model_config.text.pooling!r} is not one of {TEXT_POOLINGS}')
    dtype = _DTYPES[model_config.dtype]
    audio = Cnn14(channels=tuple(model_config.audio.channels), last_pool=tuple(model_config.audio.last_pool),
                  dropout_rate=model_config.audio.dropout, spec_augment=model_config.audio.spec_augment,
                  dtype=dtype)
    text = BertEncoder(_text_config(model_config), dtype)
    return DualEncoder(audio=audio, text=text, text_pooling=model_config.text.pooling,
                       embed_dim=model_config.embed_dim, head_hidden=model_config.head_hidden, dtype=dtype)


def load_pretrained_text(params: dict, model_config: ml_collections.ConfigDict) -> dict:
    """Returns `params` with params['text'] replaced by the HF weights of model.text.model_dir (each array placed
    like the one it replaces); `params` itself when model.text.pretrained is False."""
    if not model_config.text.pretrained:
        return params
    _, hf_params = load_hf_params(model_config.text.model_dir)
    check_params_match(params['text'], hf_params, f'HF weights in {model_config.text.model_dir}')
    text = jax.tree.map(lambda old, new: jax.device_put(new.astype(old.dtype), old.sharding),
                        params['text'], hf_params)
    return {**params, 'text': text}
