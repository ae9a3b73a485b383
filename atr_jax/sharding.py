"""Device mesh and the global-batch contract.

One mesh axis, 'data', spans every device of every process. A batch is described by its global size; each process
feeds its own slice (global // process_count rows) and `global_batch` assembles them into `jax.Array`s sharded over
'data'. Parameters and optimizer state are replicated (pure data parallelism) or, with FSDP, each large array is
split over 'data' along one dimension (`state_shardings`); XLA gathers them where the step needs them whole.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes (Auto axis type, see SPEC 10)."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


PARAM_SHARDINGS = ("replicated", "fsdp")
FSDP_MIN_SIZE = 2**14  # Arrays with fewer elements stay replicated under FSDP: splitting them saves nothing.


def _fsdp_spec(shape: tuple[int, ...], num_devices: int) -> P:
  """P that splits the largest dimension divisible by the device count (ties: the last), or P() if none is."""
  if int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % num_devices == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*([None] * axis + [DATA_AXIS]))


def state_shardings(abstract_tree, mesh: Mesh, mode: str):
  """NamedShardings for every leaf of `abstract_tree` (ShapeDtypeStructs): replicated, or FSDP ("fsdp")."""
  if mode not in PARAM_SHARDINGS:
    raise ValueError(f"train.param_sharding={mode!r} is not one of {PARAM_SHARDINGS}")
  if mode == "replicated":
    return jax.tree.map(lambda _: replicated(mesh), abstract_tree)
  return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), mesh.size)), abstract_tree)


def check_global_batch(global_batch_size: int, name: str) -> int:
  """Returns the per-process batch size; raises if `global_batch_size` does not split evenly over the devices."""
  if global_batch_size <= 0 or global_batch_size % jax.device_count():
    raise ValueError(
      f"{name}={global_batch_size} must be a positive multiple of the device count "
      f"({jax.device_count()} devices over {jax.process_count()} processes)"
    )
  return global_batch_size // jax.process_count()


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Turns each process's numpy slice of a batch into global arrays sharded over the data axis."""
  sharding = batch_sharding(mesh)
  return {
    key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in local_batch.items()
  }


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) global array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def place_like(new_tree, like_tree):
  """`new_tree` (host arrays) cast to the dtypes of `like_tree` and placed with its shardings, leaf by leaf."""
  return jax.tree.map(
    lambda like, new: jax.device_put(np.asarray(new).astype(like.dtype), like.sharding), like_tree, new_tree
  )
