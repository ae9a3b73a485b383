"""Tests of PANNs checkpoint import (atr_jax.models.panns, scripts.convert_weights): safe reading of released-layout
files, the name/layout mapping and its errors, and parity of the converted Flax CNN14 / ResNet38 towers with the
PyTorch references of tests/torch_panns.py, from log-mels and from waveforms."""

import os
import zipfile

import jax
import numpy as np
import pytest
import torch
import transformers

from atr_jax import sharding
from atr_jax.models import panns, weights
from atr_jax.models.cnn14 import Cnn14
from atr_jax.models.dual_encoder import build_model
from atr_jax.models.registry import audio_tower
from atr_jax.models.resnet38 import ResNet38
from atr_jax.train_state import create_train_state, make_optimizer
from configs.base import get_base_config
from data_pipelines import features
from scripts import convert_weights
from tests import torch_panns

NARROW_CNN14 = (8, 16, 32, 64, 128, 256)
NARROW_RESNET = dict(widths=(8, 16, 32, 64), blocks=(3, 4, 6, 3), out_features=128)


def _towers(arch: str, last_pool=(2, 2)):
  """(torch reference with random weights, our Flax tower of the same shape)."""
  if arch == "cnn14":
    return (
      torch_panns.randomize(torch_panns.Cnn14(NARROW_CNN14, last_pool), seed=1),
      Cnn14(channels=NARROW_CNN14, last_pool=last_pool),
    )
  return (
    torch_panns.randomize(torch_panns.ResNet38(**NARROW_RESNET, block_dropout=0.1), seed=2),
    ResNet38(**NARROW_RESNET, block_dropout_rate=0.1),
  )


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def test_released_layout_loads_weights_only_despite_numpy1_sampler(tmp_path):
  reference, _ = _towers("cnn14")
  path = str(tmp_path / "Cnn14.pth")
  torch_panns.save_panns_checkpoint(reference, path)
  with zipfile.ZipFile(path) as archive:
    pickled = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
  assert b"numpy.core.multiarray" in pickled and b"numpy._core" not in pickled  # really numpy 1.x names
  with pytest.raises(Exception, match="Weights only load failed"):
    torch.load(path, map_location="cpu", weights_only=True)  # a bare weights-only load refuses the sampler
  state_dict = panns.read_panns_state_dict(path)
  assert set(state_dict) == set(reference.state_dict())
  np.testing.assert_array_equal(
    state_dict["conv_block2.conv1.weight"], reference.conv_block2.conv1.weight.detach().float().numpy()
  )


def test_read_rejects_a_file_without_model_state_dict(tmp_path):
  path = str(tmp_path / "bad.pth")
  torch.save({"iteration": 1}, path)
  with pytest.raises(ValueError, match='bad.pth.*"model"'):
    panns.read_panns_state_dict(path)


@pytest.mark.parametrize("arch,last_pool", [("cnn14", (2, 2)), ("cnn14", (1, 1)), ("resnet38", (2, 2))])
def test_converted_tower_matches_pytorch_from_log_mel_and_waveform(tmp_path, arch, last_pool):
  reference, tower = _towers(arch, last_pool)
  checkpoint = str(tmp_path / f"{arch}.pth")
  torch_panns.save_panns_checkpoint(reference, checkpoint)
  out_dir = convert_weights.convert(checkpoint, tower, str(tmp_path / "converted"))
  variables = weights.load_audio_variables(out_dir, convert_weights.tower_variables_shape(tower), arch)
  embed = jax.jit(lambda x, m: tower.apply(variables, x, m, train=False))
  rng = np.random.default_rng(3)

  log_mel = rng.normal(-40.0, 15.0, (2, 203, torch_panns.NUM_MELS)).astype(np.float32)
  ours = np.asarray(embed(log_mel, np.ones(log_mel.shape[:2], bool)))
  with torch.no_grad():
    expected = reference(torch.tensor(log_mel, dtype=torch.float64)).numpy()
  assert ours.shape == expected.shape == (2, tower.channels[-1] if arch == "cnn14" else tower.out_features)
  assert _relative_error(ours, expected) < 1e-4

  waveform = (0.1 * rng.standard_normal((2, 2 * 32000 + 123))).astype(np.float32)
  waveform[1] *= np.linspace(0.0, 3.0, waveform.shape[1], dtype=np.float32)  # distinct loudness profile
  log_mels = np.stack([features.log_mel(row) for row in waveform])
  ours = np.asarray(embed(log_mels, np.ones(log_mels.shape[:2], bool)))
  with torch.no_grad():
    expected = reference.embed_waveform(torch.tensor(waveform, dtype=torch.float64)).numpy()
  assert _relative_error(ours, expected) < 1e-4
  assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()


def test_mapping_reports_missing_unexpected_and_misshaped_keys_at_once():
  reference, tower = _towers("cnn14")
  state_dict = {name: tensor.float().numpy() for name, tensor in reference.state_dict().items()}
  del state_dict["conv_block3.bn2.running_var"]
  state_dict["conv_block1.conv2.weight"] = np.zeros((8, 8, 5, 5), np.float32)
  state_dict["conv_block7.conv1.weight"] = np.zeros((4, 4, 3, 3), np.float32)
  state_dict["mystery_buffer"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as error:
    panns.state_dict_to_variables(state_dict, convert_weights.tower_variables_shape(tower), "my.pth")
  message = str(error.value)
  assert "my.pth" in message
  # Keys and shapes as in the user's file ((O, I, kh, kw) conv weights), the model's key beside.
  assert "missing keys" in message and "conv_block3.bn2.running_var (model: batch_stats/conv_block3/bn2/var)" in message
  assert (
    "shape mismatches" in message
    and "conv_block1.conv2.weight (model: params/conv_block1/conv2/kernel): expected (8, 8, 3, 3), got (8, 8, 5, 5)"
    in message
  )
  assert (
    "unexpected keys" in message
    and "conv_block7.conv1.weight (model: params/conv_block7/conv1/kernel)" in message
    and "'mystery_buffer'" in message
  )


def test_mapping_layouts_and_skipped_entries():
  reference, tower = _towers("resnet38")
  state_dict = {name: tensor.float().numpy() for name, tensor in reference.state_dict().items()}
  variables = panns.state_dict_to_variables(state_dict, convert_weights.tower_variables_shape(tower), "x.pth")
  block = variables["params"]["resnet"]["layer2"]["0"]
  np.testing.assert_array_equal(
    block["conv1"]["kernel"], state_dict["resnet.layer2.0.conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    block["downsample"]["1"]["kernel"][0, 0], state_dict["resnet.layer2.0.downsample.1.weight"][:, :, 0, 0].T
  )
  np.testing.assert_array_equal(block["downsample"]["2"]["scale"], state_dict["resnet.layer2.0.downsample.2.weight"])
  np.testing.assert_array_equal(variables["batch_stats"]["bn0"]["var"], state_dict["bn0.running_var"])
  assert not {"fc1", "fc_audioset", "logmel_extractor"} & set(variables["params"])


def test_load_audio_variables_errors_name_the_problem(tmp_path):
  _, tower = _towers("cnn14")
  with pytest.raises(FileNotFoundError, match=r"init_from.*Cnn14_mAP=0\.431\.pth.*--arch cnn14"):
    weights.load_audio_variables(str(tmp_path / "absent"), convert_weights.tower_variables_shape(tower), "cnn14")
  reference, _ = _towers("cnn14")
  checkpoint = str(tmp_path / "c.pth")
  torch_panns.save_panns_checkpoint(reference, checkpoint)
  out_dir = convert_weights.convert(checkpoint, tower, str(tmp_path / "converted"))
  wider = Cnn14(channels=(8, 16, 32, 64, 128, 512))
  with pytest.raises(ValueError, match=r"shape mismatches.*conv_block6/conv1/kernel"):
    weights.load_audio_variables(out_dir, convert_weights.tower_variables_shape(wider), "cnn14")


def test_create_train_state_starts_the_audio_tower_from_init_from(tmp_path):
  reference, tower = _towers("cnn14")
  checkpoint = str(tmp_path / "c.pth")
  torch_panns.save_panns_checkpoint(reference, checkpoint)
  converted = convert_weights.convert(checkpoint, tower, str(tmp_path / "converted"))
  transformers.BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=16,
  ).save_pretrained(str(tmp_path / "bert"))
  config = get_base_config()
  config.data.train_max_frames = 64
  config.model.audio.channels = NARROW_CNN14
  config.model.audio.init_from = converted
  config.model.text.model_dir, config.model.text.pretrained, config.model.text.max_len = (
    str(tmp_path / "bert"),
    False,
    8,
  )
  config.model.embed_dim, config.model.head_hidden = 16, 32
  model = build_model(config.model)
  tx, _ = make_optimizer(config.optim, steps_per_epoch=10)
  state, _ = create_train_state(config, model, tx, sharding.create_mesh(), jax.random.key(0, impl="rbg"))
  expected = weights.load_audio_variables(converted, convert_weights.tower_variables_shape(tower), "cnn14")
  jax.tree.map(np.testing.assert_array_equal, state.params["model"]["audio"], expected["params"])
  jax.tree.map(np.testing.assert_array_equal, state.batch_stats["audio"], expected["batch_stats"])
  np.testing.assert_array_equal(
    state.params["model"]["audio"]["conv_block1"]["conv1"]["kernel"],
    reference.conv_block1.conv1.weight.detach().float().numpy().transpose(2, 3, 1, 0),
  )


@pytest.mark.parametrize("arch", ["cnn14", "resnet38"])
def test_cli_converts_full_size_released_layout(tmp_path, arch):
  reference = (torch_panns.Cnn14() if arch == "cnn14" else torch_panns.ResNet38()).eval()
  checkpoint = str(tmp_path / f"{arch}.pth")
  torch_panns.save_panns_checkpoint(reference, checkpoint)
  out_dir = convert_weights.main(["--checkpoint", checkpoint, "--arch", arch, "--out", str(tmp_path / "out")])
  assert os.path.isdir(out_dir)
  audio_config = get_base_config().model.audio
  audio_config.arch = arch
  tower = audio_tower(audio_config).build(audio_config)
  variables = weights.load_audio_variables(out_dir, convert_weights.tower_variables_shape(tower), arch)
  conv = "conv_block_after1" if arch == "resnet38" else "conv_block6"
  np.testing.assert_array_equal(
    variables["params"][conv]["conv2"]["kernel"],
    getattr(reference, conv).conv2.weight.detach().numpy().transpose(2, 3, 1, 0),
  )
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
  assert count == sum(
    p.numel() for name, p in reference.named_parameters() if not name.startswith(("fc", "logmel_extractor"))
  )
  if arch == "cnn14":
    assert count == 75_477_440  # SPEC 3: the conv part of the reference's CNN14 (bn0 and BNs included)


def test_a_damaged_panns_file_is_named(tmp_path):
  reference, _ = _towers("cnn14")
  checkpoint = str(tmp_path / "c.pth")
  torch_panns.save_panns_checkpoint(reference, checkpoint)
  with open(checkpoint, "r+b") as f:
    f.truncate(os.path.getsize(checkpoint) // 2)
  with pytest.raises(ValueError, match=r"c\.pth is not a readable PyTorch checkpoint"):
    panns.read_panns_state_dict(checkpoint)
