"""PANNs checkpoints (SPEC 3) -> Flax audio-tower variables, for both CNN14 and ResNet38, and the converted towers'
files.

Owns: the PANNs file layout (`read_panns_state_dict`: the 'model' state_dict of `{'iteration', 'model',
'sampler'}`, read by `weights.read_torch_state_dict`), the name and layout mapping (`state_dict_to_variables`), the
released-weights loader of the PANNs towers' registry entries (`load`), and the orbax files of converted towers
(`save_audio_variables`, `load_audio_variables`) that `model.audio.init_from` names (`audio_init_dir`).

Mapping: PyTorch `a.b.c.weight` -> Flax `a/b/c/kernel` (conv, (O, I, kh, kw) -> (kh, kw, I, O)) or `a/b/c/scale`
(BatchNorm); `bias` -> `bias`; `running_mean`/`running_var` -> batch_stats `mean`/`var`. Skipped, as in the
reference: fc*, spectrogram_extractor*, logmel_extractor*, num_batches_tracked.
"""

import os

import flax.traverse_util
import numpy as np

from atr_jax.models.weights import check_params_match, read_torch_state_dict

SKIPPED_PREFIXES = ("fc", "spectrogram_extractor.", "logmel_extractor.")
_BN_STATISTICS = {"running_mean": "mean", "running_var": "var"}


def read_panns_state_dict(path: str) -> dict[str, np.ndarray]:
  """The numpy tensors (floating ones float32) of the 'model' state_dict in a PANNs .pth file."""
  return read_torch_state_dict(path, entry="model")


def _flax_key(name: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """'conv_block1.conv1.weight' -> (('params', 'conv_block1', 'conv1', 'kernel'), HWIO kernel). A name that fits
  no rule comes back as a one-element key, so it is reported as unexpected."""
  *module, leaf = name.split(".")
  if leaf == "weight" and value.ndim == 4:
    return ("params", *module, "kernel"), value.transpose(2, 3, 1, 0)
  if leaf == "weight" and value.ndim == 1:
    return ("params", *module, "scale"), value
  if leaf == "bias" and value.ndim == 1:
    return ("params", *module, "bias"), value
  if leaf in _BN_STATISTICS:
    return ("batch_stats", *module, _BN_STATISTICS[leaf]), value
  return (name,), value


def _torch_key(flax_key: str) -> str:
  """'batch_stats/conv_block3/bn2/var' -> 'conv_block3.bn2.running_var' (the inverse of `_flax_key`)."""
  collection, *module, leaf = flax_key.split("/")
  if collection == "batch_stats":
    leaf = {flax: torch for torch, flax in _BN_STATISTICS.items()}[leaf]
  return ".".join([*module, "bias" if leaf == "bias" else leaf if collection == "batch_stats" else "weight"])


def state_dict_to_variables(state_dict: dict[str, np.ndarray], expected: dict, source: str) -> dict:
  """PANNs state_dict -> {'params', 'batch_stats'} of the audio tower whose variables (arrays or
  ShapeDtypeStructs) are `expected`. Raises one ValueError listing missing keys, unexpected keys and shape
  mismatches (`source` names the file in it)."""
  flat = {}
  for name, value in state_dict.items():
    if name.startswith(SKIPPED_PREFIXES) or name.endswith(".num_batches_tracked"):
      continue
    key, array = _flax_key(name, np.asarray(value))
    flat[key] = np.ascontiguousarray(array, dtype=np.float32)
  variables = flax.traverse_util.unflatten_dict(flat)
  expected = {"params": expected["params"], "batch_stats": expected["batch_stats"]}
  check_params_match(expected, variables, source, _torch_key)
  return variables


def load(path: str, expected: dict) -> dict:
  """The {'params', 'batch_stats'} of the PANNs file `path` for the tower whose variables are `expected`."""
  return state_dict_to_variables(read_panns_state_dict(path), expected, path)


SCRATCH = "scratch"  # model.audio.init_from for a deliberately random audio tower.
_CONVERTED = ("params", "batch_stats")  # The collections of a converted tower (batch_stats: where it has BatchNorm).
# The released file of each audio tower and the command that converts it (format with the output folder).
RELEASED_FILES = {
  "cnn14": "Cnn14_mAP=0.431.pth",
  "resnet38": "ResNet38_mAP=0.434.pth",
  "passt": "passt-s-f128-p16-s16-ap.468.pt",
}


def convert_command(arch: str, out_dir: str) -> str:
  """The command converting the released weights of audio tower `arch` into `out_dir`."""
  released = RELEASED_FILES.get(arch, "RELEASED_FILE")
  return f"python -m scripts.convert_weights --checkpoint {released} --arch {arch} --out {out_dir}"


def audio_init_dir(model_config) -> str | None:
  """The folder whose converted weights initialise the audio tower (`model.audio.init_from`, expanded), or None
  for "scratch"; an empty value is an error (pretrained or random initialisation is always a deliberate choice)."""
  value = model_config.audio.init_from
  if value == SCRATCH:
    return None
  if not value:
    raise ValueError(
      f"config.model.audio.init_from is empty: set it to a converted weights folder "
      f"({convert_command(model_config.audio.arch, 'DIR')}) or to {SCRATCH!r} for a randomly initialised audio tower"
    )
  return os.path.abspath(os.path.expanduser(value))


def save_audio_variables(variables: dict, out_dir: str) -> str:
  """Writes {'params', 'batch_stats' (if any)} with orbax to `out_dir` (replaced if present); returns its absolute
  path."""
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out_dir, {name: variables[name] for name in _CONVERTED if name in variables}, force=True)
  checkpointer.wait_until_finished()
  return out_dir


def load_audio_variables(directory: str, expected: dict) -> dict:
  """Reads {'params', 'batch_stats' (if any)} saved by `save_audio_variables` as numpy float32 arrays and checks them
  against `expected` (the tower's variables): a ValueError names each missing, unexpected or misshaped key."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(os.path.expanduser(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"model.audio.init_from: {directory} is not a directory (convert a PANNs "
      "checkpoint with `python -m scripts.convert_weights`)"
    )
  restored = ocp.StandardCheckpointer().restore(directory)
  variables = flax.traverse_util.unflatten_dict(
    {key: np.asarray(value, np.float32) for key, value in flax.traverse_util.flatten_dict(restored).items()}
  )
  expected = {name: expected[name] for name in _CONVERTED if name in expected}
  check_params_match(expected, variables, f"audio variables in {directory}")
  return variables
