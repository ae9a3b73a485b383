"""Tests of the RoBERTa text tower (`model.text.arch="roberta"`, SPEC 11): parity with transformers' RobertaModel on
random weights loaded through the registry, checkpoint keys named in the file's terms, no pooling layer, layer-wise
remat, and RoBERTa-large (random init; its parameter count at full depth, the step at its width with fewer layers)
born FSDP-sharded over 8 fake devices with a bf16, rematerialised forward + backward."""

import dataclasses
import json
import os

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from atr_jax import sharding
from atr_jax.models.bert import ROBERTA_LARGE, BertConfig
from atr_jax.models.registry import text_tower

SMALL = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
PAD = 1


def _key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl="rbg")  # XLA CPU compiles threefry bits slowly.


def _text_config(model_dir: str, arch: str = "roberta") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {"arch": arch, "model_dir": model_dir, "pretrained": True, "pooling": "cls", "dropout": None, "max_len": 32}
  )


def _abstract_variables(module: nn.Module, batch: int = 1, length: int = 2) -> dict:
  ids = jnp.zeros((batch, length), jnp.int32)
  return jax.eval_shape(lambda: module.init(_key(0), ids, ids, train=False))


@pytest.fixture(scope="module")
def small_roberta_dir(tmp_path_factory) -> str:
  """A random 2-layer, hidden-64 HF RobertaModel (biases and LayerNorms random too) saved with save_pretrained."""
  config = transformers.RobertaConfig(
    **SMALL, max_position_embeddings=40, pad_token_id=PAD, bos_token_id=0, eos_token_id=2, type_vocab_size=1
  )
  torch.manual_seed(0)
  model = transformers.RobertaModel(config)
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      tensor.copy_(torch.randn_like(tensor) * 0.2 + (1.0 if "LayerNorm.weight" in name else 0.0))
  path = str(tmp_path_factory.mktemp("small_roberta"))
  model.save_pretrained(path)
  return path


def _random_tokens(seed: int, lengths, max_len: int):
  """Token ids as a RoBERTa tokenizer gives them: <s> ... </s>, then padding id 1; and the attention mask."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  mask = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(3, SMALL["vocab_size"], (len(lengths), max_len)), PAD)
  ids[:, 0] = 0
  ids[np.arange(len(lengths)), lengths - 1] = 2
  return ids.astype(np.int32), mask


def _ours(model_dir: str, ids, mask):
  tower = text_tower(_text_config(model_dir))
  module = tower.build(_text_config(model_dir))
  variables = tower.load(model_dir, _abstract_variables(module))
  last, first = jax.jit(lambda v, i, m: module.apply(v, i, m, train=False))(variables, ids, mask)
  return np.asarray(last), np.asarray(first), variables


def test_roberta_tower_matches_transformers(small_roberta_dir):
  ids, mask = _random_tokens(3, [32, 19, 7, 3], 32)
  last, first, variables = _ours(small_roberta_dir, ids, mask)
  assert "pooler" not in variables["params"]  # no pooling layer: the file's pooler is skipped
  model = transformers.RobertaModel.from_pretrained(small_roberta_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  assert last.shape == expected.shape == (4, 32, 64)
  relative = np.linalg.norm(last - expected) / np.linalg.norm(expected)
  worst = np.abs(last - expected).max() / np.abs(expected).max()
  print(f"RoBERTa parity: relative L2 error {relative:.2e}, max abs error / max abs {worst:.2e}")
  assert relative < 1e-4 and worst < 1e-4
  np.testing.assert_array_equal(first, last[:, 0])  # the embedding the head takes: the first token's state


def test_missing_and_misshaped_keys_are_named_in_the_files_terms(small_roberta_dir, tmp_path):
  tensors = {f"roberta.{k}": v for k, v in load_file(os.path.join(small_roberta_dir, "model.safetensors")).items()}
  del tensors["roberta.encoder.layer.1.attention.self.key.weight"]
  tensors["roberta.encoder.layer.0.output.dense.bias"] = np.zeros((65,), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with open(os.path.join(small_roberta_dir, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(ValueError) as error:
    _ours(str(tmp_path), *_random_tokens(0, [4], 4))
  message = str(error.value)
  assert "missing keys" in message and "roberta.encoder.layer.1.attention.self.key.weight" in message
  assert "roberta.encoder.layer.0.output.dense.bias" in message and "expected (64,), got (65,)" in message


def test_roberta_arch_refuses_a_bert_folder(tmp_path):
  config = {field.name: getattr(BertConfig(), field.name) for field in dataclasses.fields(BertConfig)}
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="arch=\"roberta\".*'bert' model"):
    text_tower(_text_config(str(tmp_path))).build(_text_config(str(tmp_path)))


def test_layerwise_remat_gives_the_same_gradients(small_roberta_dir):
  ids, mask = _random_tokens(5, [9, 4], 12)
  tower = text_tower(_text_config(small_roberta_dir))
  plain = tower.build(_text_config(small_roberta_dir))
  rematerialised = tower.build(_text_config(small_roberta_dir), remat=True)
  variables = tower.load(small_roberta_dir, _abstract_variables(plain))

  def gradients(module):
    loss = lambda v: jnp.sum(module.apply(v, ids, mask, train=True, rngs={"dropout": _key(1)})[1] ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(variables)

  for a, b in zip(jax.tree.leaves(gradients(plain)), jax.tree.leaves(gradients(rematerialised))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


class _TextWithHead(nn.Module):
  """The DCASE 2025 baseline's text side: the tower's first-token state -> Linear(1024, 1024), L2-normalised."""

  tower: nn.Module
  embed_dim: int = 1024

  @nn.compact
  def __call__(self, input_ids, attention_mask, train: bool):
    _, first = self.tower(input_ids, attention_mask, train)
    x = nn.Dense(self.embed_dim, dtype=self.tower.dtype, name="head")(first).astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


STEP_LAYERS = 2  # The step below runs RoBERTa-large's width and vocabulary at this depth (its layers are alike).


@pytest.mark.slow
def test_roberta_large_fsdp_bf16_remat_step(tmp_path):
  config_dict = dataclasses.asdict(ROBERTA_LARGE)
  (tmp_path / "config.json").write_text(json.dumps(config_dict))
  full_depth = text_tower(_text_config(str(tmp_path))).build(_text_config(str(tmp_path)))
  count = sum(x.size for x in jax.tree.leaves(_abstract_variables(full_depth)["params"]))
  assert 354_000_000 < count < 356_000_000  # RoBERTa-large's 24 layers, read from its config file.
  (tmp_path / "config.json").write_text(json.dumps({**config_dict, "num_hidden_layers": STEP_LAYERS}))
  text_config = _text_config(str(tmp_path))
  text_config.dropout = 0.2
  module = text_tower(text_config).build(text_config, jnp.bfloat16, remat=True)
  model = _TextWithHead(module)
  assert jax.device_count() == 8
  mesh = sharding.create_mesh()
  batch, length = 8, 32
  ids = jnp.zeros((batch, length), jnp.int32)

  def init(rng):
    return model.init(rng, ids, ids, train=False)["params"]

  # Threefry keys: their bits are generated shard by shard (rbg ones whole on every device).
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.state_shardings(abstract, mesh, "fsdp")
  params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))  # born sharded: no whole copy anywhere
  assert "pooler" not in params["tower"]

  big = flax.traverse_util.flatten_dict(params, sep="/")
  assert big["tower/embeddings/word_embeddings/embedding"].shape == (50265, 1024)
  last_layer = f"tower/encoder/layer/{STEP_LAYERS - 1}/intermediate/dense/kernel"
  assert big[last_layer].shape == (1024, 4096)
  for name in ("tower/embeddings/word_embeddings/embedding", last_layer):
    array = big[name]
    assert [shard.data.size for shard in array.addressable_shards] == [array.size // 8] * 8, name
  for name, array in big.items():
    if array.size >= sharding.FSDP_MIN_SIZE:
      assert array.addressable_shards[0].data.size == array.size // 8, name
      assert array.dtype == jnp.float32, name  # parameters stay float32; compute is bf16

  rng = np.random.default_rng(0)
  lengths = rng.integers(4, length + 1, batch)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  tokens = np.where(mask, rng.integers(3, ROBERTA_LARGE.vocab_size, (batch, length)), 1).astype(np.int32)
  tokens[:, 0] = 0
  targets = rng.normal(size=(batch, 1024)).astype(np.float32)
  on_data = sharding.batch_sharding(mesh)
  tokens, mask, targets = (jax.device_put(x, on_data) for x in (tokens, mask, targets))

  def loss_fn(params, tokens, mask, targets, rng):
    embeddings = model.apply({"params": params}, tokens, mask, train=True, rngs={"dropout": rng})
    logits = embeddings @ targets.T / 0.05
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1))), embeddings

  step = jax.jit(
    jax.value_and_grad(loss_fn, has_aux=True),
    out_shardings=((sharding.replicated(mesh), on_data), shardings),
  )
  (loss, embeddings), grads = step(params, tokens, mask, targets, jax.random.key(1))
  assert np.isfinite(float(loss))
  assert np.isfinite(np.asarray(embeddings)).all()
  flat_grads = flax.traverse_util.flatten_dict(grads, sep="/")
  assert all(bool(jnp.isfinite(g).all()) for g in flat_grads.values())
  kernel_grad = flat_grads["tower/encoder/layer/0/attention/self/query/kernel"]
  assert float(jnp.abs(kernel_grad).max()) > 0
  assert kernel_grad.addressable_shards[0].data.size == kernel_grad.size // 8
