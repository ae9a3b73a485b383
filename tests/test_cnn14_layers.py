"""Tests of the fast layers the PANNs towers are built from (atr_jax.models.cnn14): `same_conv` (custom backward
pass), the masked `BatchNorm` and the 16-bit `dropout`, each against PyTorch float64 or exact counts on fresh random
inputs, forward and backward."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atr_jax.models.cnn14 import BN_EPSILON, BatchNorm, Conv3x3, dropout, same_conv


@pytest.mark.parametrize(
  "shape, kernel_size, patch_matmul",
  [
    ((2, 9, 7, 3), (3, 3), False),
    ((3, 6, 5, 4), (1, 1), False),
    ((1, 8, 4, 2), (5, 3), False),
    # Few positions next to the 6 output features, a kernel taller than the input, one input channel.
    ((2, 3, 2, 5), (3, 3), True),
    ((1, 2, 3, 4), (5, 3), True),
    ((2, 9, 7, 1), (3, 3), True),
  ],
)
def test_same_conv_value_and_gradients_match_torch_float64(shape, kernel_size, patch_matmul):
  rng = np.random.default_rng(sum(shape))
  x = rng.normal(size=shape).astype(np.float32)
  kernel = rng.normal(size=(*kernel_size, shape[-1], 6)).astype(np.float32)
  cotangent = rng.normal(size=(*shape[:3], 6)).astype(np.float32)

  y, pullback = jax.vjp(jax.jit(same_conv), jnp.asarray(x), jnp.asarray(kernel))
  dx, dkernel = pullback(jnp.asarray(cotangent))
  assert ("dot_general" in str(jax.make_jaxpr(pullback)(jnp.asarray(cotangent)))) == patch_matmul

  x_t = torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_()
  k_t = torch.tensor(kernel, dtype=torch.float64).permute(3, 2, 0, 1).requires_grad_()
  padding = tuple((size - 1) // 2 for size in kernel_size)
  y_t = torch.nn.functional.conv2d(x_t, k_t, padding=padding)
  y_t.backward(torch.tensor(cotangent, dtype=torch.float64).permute(0, 3, 1, 2))
  np.testing.assert_allclose(y, y_t.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, x_t.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dkernel, k_t.grad.permute(2, 3, 1, 0).numpy(), rtol=1e-4, atol=1e-4)


def test_conv3x3_has_nn_conv_parameter_layout():
  x = jnp.ones((1, 5, 4, 3))
  ours = Conv3x3(7).init(jax.random.key(0), x)
  flax_conv = nn.Conv(7, (3, 3), use_bias=False).init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, flax_conv)
  np.testing.assert_allclose(
    Conv3x3(7).apply(ours, x), nn.Conv(7, (3, 3), use_bias=False).apply(ours, x), rtol=1e-6, atol=1e-6
  )


def _torch_masked_batch_norm(x, mask, scale, bias):
  """Float64 reference: statistics (mean, biased variance) over the masked positions of every axis but the last."""
  weights = mask.to(torch.float64).expand(*x.shape[:-1], 1)
  count = weights.sum()
  mean = (x * weights).sum(dim=tuple(range(x.ndim - 1))) / count
  var = (((x - mean) ** 2) * weights).sum(dim=tuple(range(x.ndim - 1))) / count
  return (x - mean) / torch.sqrt(var + BN_EPSILON) * scale + bias, mean, var


@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_training_matches_torch_float64(masked):
  rng = np.random.default_rng(7 + masked)
  x = rng.normal(1.5, 2.0, (3, 11, 5, 4)).astype(np.float32)
  mask = np.ones((3, 11, 1, 1), bool)
  if masked:
    mask[1, 7:] = mask[2, 3:] = False
  scale, bias = rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)
  running = {"mean": rng.normal(size=4).astype(np.float32), "var": rng.uniform(0.5, 2, 4).astype(np.float32)}
  cotangent = rng.normal(size=x.shape).astype(np.float32)
  module = BatchNorm(use_running_average=False)

  def apply(params, x):
    return module.apply(
      {"params": params, "batch_stats": running}, x, mask=jnp.asarray(mask) if masked else None, mutable=["batch_stats"]
    )

  params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
  y, pullback, updates = jax.vjp(apply, params, jnp.asarray(x), has_aux=True)
  dparams, dx = pullback(jnp.asarray(cotangent))

  x_t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  scale_t = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
  bias_t = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
  y_t, mean_t, var_t = _torch_masked_batch_norm(x_t, torch.tensor(mask), scale_t, bias_t)
  y_t.backward(torch.tensor(cotangent, dtype=torch.float64))
  valid = np.broadcast_to(mask, x.shape)
  np.testing.assert_allclose(np.asarray(y)[valid], y_t.detach().numpy()[valid], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, x_t.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams["scale"], scale_t.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams["bias"], bias_t.grad.numpy(), rtol=1e-4, atol=1e-4)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.9 * running["mean"] + 0.1 * mean_t.detach().numpy(), rtol=1e-5)
  count = valid[..., 0].sum()
  np.testing.assert_allclose(
    stats["var"], 0.9 * running["var"] + 0.1 * var_t.detach().numpy() * count / (count - 1), rtol=1e-5
  )
  if not masked:  # PyTorch's own BatchNorm2d: its running variance is the unbiased one.
    torch_bn = torch.nn.BatchNorm2d(4, eps=BN_EPSILON, momentum=0.1).double().train()
    torch_bn.running_mean.copy_(torch.tensor(running["mean"], dtype=torch.float64))
    torch_bn.running_var.copy_(torch.tensor(running["var"], dtype=torch.float64))
    torch_bn(torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2))
    np.testing.assert_allclose(stats["mean"], torch_bn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], torch_bn.running_var.numpy(), rtol=1e-5)


def test_batch_norm_eval_uses_running_statistics():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 3, 5)).astype(np.float32)
  variables = {
    "params": {"scale": rng.uniform(0.5, 1.5, 5), "bias": rng.normal(size=5)},
    "batch_stats": {"mean": rng.normal(size=5), "var": rng.uniform(0.5, 2.0, 5)},
  }
  variables = jax.tree.map(lambda value: jnp.asarray(value, jnp.float32), variables)
  y = BatchNorm(use_running_average=True).apply(variables, x)
  stats, params = variables["batch_stats"], variables["params"]
  expected = (x - stats["mean"]) / np.sqrt(np.asarray(stats["var"], np.float64) + BN_EPSILON) * params[
    "scale"
  ] + params["bias"]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


class _Dropout(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x, train):
    return dropout(self, x, self.rate, train)


@functools.partial(jax.jit, static_argnames=("rate", "train"))
def _drop(x, seed, rate, train=True):
  return _Dropout(rate).apply({}, x, train, rngs={"dropout": jax.random.key(seed)})


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.05])
def test_dropout_zeroes_the_rate_and_scales_the_rest(rate):
  x = jnp.asarray(np.random.default_rng(5).uniform(1.0, 2.0, (4, 50, 20, 63)), jnp.float32)  # odd channel count
  y = np.asarray(_drop(x, 1, rate))
  dropped = y == 0
  exact_rate = round(rate * 65536) / 65536
  assert abs(exact_rate - rate) <= 2**-17
  assert abs(dropped.mean() - exact_rate) < 4 * np.sqrt(exact_rate * (1 - exact_rate) / x.size)
  np.testing.assert_allclose(y[~dropped], np.asarray(x)[~dropped] / (1 - exact_rate), rtol=1e-6)
  for channel in (0, 62):  # every channel, the padded last one included, is dropped at the rate
    assert abs(dropped[..., channel].mean() - exact_rate) < 0.05
  assert not np.array_equal(dropped, np.asarray(_drop(x, 2, rate)) == 0)
  np.testing.assert_array_equal(y, np.asarray(_drop(x, 1, rate)))


def test_dropout_is_identity_in_eval_and_at_rate_zero():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 4, 5)), jnp.float32)
  np.testing.assert_array_equal(_drop(x, 1, 0.2, train=False), x)
  np.testing.assert_array_equal(_drop(x, 1, 0.0), x)
  np.testing.assert_array_equal(_drop(x, 1, 1.0), np.zeros(x.shape))
