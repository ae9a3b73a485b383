"""atr_jax.collectives: the all-gather whose gradient is an all-reduce gives the values and gradients of
jax.lax.all_gather and compiles without a reduce-scatter; and atr_jax.watchdog names a stalled step."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from atr_jax import collectives, sharding, watchdog


def _loss_and_grad(all_reduce_gradient: bool):
  mesh = sharding.create_mesh()

  def per_device(x, ids):
    gathered = collectives.all_gather(x, "data", all_reduce_gradient=all_reduce_gradient)
    gathered_ids = collectives.all_gather(ids, "data", all_reduce_gradient=all_reduce_gradient)
    weights = jnp.arange(gathered.size, dtype=x.dtype).reshape(gathered.shape) + gathered_ids[:, None]
    return jax.lax.psum((jnp.sin(gathered) * weights).sum() * x.sum(), "data")

  loss = jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  return jax.jit(jax.value_and_grad(loss))


def test_all_gather_with_all_reduce_gradient_matches_lax_all_gather():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2 * jax.device_count(), 3)), jnp.float32)
  ids = jnp.arange(x.shape[0], dtype=jnp.int32)
  expected_loss, expected_grad = _loss_and_grad(False)(x, ids)
  loss, grad = _loss_and_grad(True)(x, ids)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
  assert np.abs(expected_grad).max() > 0  # Every device's rows get a gradient: the comparison is not vacuous.
  assert "reduce-scatter" in _loss_and_grad(False).lower(x, ids).compile().as_text()
  assert "reduce-scatter" not in _loss_and_grad(True).lower(x, ids).compile().as_text()


def test_gloo_is_detected_only_with_jax_distributed_on_cpu():
  assert not jax.distributed.is_initialized()
  assert collectives.gloo_reduce_scatter_in_use() is False


class _Output:
  """A stand-in for a step's output array: ready once `ready` is set."""

  def __init__(self, ready: bool = False):
    self.ready = ready

  def is_ready(self) -> bool:
    return self.ready


def test_watchdog_names_the_first_step_that_does_not_finish():
  stalls, stalled = [], threading.Event()
  watch = watchdog.StepWatchdog(0.4, poll_s=0.05, on_stall=lambda *args: (stalls.append(args), stalled.set()))
  watch.dispatched(1, {"loss": _Output(ready=True)})
  watch.dispatched(2, {"loss": _Output(ready=True), "grad_norm": _Output()})
  watch.dispatched(3, {"loss": _Output()})
  assert stalled.wait(timeout=10), "the watchdog did not fire"
  ((step, last_step, waited, timeout),) = stalls
  assert (step, last_step, timeout) == (2, 1, 0.4) and waited >= 0.4
  message = watchdog.stall_message(step, last_step, waited, timeout)
  assert "process 0 of 1: training step 2 has not finished" in message and "step 1 was the last" in message


def test_watchdog_stays_quiet_while_steps_finish():
  stalled = threading.Event()
  watch = watchdog.StepWatchdog(0.3, poll_s=0.05, on_stall=lambda *args: stalled.set())
  outputs = [_Output() for _ in range(8)]
  for step, output in enumerate(outputs, 1):
    watch.dispatched(step, output)
    output.ready = True
    assert not stalled.wait(timeout=0.1)
  assert not stalled.wait(timeout=0.6)  # Nothing is pending: nothing can stall.


@pytest.mark.parametrize("value, expected", [("", watchdog.DEFAULT_TIMEOUT_S), ("0", 0.0), ("90", 90.0)])
def test_watchdog_timeout_from_the_environment(value, expected):
  assert watchdog.timeout_from_env({watchdog.ENV_VAR: value}) == expected


@pytest.mark.parametrize("value", ["ten", "-1"])
def test_watchdog_rejects_a_bad_timeout(value):
  with pytest.raises(ValueError, match=watchdog.ENV_VAR):
    watchdog.timeout_from_env({watchdog.ENV_VAR: value})


def test_watchdog_is_off_in_a_single_process_job():
  assert watchdog.StepWatchdog.for_this_job().timeout_s == 0
