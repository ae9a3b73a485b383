"""PANNs checkpoints (SPEC 3) -> Flax audio-tower variables, for both CNN14 and ResNet38.

Owns: the PANNs file layout (`read_panns_state_dict`: the 'model' state_dict of `{'iteration', 'model',
'sampler'}`, read by `weights.read_torch_state_dict`), the name and layout mapping (`state_dict_to_variables`) and
the released-weights loader of the PANNs towers' registry entries (`load`). The converted towers' folders are
`weights`'.

Mapping: PyTorch `a.b.c.weight` -> Flax `a/b/c/kernel` (conv, (O, I, kh, kw) -> (kh, kw, I, O)) or `a/b/c/scale`
(BatchNorm); `bias` -> `bias`; `running_mean`/`running_var` -> batch_stats `mean`/`var`. Skipped, as in the
reference: fc*, spectrogram_extractor*, logmel_extractor*, num_batches_tracked.
"""

import flax.traverse_util
import numpy as np

from atr_jax.models.weights import check_params_match, read_torch_state_dict, torch_shape

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
  mismatches, in the file's own names and layout (`source` names the file in it)."""
  flat = {}
  for name, value in state_dict.items():
    if name.startswith(SKIPPED_PREFIXES) or name.endswith(".num_batches_tracked"):
      continue
    key, array = _flax_key(name, np.asarray(value))
    flat[key] = np.ascontiguousarray(array, dtype=np.float32)
  variables = flax.traverse_util.unflatten_dict(flat)
  expected = {"params": expected["params"], "batch_stats": expected["batch_stats"]}
  check_params_match(expected, variables, source, _torch_key, torch_shape)
  return variables


def load(path: str, expected: dict) -> dict:
  """The {'params', 'batch_stats'} of the PANNs file `path` for the tower whose variables are `expected`."""
  return state_dict_to_variables(read_panns_state_dict(path), expected, path)
