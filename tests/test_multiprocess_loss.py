"""Every loss sharded over 2 processes x 2 devices (jax.distributed on localhost) equals the single-process unsharded
loss on the same global batch, value and gradients.

The test spawns this file twice as a worker (``python tests/test_multiprocess_loss.py PROCESS_ID PORT OUT_DIR``);
each worker feeds its half of the global batch with ``jax.make_array_from_process_local_data`` and writes the value
and the gathered gradients of every loss to ``OUT_DIR/process_<id>.npz``.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
GLOBAL_BATCH = 24
CASES = {  # case -> (loss name, chunked, fixed hyper-parameters, initial learnable hyper-parameters or None)
  "triplet_max": ("triplet_max", False, {"margin": 0.2}, None),
  "triplet_sum": ("triplet_sum", False, {"margin": 0.2}, None),
  "triplet_weighted": ("triplet_weighted", False, {"margin": 0.2}, None),
  "ntxent": ("ntxent", False, {}, {"temperature": 0.1}),
  "infonce": ("infonce", False, {}, {"temperature": 0.07}),
  "siglip": ("siglip", False, {}, {}),
  "siglip_chunked": ("siglip", True, {}, {}),
}
WORKER_TIMEOUT_S = 180


def global_batch():
  rng = np.random.default_rng(0)
  audio = rng.normal(size=(GLOBAL_BATCH, 10)).astype(np.float32)
  text = (rng.choice([0.0, 2.5], size=(GLOBAL_BATCH, 1)) * audio + rng.normal(size=(GLOBAL_BATCH, 10))).astype(
    np.float32
  )
  clip_ids = rng.integers(0, 8, size=GLOBAL_BATCH).astype(np.int32)  # repeated, across processes too
  return audio, text, clip_ids


def loss_value_and_grads(case, mesh):
  """(value, {'audio', 'text', loss parameter names...} -> gradient) of one case, as numpy."""
  import jax

  from atr_jax.losses import init_loss_params, make_loss_fn

  name, chunked, fixed, initial = CASES[case]
  params = init_loss_params(name, learnable=initial is not None, **(initial or {}))
  loss_fn = make_loss_fn(name, mesh, "data", chunked=chunked, **fixed)
  audio, text, clip_ids = global_batch()
  if mesh is not None:
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rows = slice(
      jax.process_index() * GLOBAL_BATCH // NUM_PROCESSES, (jax.process_index() + 1) * GLOBAL_BATCH // NUM_PROCESSES
    )
    audio, text, clip_ids = (jax.make_array_from_process_local_data(sharding, x[rows]) for x in (audio, text, clip_ids))
  value, (grad_audio, grad_text, grad_params) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 3)))(
    audio, text, clip_ids, params
  )
  if mesh is not None:
    from jax.experimental import multihost_utils

    grad_audio, grad_text = (multihost_utils.process_allgather(g, tiled=True) for g in (grad_audio, grad_text))
  grads = {"audio": grad_audio, "text": grad_text, **grad_params}
  return float(value), {key: np.asarray(g) for key, g in grads.items()}


def run_worker(process_id: int, port: int, out_dir: str) -> None:
  import jax

  jax.distributed.initialize(f"127.0.0.1:{port}", NUM_PROCESSES, process_id)
  assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS, jax.devices()
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  results = {}
  for case in CASES:
    value, grads = loss_value_and_grads(case, mesh)
    results[f"{case}/value"] = np.asarray(value)
    results.update({f"{case}/grad/{key}": g for key, g in grads.items()})
  np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **results)
  jax.distributed.shutdown()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_losses_equal_unsharded(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": repo,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
  }
  port = free_port()
  workers = [
    subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), str(pid), str(port), str(tmp_path)],
      cwd=repo,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in range(NUM_PROCESSES)
  ]
  try:
    logs = [worker.communicate(timeout=WORKER_TIMEOUT_S)[0] for worker in workers]
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
  for pid, (worker, log) in enumerate(zip(workers, logs)):
    assert worker.returncode == 0, f"worker {pid} failed:\n{log[-4000:]}"

  for pid in range(NUM_PROCESSES):
    got = np.load(tmp_path / f"process_{pid}.npz")
    for case in CASES:
      value, grads = loss_value_and_grads(case, None)
      np.testing.assert_allclose(got[f"{case}/value"], value, rtol=1e-5, err_msg=case)
      assert {key for key in got if key.startswith(f"{case}/grad/")} == {f"{case}/grad/{k}" for k in grads}
      for key, grad in grads.items():
        assert np.abs(grad).max() > 0, (case, key)
        np.testing.assert_allclose(got[f"{case}/grad/{key}"], grad, rtol=1e-4, atol=1e-6, err_msg=f"{case} {key}")


if __name__ == "__main__":
  run_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
