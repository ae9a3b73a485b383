"""Checkpoints: the latest and the best are both kept (and nothing else); restore is exact and sharded; each holds
the data fingerprint it was saved with; a damaged one is named, once nothing of its restore is in flight."""

import asyncio
import glob
import os
import re
import shutil
import threading

import jax
import numpy as np
import optax
import pytest

from atr_jax import checkpointing, sharding, train
from atr_jax.train_state import TrainState


def _state(seed):
  rng = np.random.default_rng(seed)
  params = {"model": {"w": rng.standard_normal((4, 3)).astype(np.float32)}, "loss": {}}
  tx = optax.adam(1e-3)
  state = TrainState.create(
    apply_fn=None,
    params=params,
    tx=tx,
    batch_stats={"mean": rng.standard_normal(3).astype(np.float32)},
    lr_scale=np.float32(0.5),
    best_val_loss=np.float32(rng.random()),
    epochs_without_improvement=np.int32(seed),
  )
  grads = jax.tree.map(lambda p: np.ones_like(p), params)
  return state.apply_gradients(grads=grads)


def test_keeps_latest_and_best_and_restores_exactly(tmp_path):
  mesh = sharding.create_mesh()
  manager = checkpointing.create_manager(str(tmp_path), "t2a_mAP10")
  states = {}
  for step, score in zip([10, 20, 30, 40], [0.5, 0.9, 0.3, 0.4]):
    states[step] = _state(step)
    checkpointing.save(manager, step, states[step], {"t2a_mAP10": score, "t2a_R1": score / 2})
  assert sorted(manager.all_steps()) == [20, 40]
  assert manager.best_step() == 20 and manager.latest_step() == 40

  # A new manager on the same workdir (a restarted run) sees the same steps.
  reopened = checkpointing.create_manager(str(tmp_path), "t2a_mAP10")
  assert reopened.latest_step() == 40 and reopened.best_step() == 20
  template = _state(0)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), template)
  abstract = checkpointing.abstract_with_shardings(jax.eval_shape(lambda: template), shardings)
  restored = checkpointing.restore(reopened, 20, abstract)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(states[20])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert int(restored.step) == 1
  assert restored.params["model"]["w"].sharding == sharding.replicated(mesh)
  assert reopened.metrics(20)["t2a_mAP10"] == 0.9


def test_restore_on_one_device_reads_a_mesh_checkpoint(tmp_path):
  mesh = sharding.create_mesh()
  state = jax.device_put(_state(3), sharding.replicated(mesh))
  manager = checkpointing.create_manager(str(tmp_path), "t2a_mAP10")
  checkpointing.save(manager, 5, state, {"t2a_mAP10": 0.1})
  restored = checkpointing.restore_on_one_device(checkpointing.create_manager(str(tmp_path), "t2a_mAP10"), 5)
  np.testing.assert_array_equal(np.asarray(restored["params"]["model"]["w"]), np.asarray(state.params["model"]["w"]))
  assert len(restored["batch_stats"]["mean"].sharding.device_set) == 1


def test_the_data_fingerprint_is_saved_with_its_step(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), "t2a_mAP10")
  fingerprints = {
    step: {"sources": [{"clips": step, "split_sha1": f"{step:040x}"}], "steps_per_epoch": step // 2} for step in (4, 6)
  }
  for step, data in fingerprints.items():
    checkpointing.save(manager, step, _state(step), {"t2a_mAP10": step / 10}, data=data)
  checkpointing.save(manager, 8, _state(8), None)  # Saved without one (as by an older version).
  reopened = checkpointing.create_manager(str(tmp_path), "t2a_mAP10")
  assert {step: checkpointing.saved_data_fingerprint(reopened, step) for step in (6, 8)} == {
    6: fingerprints[6],
    8: None,
  }
  # In the step's own folder: deleting the folder deletes its fingerprint.
  with open(os.path.join(tmp_path, "checkpoints", "6", "_CHECKPOINT_METADATA")) as f:
    assert f'"split_sha1": "{6:040x}"' in f.read()


def test_a_failed_restore_ends_after_the_reads_in_flight(tmp_path):
  """Orbax restores in an event loop it makes and closes; when one read fails, the others complete later on
  TensorStore's threads and post their results to that loop. Each must find it open (else each prints "RuntimeError:
  Event loop is closed"), and the error comes once they are done."""
  manager = checkpointing.create_manager(str(tmp_path), "t2a_mAP10")
  checkpointing.save(manager, 3, _state(3), {"t2a_mAP10": 0.5})
  release, threads, posted, refused = threading.Event(), [], [], []

  def complete_later(loop, future, value):  # A TensorStore thread finishing a read.
    release.wait()
    try:
      loop.call_soon_threadsafe(future.set_result, value)
      posted.append(value)
    except RuntimeError as error:
      refused.append(str(error))

  async def read(value):
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    threads.append(threading.Thread(target=complete_later, args=(loop, future, value)))
    threads[-1].start()
    return await future

  async def damaged():
    release.set()
    raise OSError("Requested byte range [0, 24401) is not valid for value of size 12200")

  async def read_all():
    return await asyncio.gather(*(read(i) for i in range(8)), damaged())

  def restore():  # As orbax's asyncio_utils.run_sync: a new loop, closed when the restore ends.
    loop = asyncio.new_event_loop()
    try:
      return loop.run_until_complete(read_all())
    finally:
      loop.close()

  with pytest.raises(checkpointing.CheckpointError, match=r"step 3 .* cannot be read \(OSError: Requested byte range"):
    checkpointing._readable(manager, 3, restore)
  for thread in threads:
    thread.join()
  assert refused == [] and sorted(posted) == list(range(8))
  assert type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy  # Put back.


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named(tiny_trained, tmp_path):
  config, trained = tiny_trained
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  manager = checkpointing.create_manager(workdir, "t2a_mAP10")
  step = manager.best_step()
  for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "*"), recursive=True):
    if os.path.isfile(path) and "/d/" in path:  # The array data files.
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 2, 1))
  with pytest.raises(
    ValueError,
    match=rf"the checkpoint of step {step} \(.*checkpoints/{step}\) cannot be read.*"
    r"delete that folder",
  ) as error:
    train.evaluate_best(config, workdir)
  assert re.search(rf"checkpoints/{step}/.*/d/[0-9a-f]+", str(error.value))  # The damaged file, named.
  assert "tensorstore_spec" not in str(error.value) and len(str(error.value)) < 2000  # Without TensorStore's specs.
