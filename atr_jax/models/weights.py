"""Released checkpoint files -> numpy tensors, and the check of mapped weights against a tower's variables.

Owns: the one reader of safetensors files (`read_safetensors`), the one reader of PyTorch `torch.save` files
(`read_torch_state_dict`: torch's weights-only unpickler with only numpy's array and scalar reconstruction globals
allowed, under their numpy 1.x and 2.x names, so no arbitrary code runs) and the key/shape comparison every loader
ends with (`check_params_match`). torch is needed only to read a PyTorch file, never to train.
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
  if not isinstance(state_dict, dict):
    layout = f'a dict with a "{entry}" state_dict' if entry is not None else "a state_dict"
    raise ValueError(f"{path} has an unexpected layout: expected {layout}")
  return {
    name: (tensor.float() if tensor.is_floating_point() else tensor).numpy() for name, tensor in state_dict.items()
  }


def check_params_match(expected: Any, actual: Any, source: str, file_key: Callable[[str], str] | None = None) -> None:
  """Raises ValueError listing missing keys, unexpected keys and shape mismatches of `actual` vs `expected`
  (nested dicts of arrays or ShapeDtypeStructs; model keys '/'-joined). `file_key` maps a model key to its name
  in the file the user has (e.g. 'conv_block3.bn2.running_var'): keys are then named so, the model key beside."""
  expected_flat = flax.traverse_util.flatten_dict(expected, sep="/")
  actual_flat = flax.traverse_util.flatten_dict(actual, sep="/")

  def name(key: str) -> str:  # A key no mapping rule fits is the file's own name already ('/'-free).
    return f"{file_key(key)} (model: {key})" if file_key is not None and "/" in key else key

  missing = [name(key) for key in sorted(set(expected_flat) - set(actual_flat))]
  unexpected = [name(key) for key in sorted(set(actual_flat) - set(expected_flat))]
  mismatched = [
    f"{name(key)}: expected {tuple(expected_flat[key].shape)}, got {tuple(actual_flat[key].shape)}"
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
