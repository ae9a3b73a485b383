"""Orbax checkpoints of the train state: the latest (for automatic resume) and the best by a validation metric; and
the run's config file beside them in the workdir."""

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers, type_handlers

CONFIG_FILE = "config.json"  # The run's config, saved in the workdir beside `checkpoints/`.


def _save_replicas_once_on_cpu() -> None:
  """On the CPU backend, arrays are saved without orbax's replica-parallel writing (each replica writing a slice),
  which compiles a slicing program per array shape in every process: 6.8 s of a tiny model's first save on 8 CPU
  devices, 0.5 s without it. Other backends keep orbax's default."""
  if jax.default_backend() == "cpu":
    type_handlers.register_type_handler(
      jax.Array, type_handlers.ArrayHandler(use_replica_parallel=False), override=True
    )


def create_manager(workdir: str, selection_metric: str) -> ocp.CheckpointManager:
  """Keeps the latest checkpoint and the one with the highest `selection_metric` (both, never more)."""
  _save_replicas_once_on_cpu()

  def metric(metrics):
    return metrics[selection_metric]

  policy = checkpoint_managers.AnyPreservationPolicy(
    [
      checkpoint_managers.LatestN(n=1),
      checkpoint_managers.BestN(get_metric_fn=metric, reverse=False, n=1, keep_checkpoints_without_metrics=False),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    best_fn=metric, best_mode="max", preservation_policy=policy, enable_async_checkpointing=False
  )
  directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
  return ocp.CheckpointManager(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())


def save(manager: ocp.CheckpointManager, step: int, state, metrics: dict | None) -> None:
  """Saves `state` at `step` (synchronously); `metrics` None marks a mid-epoch checkpoint, never the best."""
  metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)
  manager.wait_until_finished()


_MAX_REASON_CHARS = 1000


def _readable(manager: ocp.CheckpointManager, step: int, restore):
  """`restore()`, or an error naming the checkpoint folder when it cannot be read (damaged or truncated files, or a
  model config other than the one that saved it)."""
  try:
    return restore()
  except Exception as error:  # Orbax and TensorStore raise many kinds (ValueError, OSError, their own).
    folder = os.path.join(os.fspath(manager.directory), str(step))
    # TensorStore ends its messages (which name the file it could not read) with kilobytes of JSON specs.
    reason = str(error).split(" [tensorstore_spec")[0]
    reason = reason if len(reason) <= _MAX_REASON_CHARS else reason[:_MAX_REASON_CHARS] + " ..."
    raise ValueError(
      f"the checkpoint of step {step} ({folder}) cannot be read ({type(error).__name__}: {reason}). If the model "
      f"config differs from the one that saved it, restore that config; if the folder is damaged, delete that "
      f"folder to resume from the one before it (steps saved: {list(manager.all_steps())})"
    ) from error


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restores `step` into the structure, dtypes and shardings of `abstract_state` (ShapeDtypeStructs)."""
  return _readable(manager, step, lambda: manager.restore(step, args=ocp.args.StandardRestore(abstract_state)))


def abstract_with_shardings(abstract_state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


def restore_on_one_device(manager: ocp.CheckpointManager, step: int) -> dict:
  """The saved state as nested dicts of arrays on the first local device, whatever topology saved it."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def restore():
    metadata = manager.item_metadata(step).tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))

  return _readable(manager, step, restore)
