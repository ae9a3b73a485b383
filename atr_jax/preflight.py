"""What a run checks before any work (data generation or preparation, weight loading, compilation): every folder
and file the config names exists, the text model's tokenizer loads and every weight file the run will read has
readable keys, and the prepared data will hold what the audio tower takes. Each error names the config key, its
value and the path it looked for (or the file it could not read), in seconds rather than after hours of data
preparation."""

import os

import jax
import ml_collections

from atr_jax import tokenization, zeroshot
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


def _text_weight_keys(model_dir: str) -> tuple[str, list[str]]:
  """(path, tensor names) of the weight file a text tower loads from `model_dir` (model.safetensors, else
  pytorch_model.bin, as `models.bert` reads them). A safetensors file is read by its header only."""
  from safetensors import SafetensorError, safe_open

  from atr_jax.models.weights import read_torch_state_dict

  path = os.path.join(model_dir, "model.safetensors")
  if os.path.exists(path):
    try:
      with safe_open(path, "numpy") as f:
        return path, list(f.keys())
    except (OSError, SafetensorError) as error:
      raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from error
  path = os.path.join(model_dir, "pytorch_model.bin")
  if os.path.exists(path):
    return path, list(read_torch_state_dict(path))
  raise FileNotFoundError(f"{model_dir} holds neither model.safetensors nor pytorch_model.bin")


def _audio_variable_keys(directory: str) -> list[str]:
  """The variable names in the converted audio tower folder `directory` (orbax metadata only, no arrays read)."""
  import flax.traverse_util
  import orbax.checkpoint as ocp

  try:
    metadata = ocp.StandardCheckpointer().metadata(directory).item_metadata
  except (OSError, ValueError) as error:
    raise ValueError(f"{directory} is not a readable converted weights folder ({error})") from error
  tree = getattr(metadata, "tree", metadata)
  return ["/".join(key) for key in flax.traverse_util.flatten_dict(dict(tree or {}))]


def check_model_files(model_config: ml_collections.ConfigDict) -> None:
  """The text tower's tokenizer loads (model.text.model_dir, max_len), and every weight file the run reads has
  readable keys: the text model's weights (when model.text.pretrained) and the converted folder of
  model.audio.init_from. Errors name the config key and the file."""
  text = model_config.text
  try:
    tokenization.load_tokenizer(text.model_dir, text.max_len)
    if text.pretrained:
      path, keys = _text_weight_keys(resolve_model_dir(text.model_dir))
      if not keys:
        raise ValueError(f"{path} holds no tensors")
  except (OSError, ValueError) as error:
    kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
    raise kind(f"config.model.text.model_dir={text.model_dir!r}: {error}") from error
  directory = audio_init_dir(model_config)
  if directory is not None and not _audio_variable_keys(directory):
    raise ValueError(
      f"config.model.audio.init_from={model_config.audio.init_from!r}: {directory} holds no converted weights "
      f"(convert the released ones with {convert_command(model_config.audio.arch, directory)})"
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
  check_model_files(config.model)
  relevance_csv = os.path.expanduser(config.eval.relevance_csv)
  if relevance_csv and not os.path.isfile(relevance_csv):
    raise FileNotFoundError(f"config.eval.relevance_csv={config.eval.relevance_csv!r}: {relevance_csv} does not exist")
  if training:
    check_zeroshot(config.eval.zeroshot)
  if jax.process_index() == 0:
    check_data_paths(config.data, training=training)
