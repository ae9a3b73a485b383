"""Every loss against an independent float64 numpy implementation of SPEC 5 / SPEC 11 (values and gradients), and
the sharded (all-gather and chunked ring) losses against the unsharded ones on 8 fake devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from atr_jax.losses import (
  TEMPERATURE_RANGE,
  get_loss,
  infonce,
  init_loss_params,
  init_loss_params_from_config,
  learnable_values,
  make_loss_fn,
  make_loss_fn_from_config,
)
from configs.base import get_base_config

LOSS_NAMES = ("triplet_max", "triplet_sum", "triplet_weighted", "ntxent", "infonce", "infonce_multi", "siglip")
FIXED = {
  "triplet_max": {"margin": 0.2},
  "triplet_sum": {"margin": 0.3},
  "triplet_weighted": {"margin": 0.2},
  "ntxent": {"temperature": 0.1},
  "infonce": {"temperature": 0.1},
  "infonce_multi": {"temperature": 0.1},
  "siglip": {"scale": 5.0, "bias": -2.0},
}


def reference_infonce(audio, text, clip_ids, temperature):
  """SPEC 5 InfoNCE written plainly in float64: per row of S and of S^T, same-clip off-diagonal pairs dropped."""
  audio = audio / np.linalg.norm(audio, axis=1, keepdims=True)
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  sim = audio @ text.T / temperature
  n = len(clip_ids)
  total = 0.0
  for matrix in (sim, sim.T):
    for i in range(n):
      kept = [j for j in range(n) if j == i or clip_ids[j] != clip_ids[i]]
      total += np.log(np.sum(np.exp(matrix[i, kept]))) - matrix[i, i]
  return 0.5 * total / n


def unit_similarities(audio, text):
  audio = audio / np.linalg.norm(audio, axis=1, keepdims=True)
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  return audio @ text.T


def reference_triplet(audio, text, clip_ids, margin, reduce):
  """triplet_max (reduce=max) / triplet_sum (reduce=sum): hinge costs over different-clip items, rows of S, S^T."""
  sim = unit_similarities(audio, text)
  n = len(clip_ids)
  total = 0.0
  for matrix in (sim, sim.T):
    for i in range(n):
      costs = [max(0.0, margin + matrix[i, j] - matrix[i, i]) for j in range(n) if clip_ids[j] != clip_ids[i]]
      total += reduce(costs) if costs else 0.0
  return total / n


def reference_triplet_weighted(audio, text, clip_ids, margin):
  sim = unit_similarities(audio, text)
  n = len(clip_ids)
  total = 0.0
  for matrix in (sim, sim.T):
    for i in range(n):
      p = matrix[i, i]
      hard = [matrix[i, j] for j in range(n) if clip_ids[j] != clip_ids[i] and matrix[i, j] + margin > p]
      if hard:
        hardest = max(hard)
        total += max(0.0, 0.2 * p**2 - 0.7 * p + 0.5) + max(0.0, 0.9 * hardest**2 - 0.4 * hardest + 0.03)
  return total / n


def reference_ntxent(audio, text, clip_ids, temperature):
  """Cross entropy of S / tau with the diagonal as target, both directions, every off-diagonal pair a negative."""
  sim = unit_similarities(audio, text) / temperature
  total = 0.0
  for matrix in (sim, sim.T):
    for i in range(len(clip_ids)):
      total += np.log(np.sum(np.exp(matrix[i]))) - matrix[i, i]
  return 0.5 * total / len(clip_ids)


def reference_infonce_multi(audio, text, clip_ids, temperature):
  """SPEC 11: C = S / |tau|, P = pairs (i, j) of the same clip (own pairs included);
  loss = -0.5 (mean over P of log_softmax(C, axis 0) + mean over P of log_softmax(C, axis 1))."""
  c = unit_similarities(audio, text) / abs(temperature)
  n = len(clip_ids)
  pairs = [(i, j) for i in range(n) for j in range(n) if clip_ids[i] == clip_ids[j]]
  over_audio = [c[i, j] - np.log(sum(np.exp(c[k, j]) for k in range(n))) for i, j in pairs]  # axis 0
  over_text = [c[i, j] - np.log(sum(np.exp(c[i, k]) for k in range(n))) for i, j in pairs]  # axis 1
  return -0.5 * (np.mean(over_audio) + np.mean(over_text))


def reference_siglip(audio, text, clip_ids, scale, bias):
  """-mean over all pairs of log sigmoid(z (t S + b)), z = +1 for pairs of one clip."""
  logits = scale * unit_similarities(audio, text) + bias
  z = np.where(clip_ids[:, None] == clip_ids[None, :], 1.0, -1.0)
  return np.mean(-np.log(1.0 / (1.0 + np.exp(-z * logits))))


def reference_loss(name, audio, text, clip_ids, fixed):
  if name == "triplet_max":
    return reference_triplet(audio, text, clip_ids, fixed["margin"], max)
  if name == "triplet_sum":
    return reference_triplet(audio, text, clip_ids, fixed["margin"], sum)
  if name == "triplet_weighted":
    return reference_triplet_weighted(audio, text, clip_ids, fixed["margin"])
  if name == "ntxent":
    return reference_ntxent(audio, text, clip_ids, fixed["temperature"])
  if name == "infonce":
    return reference_infonce(audio, text, clip_ids, fixed["temperature"])
  if name == "infonce_multi":
    return reference_infonce_multi(audio, text, clip_ids, fixed["temperature"])
  return reference_siglip(audio, text, clip_ids, fixed["scale"], fixed["bias"])


def numerical_gradient(f, x, step=1e-6):
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    plus, minus = x.copy(), x.copy()
    plus[index] += step
    minus[index] -= step
    grad[index] = (f(plus) - f(minus)) / (2 * step)
  return grad


def random_batch(rng, batch, dim, n_clips):
  """Random pairs, some captions close to their clip (clear positives), some not; clip ids repeat."""
  audio = rng.normal(size=(batch, dim))
  text = rng.choice([0.0, 2.5], size=(batch, 1)) * audio + rng.normal(size=(batch, dim))
  clip_ids = rng.integers(0, n_clips, size=batch)
  assert len(set(clip_ids)) < batch  # some clips repeat, so the mask matters
  return audio, text, clip_ids


def test_infonce_matches_numpy_reference_value_and_gradient():
  rng = np.random.default_rng(0)
  audio, text, clip_ids = random_batch(rng, batch=12, dim=8, n_clips=5)
  tau = 0.1
  value, (grad_audio, grad_text) = jax.jit(jax.value_and_grad(infonce, argnums=(0, 1)), static_argnums=3)(
    jnp.asarray(audio, jnp.float32), jnp.asarray(text, jnp.float32), jnp.asarray(clip_ids), tau
  )
  np.testing.assert_allclose(value, reference_infonce(audio, text, clip_ids, tau), rtol=1e-5)
  np.testing.assert_allclose(
    grad_audio, numerical_gradient(lambda a: reference_infonce(a, text, clip_ids, tau), audio), atol=2e-5
  )
  np.testing.assert_allclose(
    grad_text, numerical_gradient(lambda t: reference_infonce(audio, t, clip_ids, tau), text), atol=2e-5
  )


def test_learnable_temperature_value_and_gradient():
  rng = np.random.default_rng(1)
  audio, text, clip_ids = random_batch(rng, batch=10, dim=6, n_clips=4)
  params = init_loss_params("infonce", learnable=True, temperature=0.2)
  np.testing.assert_allclose(params["log_temperature"], np.log(0.2), rtol=1e-6)
  loss_fn = jax.jit(jax.value_and_grad(make_loss_fn("infonce", None), argnums=3))
  value, grad = loss_fn(jnp.asarray(audio, jnp.float32), jnp.asarray(text, jnp.float32), jnp.asarray(clip_ids), params)
  np.testing.assert_allclose(value, reference_infonce(audio, text, clip_ids, 0.2), rtol=1e-5)
  log_tau = np.array(np.log(0.2))
  expected = numerical_gradient(lambda lt: reference_infonce(audio, text, clip_ids, np.exp(lt)), log_tau)
  np.testing.assert_allclose(grad["log_temperature"], expected, rtol=1e-4)
  # Clipped to TEMPERATURE_RANGE: below the floor the loss uses the floor and the gradient vanishes.
  low = {"log_temperature": jnp.asarray(np.log(TEMPERATURE_RANGE[0] / 10), jnp.float32)}
  value_low, grad_low = loss_fn(
    jnp.asarray(audio, jnp.float32), jnp.asarray(text, jnp.float32), jnp.asarray(clip_ids), low
  )
  np.testing.assert_allclose(value_low, reference_infonce(audio, text, clip_ids, TEMPERATURE_RANGE[0]), rtol=1e-5)
  assert grad_low["log_temperature"] == 0.0
  assert init_loss_params("infonce", learnable=False, temperature=0.07) == {}


def rotate_keeping_other_similarities(rng, text_j, audio_i, other_audio):
  """Rotate unit caption text_j so that its dot products with other_audio stay and the one with audio_i changes."""
  basis, _ = np.linalg.qr(other_audio.T)  # orthonormal basis of span(other_audio)
  inside = basis @ (basis.T @ text_j)
  outside = text_j - inside
  free = rng.normal(size=text_j.shape)
  free -= basis @ (basis.T @ free)
  free -= outside * (free @ outside) / (outside @ outside)
  free *= np.linalg.norm(outside) / np.linalg.norm(free)
  rotated = inside + free  # outside part turned by 90 degrees: same norm, same projection on span(other_audio)
  assert abs(np.linalg.norm(rotated) - 1.0) < 1e-9
  np.testing.assert_allclose(other_audio @ rotated, other_audio @ text_j, atol=1e-12)
  assert abs(audio_i @ rotated - audio_i @ text_j) > 1e-2
  return rotated


@pytest.mark.parametrize("same_clip", [True, False])
def test_same_clip_pairs_leave_the_denominators(same_clip):
  """Changing only S[i, j] (audio i, caption j != i) changes the loss iff i and j are different clips."""
  rng = np.random.default_rng(2)
  audio, text, _ = random_batch(rng, batch=6, dim=16, n_clips=3)
  audio /= np.linalg.norm(audio, axis=1, keepdims=True)
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  clip_ids = np.array([0, 0, 1, 2, 3, 4]) if same_clip else np.array([0, 1, 2, 2, 3, 4])
  i, j = 0, 1
  changed = text.copy()
  changed[j] = rotate_keeping_other_similarities(rng, text[j], audio[i], np.delete(audio, i, axis=0))
  before = infonce(jnp.asarray(audio, jnp.float32), jnp.asarray(text, jnp.float32), jnp.asarray(clip_ids), 0.1)
  after = infonce(jnp.asarray(audio, jnp.float32), jnp.asarray(changed, jnp.float32), jnp.asarray(clip_ids), 0.1)
  if same_clip:
    np.testing.assert_allclose(after, before, atol=1e-6)
  else:
    assert abs(after - before) > 1e-3
  np.testing.assert_allclose(after, reference_infonce(audio, changed, clip_ids, 0.1), rtol=1e-5)


def test_inputs_are_normalised_inside():
  rng = np.random.default_rng(3)
  audio, text, clip_ids = (jnp.asarray(x) for x in random_batch(rng, batch=8, dim=5, n_clips=4))
  audio, text = audio.astype(jnp.float32), text.astype(jnp.float32)
  unit_audio = audio / jnp.linalg.norm(audio, axis=1, keepdims=True)
  loss = get_loss("infonce", temperature=0.07)
  np.testing.assert_allclose(loss(3.0 * audio, text, clip_ids), loss(unit_audio, text, clip_ids), rtol=1e-6)


def make_data_mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("batch", [16, 64])
def test_sharded_equals_unsharded_value_and_gradients(batch):
  mesh = make_data_mesh()
  rng = np.random.default_rng(batch)
  audio, text, clip_ids = random_batch(rng, batch=batch, dim=24, n_clips=batch // 3)  # same clips across devices
  audio, text, clip_ids = audio.astype(np.float32), text.astype(np.float32), clip_ids.astype(np.int32)
  params = init_loss_params("infonce", learnable=True, temperature=0.07)
  unsharded = jax.jit(jax.value_and_grad(make_loss_fn("infonce", None), argnums=(0, 1, 3)))
  sharded = jax.jit(jax.value_and_grad(make_loss_fn("infonce", mesh, "data"), argnums=(0, 1, 3)))
  on_mesh = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (audio, text, clip_ids)]
  value, grads = sharded(*on_mesh, params)
  expected_value, expected_grads = unsharded(audio, text, clip_ids, params)
  np.testing.assert_allclose(value, expected_value, rtol=1e-6)
  np.testing.assert_allclose(value, reference_infonce(audio, text, clip_ids, 0.07), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert grads[0].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)


def test_sharded_fixed_temperature_and_local_memory():
  mesh = make_data_mesh()
  rng = np.random.default_rng(5)
  audio, text, clip_ids = (
    x.astype(np.float32) if x.dtype.kind == "f" else x.astype(np.int32)
    for x in random_batch(rng, batch=64, dim=16, n_clips=20)
  )
  loss_fn = make_loss_fn("infonce", mesh, temperature=0.1)
  np.testing.assert_allclose(
    jax.jit(loss_fn)(audio, text, clip_ids, {}), infonce(audio, text, clip_ids, 0.1), rtol=1e-6
  )
  jaxpr = str(jax.make_jaxpr(loss_fn)(audio, text, clip_ids, {}))
  assert "f32[8,64]" in jaxpr and "f32[64,64]" not in jaxpr  # each device holds B_local x B_global scores


def test_bad_arguments_are_rejected():
  mesh = make_data_mesh()
  audio = jnp.ones((12, 4))
  ids = jnp.arange(12)
  with pytest.raises(ValueError, match="unknown loss"):
    get_loss("nope")
  with pytest.raises(ValueError, match="unknown hyper-parameters"):
    get_loss("infonce", temperature=0.1, margin=0.2)
  with pytest.raises(ValueError, match="positive"):
    get_loss("infonce", temperature=0.0)
  with pytest.raises(ValueError, match="needs a temperature"):
    make_loss_fn("infonce", None)(audio, audio, ids, {})
  with pytest.raises(ValueError, match="not divisible"):
    make_loss_fn("infonce", mesh, temperature=0.1)(audio, audio, ids, {})
  with pytest.raises(ValueError, match="clip_ids"):
    infonce(audio, audio, ids[:5], 0.1)
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    infonce(audio, audio[:, :3], ids, 0.1)
  with pytest.raises(ValueError, match="no axis"):
    make_loss_fn("infonce", mesh, axis="model", temperature=0.1)
  with pytest.raises(ValueError, match="inside"):
    init_loss_params("infonce", learnable=True, temperature=5.0)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_matches_numpy_reference_value_and_gradient(name):
  rng = np.random.default_rng(10 + LOSS_NAMES.index(name))
  audio, text, clip_ids = random_batch(rng, batch=12, dim=8, n_clips=5)
  fixed = FIXED[name]
  loss = get_loss(name, **fixed)
  value, (grad_audio, grad_text) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
    jnp.asarray(audio, jnp.float32), jnp.asarray(text, jnp.float32), jnp.asarray(clip_ids)
  )
  expected = reference_loss(name, audio, text, clip_ids, fixed)
  assert expected > 1e-3
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(
    grad_audio, numerical_gradient(lambda a: reference_loss(name, a, text, clip_ids, fixed), audio), atol=3e-5
  )
  np.testing.assert_allclose(
    grad_text, numerical_gradient(lambda t: reference_loss(name, audio, t, clip_ids, fixed), text), atol=3e-5
  )


def test_weighted_triplet_rows_with_and_without_hard_negatives():
  """The random batch of the parity test exercises both branches of triplet_weighted."""
  rng = np.random.default_rng(10 + LOSS_NAMES.index("triplet_weighted"))
  audio, text, clip_ids = random_batch(rng, batch=12, dim=8, n_clips=5)
  sim = unit_similarities(audio, text)
  hardest = np.where(clip_ids[:, None] == clip_ids[None, :], -np.inf, sim).max(axis=1)
  has_hard = hardest + 0.2 > np.diag(sim)
  assert has_hard.any() and not has_hard.all()


@pytest.mark.parametrize(
  "name, initial",
  [
    ("ntxent", {"temperature": 0.2}),
    ("infonce_multi", {"temperature": 0.05}),
    ("siglip", {"scale": 4.0, "bias": -3.0}),
  ],
)
def test_learnable_parameters_value_and_gradient(name, initial):
  rng = np.random.default_rng(20)
  audio, text, clip_ids = random_batch(rng, batch=10, dim=6, n_clips=4)
  params = init_loss_params(name, learnable=True, **initial)
  value, grads = jax.jit(jax.value_and_grad(make_loss_fn(name, None), argnums=3))(
    jnp.asarray(audio, jnp.float32), jnp.asarray(text, jnp.float32), jnp.asarray(clip_ids), params
  )
  np.testing.assert_allclose(value, reference_loss(name, audio, text, clip_ids, initial), rtol=1e-5)
  if name == "ntxent":
    log_tau = np.array(np.log(initial["temperature"]))
    expected = {
      "log_temperature": numerical_gradient(lambda lt: reference_ntxent(audio, text, clip_ids, np.exp(lt)), log_tau)
    }
  elif name == "infonce_multi":
    tau = np.array(initial["temperature"])
    expected = {"tau": numerical_gradient(lambda t: reference_infonce_multi(audio, text, clip_ids, t), tau)}
  else:
    log_scale, bias = np.array(np.log(initial["scale"])), np.array(initial["bias"])
    expected = {
      "log_scale": numerical_gradient(lambda ls: reference_siglip(audio, text, clip_ids, np.exp(ls), bias), log_scale),
      "bias": numerical_gradient(lambda b: reference_siglip(audio, text, clip_ids, np.exp(log_scale), b), bias),
    }
  assert set(grads) == set(expected)
  for key in expected:
    np.testing.assert_allclose(grads[key], expected[key], rtol=1e-4, err_msg=key)


def test_siglip_default_initialisation_and_config():
  params = init_loss_params("siglip", learnable=True)
  np.testing.assert_allclose(np.exp(params["log_scale"]), 10.0, rtol=1e-6)
  assert float(params["bias"]) == -10.0
  config = get_base_config().loss
  config.name = "siglip"
  assert set(init_loss_params_from_config(config)) == {"log_scale", "bias"}
  config.siglip_learnable = False
  assert init_loss_params_from_config(config) == {}
  config.name = "triplet_max"
  assert init_loss_params_from_config(config) == {}


@pytest.mark.parametrize("name, chunked", [(name, False) for name in LOSS_NAMES] + [("siglip", True)])
def test_every_loss_sharded_equals_unsharded(name, chunked):
  mesh = make_data_mesh()
  rng = np.random.default_rng(30 + LOSS_NAMES.index(name))
  audio, text, clip_ids = random_batch(rng, batch=32, dim=12, n_clips=10)  # same clips across devices
  audio, text, clip_ids = audio.astype(np.float32), text.astype(np.float32), clip_ids.astype(np.int32)
  learnable = name in ("ntxent", "infonce_multi", "siglip")
  params = init_loss_params(name, learnable=learnable, **({"temperature": 0.1} if name == "ntxent" else {}))
  fixed = {} if learnable else FIXED[name]
  argnums = (0, 1, 3) if learnable else (0, 1)
  unsharded = jax.jit(jax.value_and_grad(make_loss_fn(name, None, **fixed), argnums=argnums))
  sharded_fn = make_loss_fn(name, mesh, "data", chunked=chunked, **fixed)
  sharded = jax.jit(jax.value_and_grad(sharded_fn, argnums=argnums))
  on_mesh = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (audio, text, clip_ids)]
  value, grads = sharded(*on_mesh, params)
  expected_value, expected_grads = unsharded(audio, text, clip_ids, params)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # Without distillation the total is the only term: terms=True reports none and changes nothing, bit for bit.
  with_terms = jax.value_and_grad(functools.partial(sharded_fn, terms=True), argnums=argnums, has_aux=True)
  (value_again, terms), grads_again = jax.jit(with_terms)(*on_mesh, params)
  assert terms == {}
  for got, want in zip(jax.tree.leaves((value_again, grads_again)), jax.tree.leaves((value, grads)), strict=True):
    np.testing.assert_array_equal(got, want)


def test_infonce_multi_abs_temperature_and_config():
  """tau enters as |tau| (value even, gradient odd in tau), is logged as |tau|, and comes from its own config key;
  with one pair per clip the multi-positive loss is infonce."""
  rng = np.random.default_rng(60)
  audio, text, clip_ids = (jnp.asarray(x) for x in random_batch(rng, batch=10, dim=6, n_clips=4))
  audio, text = audio.astype(jnp.float32), text.astype(jnp.float32)
  loss_fn = jax.jit(jax.value_and_grad(make_loss_fn("infonce_multi", None), argnums=3))
  value, grad = loss_fn(audio, text, clip_ids, {"tau": jnp.float32(0.05)})
  value_negative, grad_negative = loss_fn(audio, text, clip_ids, {"tau": jnp.float32(-0.05)})
  np.testing.assert_allclose(value_negative, value, rtol=1e-6)
  np.testing.assert_allclose(grad_negative["tau"], -grad["tau"], rtol=1e-6)
  assert grad["tau"] != 0.0
  np.testing.assert_allclose(learnable_values({"tau": jnp.float32(-0.05)})["temperature"], 0.05)
  config = get_base_config().loss
  config.name, config.learnable_temperature, config.multi_positive_temperature = "infonce_multi", True, 0.1
  np.testing.assert_allclose(init_loss_params_from_config(config)["tau"], 0.1)  # not loss.temperature (0.07)
  config.learnable_temperature = False
  assert init_loss_params_from_config(config) == {}
  multi = jax.jit(make_loss_fn_from_config(config, None))
  infonce_loss = jax.jit(get_loss("infonce", temperature=0.1))
  np.testing.assert_allclose(
    multi(audio, text, clip_ids, {}),
    reference_infonce_multi(np.asarray(audio), np.asarray(text), np.asarray(clip_ids), 0.1),
    rtol=1e-5,
  )
  assert abs(multi(audio, text, clip_ids, {}) - infonce_loss(audio, text, clip_ids)) > 1e-2
  distinct = jnp.arange(10, dtype=clip_ids.dtype)
  np.testing.assert_allclose(multi(audio, text, distinct, {}), infonce_loss(audio, text, distinct), rtol=1e-6)


def test_sharded_infonce_multi_holds_local_by_global_blocks_only():
  mesh = make_data_mesh()
  rng = np.random.default_rng(61)
  audio, text, clip_ids = random_batch(rng, batch=64, dim=16, n_clips=20)
  audio, text, clip_ids = audio.astype(np.float32), text.astype(np.float32), clip_ids.astype(np.int32)
  params = init_loss_params("infonce_multi", learnable=True)
  jaxpr = str(jax.make_jaxpr(make_loss_fn("infonce_multi", mesh))(audio, text, clip_ids, params))
  assert "f32[8,64]" in jaxpr and "[64,64]" not in jaxpr  # not even a B x B same-clip mask


def test_chunked_siglip_never_holds_a_local_by_global_block():
  mesh = make_data_mesh()
  rng = np.random.default_rng(40)
  audio, text, clip_ids = random_batch(rng, batch=64, dim=16, n_clips=20)
  audio, text, clip_ids = audio.astype(np.float32), text.astype(np.float32), clip_ids.astype(np.int32)
  params = init_loss_params("siglip", learnable=True)

  def jaxpr_of_value_and_grad(chunked):
    loss_fn = make_loss_fn("siglip", mesh, chunked=chunked)
    return str(jax.make_jaxpr(jax.value_and_grad(loss_fn, argnums=(0, 1, 3)))(audio, text, clip_ids, params))

  assert "f32[8,64]" in jaxpr_of_value_and_grad(chunked=False)  # B_local x B_global scores
  chunked = jaxpr_of_value_and_grad(chunked=True)  # forward and backward: B_local x B_local blocks only
  assert "f32[8,8]" in chunked and "f32[8,64]" not in chunked and "f32[64,64]" not in chunked
  value = jax.jit(make_loss_fn("siglip", mesh, chunked=True))(audio, text, clip_ids, params)
  np.testing.assert_allclose(value, reference_siglip(audio, text, clip_ids, 10.0, -10.0), rtol=1e-5)


def test_loss_from_config():
  config = get_base_config().loss
  rng = np.random.default_rng(50)
  audio, text, clip_ids = (
    x.astype(np.float32) if x.dtype.kind == "f" else x.astype(np.int32)
    for x in random_batch(rng, batch=16, dim=8, n_clips=6)
  )
  config.name, config.margin = "triplet_sum", 0.3
  np.testing.assert_allclose(
    make_loss_fn_from_config(config, None)(audio, text, clip_ids, {}),
    reference_triplet(audio, text, clip_ids, 0.3, sum),
    rtol=1e-5,
  )
  config.name, config.siglip_chunked = "siglip", True
  mesh = make_data_mesh()
  loss_fn = make_loss_fn_from_config(config, mesh)
  assert "ppermute" in str(jax.make_jaxpr(loss_fn)(audio, text, clip_ids, init_loss_params_from_config(config)))


def test_bad_hyper_parameters_are_rejected():
  with pytest.raises(ValueError, match="no chunked variant"):
    make_loss_fn("infonce", make_data_mesh(), chunked=True, temperature=0.1)
  with pytest.raises(ValueError, match="no learnable parameters"):
    init_loss_params("triplet_max", learnable=True)
  with pytest.raises(ValueError, match="margin must be >= 0"):
    get_loss("triplet_sum", margin=-0.1)
  with pytest.raises(ValueError, match="scale must be a positive"):
    get_loss("siglip", scale=0.0, bias=1.0)
  with pytest.raises(ValueError, match="needs scale and bias"):
    get_loss("siglip", scale=1.0)(jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.arange(4))
