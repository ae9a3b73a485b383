"""`all_gather` for code inside `jax.shard_map`: `jax.lax.all_gather` whose gradient avoids gloo's reduce-scatter
where XLA:CPU runs collectives through gloo (CPU devices with jax.distributed initialized, e.g. multi-process runs).

The gradient of an all-gather is a reduce-scatter, which XLA:CPU runs with gloo's ReduceScatterHalvingDoubling. Its
bound-buffer sends set each TCP connection's SO_SNDBUF to the message size (a few KB for the loss's embeddings):
Linux then no longer autotunes those send buffers (they stay at ~32 KB instead of ~4 MB), and every later
collective over them, the step's ~100 MB gradient all-reduce included, crawls with the CPUs idle: ~70 s per demo
step as 2 processes x 2 devices instead of ~1.5 s (issue 18). gloo's reduce-scatter also returns wrong values for
chunks above 256 KiB (jax-ml/jax#40830). Here the gradient is an all-reduce (gloo's unbound-buffer ring) followed by
this device's rows instead: the same values. GPU, TPU and single-process CPU runs keep XLA's reduce-scatter.
"""

import functools

import jax
import jax.numpy as jnp


def gloo_reduce_scatter_in_use() -> bool:
  """Whether XLA runs this job's collectives through gloo: CPU devices with jax.distributed initialized (then even
  the devices of one process communicate through gloo)."""
  return jax.distributed.is_initialized() and jax.default_backend() == "cpu"


def all_gather(x: jax.Array, axis_name: str, *, all_reduce_gradient: bool | None = None) -> jax.Array:
  """`jax.lax.all_gather(x, axis_name, tiled=True)`; its gradient is an all-reduce and a slice instead of a
  reduce-scatter when `all_reduce_gradient` is True (None: `gloo_reduce_scatter_in_use()`)."""
  if all_reduce_gradient is None:
    all_reduce_gradient = gloo_reduce_scatter_in_use()
  if not all_reduce_gradient or not jnp.issubdtype(x.dtype, jnp.inexact):
    return jax.lax.all_gather(x, axis_name, tiled=True)
  return _all_gather_all_reduce_gradient(x, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _all_gather_all_reduce_gradient(x, axis_name):
  return jax.lax.all_gather(x, axis_name, tiled=True)


def _forward(x, axis_name):
  return jax.lax.all_gather(x, axis_name, tiled=True), x.shape[0]


def _backward(axis_name, rows, gathered_grad):
  total = jax.lax.psum(gathered_grad, axis_name)
  start = jax.lax.axis_index(axis_name) * rows
  return (jax.lax.dynamic_slice_in_dim(total, start, rows),)


_all_gather_all_reduce_gradient.defvjp(_forward, _backward)
