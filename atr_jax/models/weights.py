"""Released checkpoint files -> numpy tensors, the check of mapped weights against a tower's variables, and the
converted audio towers' folders.

Owns: the one reader of safetensors files (`read_safetensors`), the one reader of PyTorch `torch.save` files
(`read_torch_state_dict`: torch's weights-only unpickler with only numpy's array and scalar reconstruction globals
allowed, under their numpy 1.x and 2.x names, so no arbitrary code runs), the key/shape comparison every loader
ends with (`check_params_match`, naming keys and shapes as the file holds them: `torch_shape`), and the orbax folders
of converted audio towers (any `model.audio.arch`): the released file and convert command of each tower
(`RELEASED_FILES`, `convert_command`), the folder `model.audio.init_from` names (`audio_init_dir`), and its writer and
reader (`save_audio_variables`, `load_audio_variables`). torch is needed only to read a PyTorch file, never to train.
"""

import os
from typing import Any, Callable

import flax.traverse_util
import jax.numpy as jnp
import numpy as np


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file as numpy arrays (bfloat16 ones as float32: numpy has no bfloat16)."""
  from safetensors.numpy import load_file

  try:
    return load_file(path)
  except TypeError:  # bfloat16 has no numpy dtype: read through jax instead
    from safetensors.flax import load_file as load_file_jax

    return {name: np.asarray(value.astype(jnp.float32)) for name, value in load_file_jax(path).items()}


def _numpy_safe_globals() -> list:
  """What a numpy array or scalar pickled by numpy 1.x or 2.x needs (and nothing else that numpy defines)."""
  from numpy._core import multiarray

  allowed = [np.ndarray, np.dtype, *{type(np.dtype(code)) for code in np.typecodes["All"]}]  # + DType classes
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
  return allowed


def read_torch_state_dict(path: str, entry: str | None = None) -> dict[str, np.ndarray]:
  """The tensors of the state_dict in a `torch.save` file (the file's object itself, or its `entry`, e.g. PANNs'
  'model'), floating ones as float32 numpy arrays. Read with torch's weights-only unpickler; numpy arrays and
  scalars elsewhere in the file (a sampler state) are allowed. A damaged file, or one without a state_dict where
  expected, raises a ValueError naming it."""
  try:
    import torch
  except ImportError as error:
    raise ImportError(
      f"reading the PyTorch checkpoint {path} needs torch (pip install torch; CPU is enough)"
    ) from error
  path = os.path.expanduser(path)
  try:
    with torch.serialization.safe_globals(_numpy_safe_globals()):
      checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as error:  # A damaged or truncated file, or not a PyTorch file at all.
    raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error
  state_dict = checkpoint.get(entry) if entry is not None and isinstance(checkpoint, dict) else checkpoint
  layout = f'a dict with a "{entry}" state_dict' if entry is not None else "a state_dict (names -> tensors)"
  if not isinstance(state_dict, dict):
    raise ValueError(f"{path} has an unexpected layout: expected {layout}")
  other = next((name for name, value in state_dict.items() if not isinstance(value, torch.Tensor)), None)
  if other is not None:  # e.g. a PANNs file ({'iteration', 'model', 'sampler'}) where a bare state_dict belongs
    found = f"{other!r} holds a {type(state_dict[other]).__name__}, not a tensor (entries: {sorted(state_dict)[:8]})"
    raise ValueError(f"{path} has an unexpected layout: expected {layout}; {found}")
  return {
    name: (tensor.float() if tensor.is_floating_point() else tensor).numpy() for name, tensor in state_dict.items()
  }


def torch_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape PyTorch stores the model variable `key` ('/'-joined) of Flax shape `shape` in: a conv kernel
  (kh, kw, I, O) as (O, I, kh, kw), a dense kernel (I, O) as (O, I); anything else as it is."""
  if key.rsplit("/", 1)[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if key.rsplit("/", 1)[-1] == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def check_params_match(
  expected: Any,
  actual: Any,
  source: str,
  file_key: Callable[[str], str] | None = None,
  file_shape: Callable[[str, tuple[int, ...]], tuple[int, ...]] | None = None,
) -> None:
  """Raises ValueError listing missing keys, unexpected keys and shape mismatches of `actual` vs `expected`
  (nested dicts of arrays or ShapeDtypeStructs; model keys '/'-joined). `file_key` maps a model key to its name
  in the file the user has (e.g. 'conv_block3.bn2.running_var'): keys are then named so, the model key beside.
  `file_shape` (e.g. `torch_shape`) maps a model key and a shape in the model's layout to the file's layout: shape
  mismatches are then shown as the file holds them."""
  expected_flat = flax.traverse_util.flatten_dict(expected, sep="/")
  actual_flat = flax.traverse_util.flatten_dict(actual, sep="/")

  def name(key: str) -> str:  # A key no mapping rule fits is the file's own name already ('/'-free).
    return f"{file_key(key)} (model: {key})" if file_key is not None and "/" in key else key

  def shape(key: str, value) -> tuple[int, ...]:
    return tuple(value.shape) if file_shape is None else file_shape(key, tuple(value.shape))

  missing = [name(key) for key in sorted(set(expected_flat) - set(actual_flat))]
  unexpected = [name(key) for key in sorted(set(actual_flat) - set(expected_flat))]
  mismatched = [
    f"{name(key)}: expected {shape(key, expected_flat[key])}, got {shape(key, actual_flat[key])}"
    for key in sorted(set(expected_flat) & set(actual_flat))
    if tuple(expected_flat[key].shape) != tuple(actual_flat[key].shape)
  ]
  if missing or unexpected or mismatched:
    problems = [
      f"{label}: {items}"
      for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
      if items
    ]
    raise ValueError(f"{source} does not match the model parameters; " + "; ".join(problems))


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


def load_audio_variables(directory: str, expected: dict, arch: str) -> dict:
  """Reads {'params', 'batch_stats' (if any)} saved by `save_audio_variables` as numpy float32 arrays and checks them
  against `expected` (the variables of the audio tower `arch`, a `model.audio.arch`): a ValueError names each
  missing, unexpected or misshaped key; a folder that is absent or holds no converted weights, a FileNotFoundError
  naming `arch`'s released file and the command converting it."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(os.path.expanduser(directory))
  convert = (
    f"convert {RELEASED_FILES.get(arch, f'the released {arch} weights')} with `{convert_command(arch, directory)}`"
  )
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"model.audio.init_from: {directory} is not a directory ({convert})")
  try:
    restored = ocp.StandardCheckpointer().restore(directory)
  except FileNotFoundError as error:
    raise FileNotFoundError(
      f"model.audio.init_from: {directory} holds no converted {arch} weights ({error}): {convert}"
    ) from None
  variables = flax.traverse_util.unflatten_dict(
    {key: np.asarray(value, np.float32) for key, value in flax.traverse_util.flatten_dict(restored).items()}
  )
  expected = {name: expected[name] for name in _CONVERTED if name in expected}
  check_params_match(expected, variables, f"converted {arch} audio variables in {directory}")
  return variables
