"""What a run checks before any work (data generation or preparation, weight loading, compilation): every folder
and file the config names exists, and the prepared data will hold what the audio tower takes. Each error names the
config key, its value and the path it looked for."""

import os

import jax
import ml_collections

from atr_jax import zeroshot
from atr_jax.models.hf_hub import resolve_model_dir
from atr_jax.models.weights import SCRATCH, audio_init_dir, convert_command
from atr_jax.models.registry import audio_tower
from data_pipelines import audio_forms, datasets, layouts


def check_audio_feature(config: ml_collections.ConfigDict) -> None:
  """config.data.audio_feature is a known stored form and the one model.audio.arch takes."""
  form = audio_forms.audio_form(config.data.audio_feature)
  takes = audio_tower(config.model.audio).inputs[0]
  if form.name != takes:
    raise ValueError(
      f"config.data.audio_feature={form.name!r}, but model.audio.arch={config.model.audio.arch!r} takes {takes!r}: "
      f"set config.data.audio_feature={takes!r} (prepared into its own folder)"
    )


def check_model_paths(model_config: ml_collections.ConfigDict) -> None:
  """The text tower's folder (or hub name) and the audio tower's initial weights exist."""
  resolve_model_dir(model_config.text.model_dir)
  directory = audio_init_dir(model_config)
  if directory is not None and not os.path.isdir(directory):
    raise FileNotFoundError(
      f"config.model.audio.init_from={model_config.audio.init_from!r}: {directory} does not exist. Convert the "
      f"released weights once ({convert_command(model_config.audio.arch, directory)}), point the key at the converted "
      f"folder, or set it to {SCRATCH!r} to start the audio tower from random weights"
    )


def _check_split_source(dataset: str, raw_dir: str, split: str, key: str) -> None:
  layout = layouts.find(dataset, raw_dir)
  where = (
    f"the {layout.name} {dataset} layout of {raw_dir}"
    if layout.present()
    else f"{raw_dir} is in no {dataset} layout: looked for {layouts.looked_for(dataset, raw_dir)}"
  )
  if split not in layout.splits:
    raise ValueError(f"{key}={split!r} is not a split of {where} (its splits: {list(layout.splits)})")
  if not layout.splits[split].present():
    raise FileNotFoundError(f"{key}={split!r}: {layout.splits[split].path} does not exist ({where})")


def check_data_paths(data_config: ml_collections.ConfigDict, *, training: bool) -> None:
  """The raw folders and the caption CSVs of the splits the run reads exist: the test split (and, when `training`,
  the training and validation splits and every config.data.extra_train source). A raw folder the run generates
  (data.generate_synthetic) passes."""
  raw_dir, _ = datasets.raw_and_data_dirs(data_config)
  keys = ("train_split", "val_split", "test_split") if training else ("test_split",)
  if not os.path.isdir(raw_dir):
    if data_config.generate_synthetic:
      return
    raise FileNotFoundError(f"config.data.raw_dir={data_config.raw_dir!r}: {raw_dir} does not exist")
  for key in keys:
    _check_split_source(data_config.dataset, raw_dir, data_config[key], f"config.data.{key}")
  if training:
    for dataset, extra_dir, split in datasets.parse_extra_train(data_config.extra_train):
      if not os.path.isdir(extra_dir):
        raise FileNotFoundError(
          f"config.data.extra_train entry {dataset}:{extra_dir}:{split}: {extra_dir} does not exist"
        )
      _check_split_source(dataset, extra_dir, split, f"config.data.extra_train entry {dataset}:{extra_dir}:{split}")


def check_zeroshot(zeroshot_config: ml_collections.ConfigDict) -> None:
  """The zero-shot set of config.eval.zeroshot (evaluated during training) exists, unless it is to be generated,
  and its prompts each hold one "{}"."""
  if zeroshot.enabled(zeroshot_config):
    zeroshot.check_prompts(zeroshot_config.prompts, "config.eval.zeroshot.prompts")
  if zeroshot_config.dataset and not zeroshot_config.generate_synthetic:
    root = os.path.expanduser(zeroshot_config.root)
    if not root or not os.path.isdir(root):
      raise FileNotFoundError(
        f"config.eval.zeroshot.root={zeroshot_config.root!r}: no {zeroshot_config.dataset} folder there "
        f"(config.eval.zeroshot.dataset={zeroshot_config.dataset!r})"
      )
  csv_path = os.path.expanduser(zeroshot_config.csv)
  if csv_path and not os.path.isfile(csv_path):
    raise FileNotFoundError(f"config.eval.zeroshot.csv={zeroshot_config.csv!r}: {csv_path} does not exist")


def check(config: ml_collections.ConfigDict, *, training: bool) -> None:
  """Every path a training (or, with training=False, a test-only) run needs. Raw data is checked by process 0 only,
  the process that prepares it."""
  check_audio_feature(config)
  check_model_paths(config.model)
  relevance_csv = os.path.expanduser(config.eval.relevance_csv)
  if relevance_csv and not os.path.isfile(relevance_csv):
    raise FileNotFoundError(f"config.eval.relevance_csv={config.eval.relevance_csv!r}: {relevance_csv} does not exist")
  if training:
    check_zeroshot(config.eval.zeroshot)
  if jax.process_index() == 0:
    check_data_paths(config.data, training=training)
