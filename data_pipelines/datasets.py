"""Resolves `config.data` to a prepared TFDS builder: generates the synthetic dataset when asked, prepares the
TFRecords on first use (process 0 only; the others wait), and checks that the folder is a Clotho-layout one."""
import os

import ml_collections
from absl import logging

from data_pipelines import clotho, synthetic


def raw_and_data_dirs(data_config: ml_collections.ConfigDict) -> tuple[str, str]:
  if not data_config.raw_dir:
    raise ValueError("config.data.raw_dir is empty: set it to a Clotho-layout folder (see README)")
  if data_config.dataset != "clotho":
    raise ValueError(f"config.data.dataset={data_config.dataset!r} is not supported (supported: 'clotho')")
  raw_dir = os.path.abspath(os.path.expanduser(data_config.raw_dir))
  data_dir = os.path.expanduser(data_config.data_dir) if data_config.data_dir else clotho.default_data_dir(raw_dir)
  return raw_dir, data_dir


def _ensure_raw(raw_dir: str, data_config: ml_collections.ConfigDict) -> None:
  if os.path.isdir(raw_dir):
    return
  if not data_config.generate_synthetic:
    raise FileNotFoundError(f"config.data.raw_dir={raw_dir!r} does not exist")
  spec = data_config.synthetic
  logging.info("Generating the synthetic dataset into %s", raw_dir)
  synthetic.generate(raw_dir, {"development": spec.num_development, "validation": spec.num_validation,
                               "evaluation": spec.num_evaluation}, seed=spec.seed, duration_s=spec.duration_s)


def prepare_builder(data_config: ml_collections.ConfigDict):
  """The prepared builder of `data_config`, made on first use. Safe to call from every process of a job that
  shares a filesystem: process 0 does the work while the others wait at a barrier."""
  import jax
  from jax.experimental import multihost_utils
  raw_dir, data_dir = raw_and_data_dirs(data_config)
  if jax.process_index() == 0:
    _ensure_raw(raw_dir, data_config)
    clotho.prepare(raw_dir, data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("atr_jax_prepare_data")
  return clotho.prepare(raw_dir, data_dir)
