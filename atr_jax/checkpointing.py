"""Orbax checkpoints of the train state: the latest (for automatic resume) and the best by a validation metric, each
with the fingerprint of the data it was trained on in its step metadata; and the run's config file beside them in the
workdir. A checkpoint that cannot be read ends with one error (`CheckpointError`), after the reads still in flight."""

import asyncio
import contextlib
import os

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers, type_handlers

CONFIG_FILE = "config.json"  # The run's config, saved in the workdir beside `checkpoints/`.
_DATA_KEY = "data"  # The data fingerprint's key in a step's custom metadata.
_DRAIN_TIMEOUT_S = 300.0  # Longest wait for the reads a failed restore left in flight.


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, or a run that cannot be resumed as asked: a user error, whose message says
  what to do (the command line prints it alone)."""


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


def save(manager: ocp.CheckpointManager, step: int, state, metrics: dict | None, data: dict | None = None) -> None:
  """Saves `state` at `step` (synchronously); `metrics` None marks a mid-epoch checkpoint, never the best. `data`,
  the fingerprint of the training data (`resume.data_fingerprint`), goes into the step's metadata, which orbax
  writes into the step's temporary folder before renaming it: a checkpoint has it or does not exist."""
  metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
  custom_metadata = None if data is None else {_DATA_KEY: data}
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, custom_metadata=custom_metadata)
  manager.wait_until_finished()


def saved_data_fingerprint(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The data fingerprint saved with the checkpoint of `step` (`save`); None when it has none (an older version).
  Reads the step's metadata file only, none of the arrays."""
  folder = os.path.join(os.fspath(manager.directory), str(step))
  metadata = _readable(manager, step, lambda: ocp.metadata.get_step_metadata(folder))
  return (metadata.custom_metadata or {}).get(_DATA_KEY)


_MAX_REASON_CHARS = 1000


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that runs its unfinished tasks to their end before it closes. Orbax restores in a loop of its own
  that it closes when the restore ends; when the read of one array fails, those of the others are still in flight
  in TensorStore, which would post their completions to the closed loop (a "RuntimeError: Event loop is closed"
  traceback each, hundreds after the error, some at interpreter exit)."""

  def close(self) -> None:
    while not self.is_closed() and not self.is_running() and (pending := asyncio.all_tasks(self)):
      done, not_done = self.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_TIMEOUT_S))
      for task in done:
        if not task.cancelled():
          task.exception()  # Retrieved: the restore's error is the one that counts.
      if not_done:
        logging.warning("%d checkpoint reads still pending after %.0f s: left behind", len(not_done), _DRAIN_TIMEOUT_S)
        break
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingEventLoop()


@contextlib.contextmanager
def _draining_event_loops():
  """Within it, new event loops (those orbax makes to restore) drain their tasks before they close."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def _readable(manager: ocp.CheckpointManager, step: int, restore):
  """`restore()`, or a CheckpointError naming the checkpoint folder when it cannot be read (damaged or truncated
  files, or a model config other than the one that saved it), raised once nothing of the restore is in flight."""
  try:
    with _draining_event_loops():
      return restore()
  except Exception as error:  # Orbax and TensorStore raise many kinds (ValueError, OSError, their own).
    folder = os.path.join(os.fspath(manager.directory), str(step))
    # TensorStore ends its messages (which name the file it could not read) with kilobytes of JSON specs.
    reason = str(error).split(" [tensorstore_spec")[0]
    reason = reason if len(reason) <= _MAX_REASON_CHARS else reason[:_MAX_REASON_CHARS] + " ..."
    raise CheckpointError(
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
