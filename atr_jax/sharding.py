"""Device mesh and the global-batch contract.

One mesh axis, 'data', spans every device of every process. A batch is described by its global size; each process
feeds its own slice (global // process_count rows) and `global_batch` assembles them into `jax.Array`s sharded over
'data'. Parameters and optimizer state are replicated (pure data parallelism).
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


def check_global_batch(global_batch_size: int, name: str) -> int:
  """Returns the per-process batch size; raises if `global_batch_size` does not split evenly over the devices."""
  if global_batch_size <= 0 or global_batch_size % jax.device_count():
    raise ValueError(f"{name}={global_batch_size} must be a positive multiple of the device count "
                     f"({jax.device_count()} devices over {jax.process_count()} processes)")
  return global_batch_size // jax.process_count()


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Turns each process's numpy slice of a batch into global arrays sharded over the data axis."""
  sharding = batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) global array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def place_like(new_tree, like_tree):
  """`new_tree` (host arrays) cast to the dtypes of `like_tree` and placed with its shardings, leaf by leaf."""
  return jax.tree.map(lambda like, new: jax.device_put(np.asarray(new).astype(like.dtype), like.sharding),
                      like_tree, new_tree)
