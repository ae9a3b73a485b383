"""Tests of `scripts.convert_weights` as a user meets it and of the converted towers' folders (`models.weights`): a
user error ends the command with one line naming the problem and the file (no traceback, exit status 1), misshaped
keys are shown in the file's own names and layout, and a missing `model.audio.init_from` folder names the configured
tower's released file and convert command (PaSST's for arch=passt, not PANNs')."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from atr_jax.models import dual_encoder, weights
from configs.base import get_base_config
from tests import torch_panns

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "scripts.convert_weights", *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
  """The single stderr line of a command that failed on a user error."""
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert not os.path.exists(result.args[-1])  # nothing written to --out
  return lines[0]


@pytest.mark.slow
def test_cli_user_errors_are_one_line_naming_the_file(tmp_path):
  out = str(tmp_path / "out")
  missing = str(tmp_path / "Cnn14_mAP=0.431.pth")
  line = _one_line_error(_convert("--checkpoint", missing, "--arch", "cnn14", "--out", out))
  assert missing in line and "no such file" in line

  # A narrow CNN14 in PANNs' layout converted as the full-size CNN14: conv weights shown (O, I, kh, kw), as the
  # file holds them (Flax's layout would read (3, 3, 1, 8)).
  narrow = str(tmp_path / "narrow.pth")
  torch_panns.save_panns_checkpoint(torch_panns.Cnn14((8, 16, 32, 64, 128, 256)), narrow)
  line = _one_line_error(_convert("--checkpoint", narrow, "--arch", "cnn14", "--out", out))
  assert narrow in line and "shape mismatches" in line
  assert (
    "conv_block1.conv1.weight (model: params/conv_block1/conv1/kernel): expected (64, 1, 3, 3), got (8, 1, 3, 3)"
    in (line)
  )

  # The PANNs file ({'iteration', 'model', 'sampler'}) given as PaSST's bare state_dict.
  line = _one_line_error(_convert("--checkpoint", narrow, "--arch", "passt", "--out", out))
  assert narrow in line and "unexpected layout" in line and "'iteration'" in line

  # Not a PyTorch file at all.
  garbage = tmp_path / "passt.pt"
  garbage.write_bytes(b"not a checkpoint")
  line = _one_line_error(_convert("--checkpoint", str(garbage), "--arch", "passt", "--out", out))
  assert f"{garbage} is not a readable PyTorch checkpoint" in line


def test_a_bare_state_dict_reader_names_a_nested_layout(tmp_path):
  path = str(tmp_path / "c.pth")
  torch.save({"iteration": 3, "model": {"w": torch.zeros(2)}}, path)
  with pytest.raises(ValueError, match=r"c\.pth has an unexpected layout: expected a state_dict.*'iteration' holds"):
    weights.read_torch_state_dict(path)
  assert set(weights.read_torch_state_dict(path, entry="model")) == {"w"}


def test_torch_shape_is_the_inverse_of_the_mappings():
  kernel = np.zeros((3, 5, 7, 11))  # (O, I, kh, kw) = (3, 5, 7, 11) in the file
  assert weights.torch_shape("params/conv/kernel", kernel.transpose(2, 3, 1, 0).shape) == kernel.shape
  assert weights.torch_shape("params/fc/kernel", (5, 3)) == (3, 5)
  assert weights.torch_shape("params/fc/bias", (3,)) == (3,)
  assert weights.torch_shape("params/norm/scale", (3,)) == (3,)


@pytest.mark.parametrize(
  "arch,released", [("passt", "passt-s-f128-p16-s16-ap.468.pt"), ("cnn14", "Cnn14_mAP=0.431.pth")]
)
def test_a_missing_init_from_folder_names_the_towers_file_and_command(tmp_path, arch, released):
  model_config = get_base_config().model
  model_config.audio.arch = arch
  model_config.audio.init_from = str(tmp_path / "converted")
  model_config.text.pretrained = False
  variables = {"params": {"audio": {"w": np.zeros(2)}, "text": {}}}
  with pytest.raises(FileNotFoundError) as error:
    dual_encoder.load_pretrained(variables, model_config)
  message = str(error.value)
  assert f"{tmp_path / 'converted'} is not a directory" in message
  assert released in message and f"--arch {arch} --out {tmp_path / 'converted'}" in message
  assert ("PANNs" not in message and ".pth" not in message) if arch == "passt" else ".pt " not in message

  (tmp_path / "converted").mkdir()  # a folder, but no converted weights in it
  with pytest.raises(FileNotFoundError, match=f"holds no converted {arch} weights.*{released}"):
    dual_encoder.load_pretrained(variables, model_config)
