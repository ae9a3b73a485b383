"""A workdir written by an earlier version (its config.json without keys added since) still loads, with those keys at
their configs/base.py defaults, and its model identity is unchanged by the keys it lacks."""

import json
import os
import shutil

from atr_jax import model_identity
from configs.base import get_base_config


def test_a_workdir_without_newer_keys_loads_with_their_defaults(tiny_trained, tmp_path):
  _, workdir = tiny_trained
  old = str(tmp_path / "old_run")
  shutil.copytree(workdir, old)
  path = os.path.join(old, "config.json")
  with open(path) as f:
    saved = json.load(f)
  batch_size = saved["eval"]["batch_size"]
  del saved["eval"]["max_segment_s"]  # As a run of a version before long clips were cut into segments.
  with open(path, "w") as f:
    json.dump(saved, f)
  config, manager, step = model_identity.read_workdir(old)
  manager.close()
  assert config.eval.max_segment_s == get_base_config().eval.max_segment_s
  assert config.eval.batch_size == batch_size  # Saved values are kept.
  assert step == model_identity.of_workdir(workdir).step
